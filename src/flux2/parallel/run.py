"""A worker spanning several devices: one process per rank, each with its own pipeline, generating one image
together; the caller's process talks to them.

    with ParallelWorker("flux.2-dev", world_size=2, device="cuda", tensor=True) as worker:
        images = worker.run(request, progress=print, cancel=event)

Modes: split (default) runs the CFG halves on different ranks and splits each half's sequence over the others
(flux2.parallel.forward: every rank holds the whole model); tensor shards the transformer's and the text
encoder's weights over the ranks (flux2.parallel.tensor: for models that do not fit one device).

Every rank runs the same request (the seed is drawn once, here) through the same code, so they meet at every
collective. Rank 0 owns progress and cancellation: at every progress event it asks this process (which calls
`progress` and looks at `cancel`) whether to go on, and broadcasts the answer, so all ranks stop at the same step.
A rank that fails takes the others down; the error names it.
"""

import logging
import pickle
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from flux2.parallel.forward import parallel_forward
from flux2.parallel.group import Groups, check_device_kind, free_port, init_group, teardown
from flux2.pipeline import Flux2Pipeline, GeneratedImage, GenerationCancelled, Progress
from flux2.registry import model_info
from flux2.request import GenerationRequest

log = logging.getLogger(__name__)

# Errors from the request itself: every rank raises the same one at the same point, so the ranks stay in step and
# the worker serves the next request. Any other error (out of memory on one device) ends the worker.
INPUT_ERRORS = (ValueError, FileNotFoundError)
POLL_SECONDS = 0.05  # how often the caller checks that every rank is still alive while it waits
ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class WorkerSpec:
    """What every rank builds (sent to the ranks: plain data)."""

    model: str
    world_size: int
    device: str  # "cpu" (gloo) | "cuda" (NCCL, one GPU per rank)
    tensor: bool  # shard the weights instead of splitting the work
    options: dict = field(default_factory=dict)  # keyword arguments of Flux2Pipeline (watermark, safety, dtype...)


def check_spec(spec: WorkerSpec) -> None:
    """Errors that name the setting, before any process starts."""
    params = model_info(spec.model).params
    if isinstance(spec.world_size, bool) or not isinstance(spec.world_size, int) or spec.world_size < 1:
        raise ValueError(f"world_size (--gpus) must be a positive integer, got {spec.world_size!r}")
    check_device_kind(spec.device)
    if spec.device == "cuda" and torch.cuda.device_count() < spec.world_size:
        raise ValueError(f"world_size (--gpus) {spec.world_size} needs that many GPUs; {torch.cuda.device_count()} "
                         f"are visible")  # fmt: skip
    divides = [("num_heads", params.num_heads)] + ([("the MLP width", params.mlp_hidden)] if spec.tensor else [])
    for what, count in divides:
        if count % spec.world_size != 0:
            raise ValueError(f"world_size (--gpus) must divide {spec.model}'s {what} ({count}), got "
                             f"{spec.world_size}")  # fmt: skip
    if "upsampler" in spec.options:
        raise ValueError("a parallel worker does not upsample prompts (each rank would get its own rewrite): "
                         "upsample first and pass the result as the prompt")  # fmt: skip


# ----------------------------------------------------------------------------- the ranks


class StepGate:
    """Every rank's progress callback: rank 0 reports the event to the caller and hears whether to stop, then
    the answer is broadcast, so every rank raises GenerationCancelled at the same event."""

    def __init__(self, conn: Connection | None, device: torch.device):
        self.conn = conn  # rank 0's line to the caller; None on the other ranks
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)  # NCCL broadcasts device tensors only

    def __call__(self, progress: Progress) -> None:
        if self.conn is not None:
            self.conn.send(("progress", progress))
            self.flag.fill_(int(self.conn.recv()))
        dist.broadcast(self.flag, src=0)
        if self.flag.item():
            raise GenerationCancelled(f"cancelled during {progress.stage}")


