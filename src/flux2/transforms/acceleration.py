"""A pipeline's speed and memory settings in one place: the CLI's options (`flux2.cli.options`) and the studio's
settings are made from these fields, and `apply` turns them into the transforms of this package.

    accel = Acceleration(compile=True, step_cache=0.1).check()
    accel.prepare()                     # before loading: CPU threads
    applied = accel.apply(pipe)         # after loading: the transforms, in an order that composes
    applied.step_cache.stats            # {"steps": 50, "calls": 50, "skipped": 18} for the last image
"""

from dataclasses import dataclass, field, fields

# flux2.transforms.attention.NAMES, written out: the CLI's options are made from this module before torch loads
# (tests/test_acceleration.py checks that the two agree).
ATTENTION_NAMES = ("auto", "math", "efficient", "flash", "cudnn", "sage", "fa3")
TILED_DECODE = {"auto": None, "on": True, "off": False}  # -> Flux2Pipeline.tiling
FP8_MODES = ("off", "tensor", "rowwise")  # float8 transformer weights: one scale per layer, or per output row
STEP_CACHE_MAX = 1.0  # a relative change of the first block's output: past 1 every step after the first is skipped


def setting(default: object, help: str) -> object:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Acceleration:
    threads: int | None = setting(None, "CPU threads torch uses (default: torch's choice, one per core)")
    compile: bool = setting(False, "torch.compile the transformer's blocks (a one-time cost, then faster steps)")
    attention: str = setting("auto", f"attention kernel: {', '.join(ATTENTION_NAMES)}")
    step_cache: float = setting(
        0.0, "skip the transformer's later blocks on steps whose first block barely changed, below this relative "
        "change (0: off; 0.05-0.2 for the 50-step models)"
    )  # fmt: skip
    block_offload: bool = setting(False, "keep the transformer's blocks on the CPU, a few at a time on the GPU")
    fp8: str = setting(
        "off", "float8 transformer weights: off, tensor (a scale per layer), rowwise (per output row: closer); "
        "GPUs with float8 tensor cores (Ada, Hopper) then also compute in float8, others keep bf16 maths at half "
        "the weight memory"
    )  # fmt: skip
    offload_text_encoder: bool = setting(False, "keep the text encoder on the CPU except while it encodes")
    tiled_decode: str = setting("auto", "decode in overlapping tiles: auto (images above 8 MP), on, off")
    memory_report: bool = setting(False, "record the peak memory of each stage (GPU: allocated; CPU: resident)")

    def check(self) -> "Acceleration":
        """ValueError naming the setting and what is allowed."""
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_NAMES)}, got {self.attention!r}")
        if self.fp8 not in FP8_MODES:
            raise ValueError(f"fp8 must be one of {', '.join(FP8_MODES)}, got {self.fp8!r}")
        if self.tiled_decode not in TILED_DECODE:
            raise ValueError(f"tiled_decode must be one of {', '.join(TILED_DECODE)}, got {self.tiled_decode!r}")
        if not 0 <= self.step_cache <= STEP_CACHE_MAX:
            raise ValueError(f"step_cache must be a threshold in [0, {STEP_CACHE_MAX:g}], got {self.step_cache!r}")
        return self

    def prepare(self) -> None:
        """What must happen before the models load."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)

    def apply(self, pipe) -> "Applied":
        """The transforms on a loaded pipeline. With `block_offload` the transformer should have been loaded on
        the CPU (it is then moved block by block, never whole)."""
        from flux2.transforms.attention import attention_backend
        from flux2.transforms.block_offload import block_offload
        from flux2.transforms.compile import compile_pipeline
        from flux2.transforms.memory import memory_report
        from flux2.transforms.offload import cpu_offload
        from flux2.transforms.quantized import quantize_model_fp8
        from flux2.transforms.step_cache import enable_step_cache

        applied = Applied()
        pipe.tiling = TILED_DECODE[self.tiled_decode]
        if self.offload_text_encoder:
            cpu_offload(pipe, parts=("text_encoder",))
        if self.fp8 != "off":  # before compile, which then traces the float8 layers
            quantize_model_fp8(pipe.flow_model, rowwise=self.fp8 == "rowwise")
        if self.compile:  # first: the block transforms below wrap the compiled blocks
            compile_pipeline(pipe)
        if self.attention != "auto":
            attention_backend(pipe, self.attention)
        if self.step_cache > 0:
            applied.step_cache = enable_step_cache(pipe.flow_model, self.step_cache)
            pipe.stage_hooks.append(applied.step_cache)
        if self.block_offload:
            pipe.stage_hooks.append(block_offload(pipe.flow_model, pipe.device))
        if self.memory_report:  # last, so it sees what the other hooks move
            applied.memory = memory_report(pipe)
        return applied


@dataclass
class Applied:
    step_cache: object | None = None  # flux2.transforms.step_cache.StepCache, when on
    memory: object | None = None  # flux2.transforms.memory.MemoryReport, when asked for


def acceleration_fields() -> dict[str, object]:
    """Each setting's field (name, type, default, help), for the CLI and the studio to offer."""
    return {f.name: f for f in fields(Acceleration)}