def build_pipeline(spec: WorkerSpec, device: torch.device) -> Flux2Pipeline:
    if not spec.tensor:
        pipe = Flux2Pipeline(spec.model, device=device, **spec.options)
        parallel_forward(pipe.flow_model, Groups())
        return pipe
    from torch.distributed.device_mesh import init_device_mesh  # DTensor: imported only for this mode (slow)

    from flux2.parallel.tensor import tensor_parallel_text_encoder, tensor_parallel_transformer
    from flux2.util import default_dtype, load_flow_model, load_text_encoder

    # Loaded on the CPU and sharded from there: only each rank's part of the big weights reaches its device.
    mesh = init_device_mesh(device.type, (spec.world_size,))
    dtype = spec.options.get("dtype") or default_dtype(model_info(spec.model), device)
    weights_dir = spec.options.get("weights_dir")
    flow_model = tensor_parallel_transformer(load_flow_model(spec.model, device="cpu", weights_dir=weights_dir,
                                                             dtype=dtype), mesh)  # fmt: skip
    text_encoder = load_text_encoder(spec.model, "cpu", weights_dir=weights_dir, dtype=dtype)
    try:
        tensor_parallel_text_encoder(text_encoder.model, mesh)
    except ValueError as err:  # e.g. klein's Qwen3 has 8 key/value heads: more ranks than that keep it whole
        log.warning("text encoder kept whole on every rank: %s", err)
    options = {k: v for k, v in spec.options.items() if k != "dtype"}
    return Flux2Pipeline(spec.model, device=device, dtype=dtype, flow_model=flow_model,
                         text_encoder=text_encoder.to(device), **options)  # fmt: skip


def serve(rank: int, spec: WorkerSpec, conns: list[Connection], port: int) -> None:
    """One rank: build the pipeline, then run each request the caller sends until it sends None."""
    conn = conns[rank]
    device = init_group(rank, spec.world_size, port, spec.device)
    try:
        pipe = build_pipeline(spec, device)
        conn.send(("ready",))
        gate = StepGate(conn if rank == 0 else None, device)
        while (request := next_request(conn)) is not None:
            try:
                images = pipe.run(request, callback=gate)
            except GenerationCancelled as cancelled:
                conn.send(("cancelled", str(cancelled), cancelled.completed))
            except INPUT_ERRORS as err:
                conn.send(("error", portable(err)))
            else:
                conn.send(("done", images))
    finally:
        teardown()


def next_request(conn: Connection) -> GenerationRequest | None:
    """The caller's next request; None when it says stop, or when it is gone (its end of the pipe closed)."""
    try:
        return conn.recv()
    except EOFError:
        return None


def portable(err: Exception) -> Exception:
    """The error itself if it survives pickling to the caller's process, else a ValueError with its message."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - e.g. an exception whose __init__ does not take its own args back
        return ValueError(f"{type(err).__name__}: {err}")


# ----------------------------------------------------------------------------- the caller's side


class ParallelWorker:
    """N processes (one per device) that generate each image together; `run` serves one request at a time.

    `pipeline_options` are Flux2Pipeline keyword arguments (watermark, safety, dtype, weights_dir), the same on
    every rank. Close it (or use it as a context manager) to stop the processes.
    """

    def __init__(self, model: str, world_size: int, *, device: str = "cpu", tensor: bool = False,
                 **pipeline_options):  # fmt: skip
        self.spec = WorkerSpec(model, world_size, device, tensor, pipeline_options)
        check_spec(self.spec)
        self.info = model_info(model)
        self._lock = threading.Lock()
        context = mp.get_context("spawn")
        pipes = [context.Pipe() for _ in range(world_size)]
        self._conns = [ours for ours, _ in pipes]
        self._ranks = mp.start_processes(serve, args=(self.spec, [theirs for _, theirs in pipes], free_port()),
                                         nprocs=world_size, join=False, start_method="spawn")  # fmt: skip
        for conn in self._conns:
            self._receive(conn)  # ("ready",): every rank has built its pipeline

    def run(self, request: GenerationRequest, *, progress: ProgressCallback | None = None,
            cancel: threading.Event | None = None) -> list[GeneratedImage]:  # fmt: skip
        """Like Flux2Pipeline.run: the images of one request, progress events from rank 0, cancel between steps
        (GenerationCancelled; an exception raised by `progress` also stops every rank, then comes out here)."""
        request = request.resolve(self.info)  # the seed is drawn here, once for every rank
        with self._lock:
            for conn in self._conns:
                conn.send(request)
            return self._follow(progress, cancel)

    def _follow(self, progress: ProgressCallback | None, cancel: threading.Event | None) -> list[GeneratedImage]:
        """Answer rank 0's progress events until the ranks finish; collect every rank's end message."""
        raised: BaseException | None = None
        while (message := self._receive(self._conns[0]))[0] == "progress":
            try:
                if progress is not None:
                    progress(message[1])
                stop = cancel is not None and cancel.is_set()
            except BaseException as err:  # noqa: BLE001 - any error of the callback stops the ranks, then re-raises
                raised, stop = err, True
            self._conns[0].send(stop)
        for conn in self._conns[1:]:
            self._receive(conn)
        if raised is not None and not isinstance(raised, GenerationCancelled):
            raise raised
        if message[0] == "error":
            raise message[1]
        if message[0] == "cancelled":
            raise GenerationCancelled(message[1], completed=message[2])
        return message[1]

    def _receive(self, conn: Connection) -> tuple:
        """The next message from a rank; if any rank dies meanwhile, the others are stopped and its error raised."""
        while not conn.poll(POLL_SECONDS):
            try:
                finished = self._ranks.join(timeout=0)
            except ProcessException as err:
                raise RuntimeError(f"rank {err.error_index} of the parallel worker failed:\n{err}") from None
            if finished:
                raise RuntimeError("the parallel worker's processes have exited")
        return conn.recv()

    def close(self) -> None:
        """Stop every rank (after the run in progress, if any) and wait for the processes to exit."""
        with self._lock:
            for conn in self._conns:
                try:
                    conn.send(None)
                except (BrokenPipeError, OSError):
                    pass  # that rank is gone already
            try:
                while not self._ranks.join():
                    pass
            finally:
                for conn in self._conns:
                    conn.close()

    @property
    def exit_codes(self) -> list[int | None]:
        """Each rank's exit code; None while it runs."""
        return [process.exitcode for process in self._ranks.processes]

    def __enter__(self) -> "ParallelWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ParallelPipeline:
    """A ParallelWorker where a Flux2Pipeline is expected: `run(request, callback=, cancel=)` (what the CLI and
    the studio's tasks call). No prompt upsampling: each rank would get its own rewrite."""

    text_encoder = None  # not in this process

    def __init__(self, worker: ParallelWorker):
        self.worker = worker
        self.info = worker.info

    @property
    def upsampler(self) -> None:
        return None

    @upsampler.setter
    def upsampler(self, upsampler) -> None:
        if upsampler is not None:
            raise ValueError("prompt upsampling cannot be combined with a model split over several devices: "
                             "upsample first, and pass the result as the prompt")  # fmt: skip

    def run(self, request: GenerationRequest, *, callback: ProgressCallback | None = None,
            cancel: threading.Event | None = None) -> list[GeneratedImage]:  # fmt: skip
        return self.worker.run(request, progress=callback, cancel=cancel)

    def generate_many(self, *args, **kwargs):
        raise ValueError("several prompts in one call are not supported with a model split over several devices "
                         "yet: run one prompt at a time")  # fmt: skip

    def close(self) -> None:
        self.worker.close()


def generate_parallel(
    model_name: str,
    request: GenerationRequest,
    world_size: int,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    *,
    tensor: bool = False,
    **pipeline_options,
) -> list[GeneratedImage]:
    """One request over `world_size` devices ("cpu" ranks or one GPU per rank): start a worker, run, stop it.
    For several requests keep a ParallelWorker instead (the models load once)."""
    with ParallelWorker(model_name, world_size, device=device, tensor=tensor, **pipeline_options) as worker:
        return worker.run(request, progress=progress, cancel=cancel)
