"""Options shared by the subcommands, and the pipeline they describe."""

import argparse
import atexit
import os
import sys
import typing
from pathlib import Path

from flux2.registry import DEFAULT_MODEL, model_info

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MODEL_ENV = "FLUX2_MODEL"


def add_model_options(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    """Which model, and where and how it runs."""
    if model:
        p.add_argument(
            "--model",
            default=os.environ.get(MODEL_ENV),
            help=f"registry name (default: ${MODEL_ENV} or {DEFAULT_MODEL}); 'tiny' runs offline",
        )
    p.add_argument("--device", help="cuda, cuda:1, mps or cpu (default: CUDA, then MPS, then CPU)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: bf16; fp32 on CPU-only tiny)")
    p.add_argument("--weights-dir", type=Path, help="folder holding the weights (default: $FLUX2_WEIGHTS_DIR)")
    p.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until they run")
    add_acceleration_options(p.add_argument_group("speed and memory"))


def add_parallel_options(p: argparse.ArgumentParser, unset_is_none: bool = False) -> None:
    """One image over several devices."""
    group = p.add_argument_group("several devices")
    help = "split each image over N processes, one GPU each (CPU processes without CUDA): CFG halves and sequence "
    group.add_argument("--gpus", type=int, default=None if unset_is_none else 1, help=help + "slices (default: 1)")
    group.add_argument(
        "--tensor-parallel",
        action="store_true",
        default=None if unset_is_none else False,
        help="with --gpus: shard the weights instead (for a model too big for one GPU, e.g. [dev])",
    )


def add_acceleration_options(p, unset_is_none: bool = False) -> None:
    """One option per flux2.transforms.acceleration.Acceleration field. `unset_is_none`: an option not given is
    None rather than its default (`flux2 serve`, whose settings may also come from the environment)."""
    from flux2.transforms.acceleration import acceleration_fields

    for name, spec in acceleration_fields().items():
        flag, help = "--" + name.replace("_", "-"), spec.metadata["help"]
        default = None if unset_is_none else spec.default
        kind = next(t for t in typing.get_args(spec.type) or (spec.type,) if t is not type(None))  # int | None -> int
        if kind is bool:
            p.add_argument(flag, action="store_true", dest=name, default=default, help=help)
        else:
            p.add_argument(flag, type=kind, dest=name, default=default, help=help)


def acceleration_from_args(args: argparse.Namespace):
    from flux2.transforms.acceleration import Acceleration, acceleration_fields

    return Acceleration(**{name: getattr(args, name) for name in acceleration_fields()}).check()


def add_feature_options(p: argparse.ArgumentParser) -> None:
    """Prompt upsampling, safety screening and the watermark."""
    p.add_argument("--upsample", choices=["none", "local", "openrouter"], default="none", help="prompt upsampling")
    p.add_argument("--upsample-model", help="local: model folder or Hub id; openrouter: the API's model name")
    p.add_argument("--upsample-url", help="openrouter: an OpenAI-compatible base URL (key: $OPENROUTER_API_KEY)")
    p.add_argument(
        "--safety",
        choices=["off", "classifier", "full"],
        default="off",
        help="screen prompt, references and outputs (full adds the chat-model check)",
    )
    p.add_argument("--nsfw-model", help="image classifier folder or Hub id (default: Falconsai/nsfw_image_detection)")
    p.add_argument("--nsfw-threshold", type=float, help="flag when the nsfw score is above this (default: 0.85)")
    p.add_argument("--no-watermark", action="store_true", help="do not embed the invisible watermark")


def check_device(device: str | None) -> None:
    """A device that is not there fails now, with what to do, rather than deep inside torch later."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device must be cuda, cuda:N, mps or cpu, got {device!r}") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch sees no CUDA GPU; leave --device out to use the CPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple MPS is not available here; leave --device out to use the CPU")


def warn_unused_options(args: argparse.Namespace) -> None:
    """Options that only mean something with another one: say so rather than ignore them."""
    unused = {
        "--nsfw-model": args.nsfw_model and args.safety == "off",
        "--nsfw-threshold": args.nsfw_threshold is not None and args.safety == "off",
        "--upsample-model": args.upsample_model and args.upsample == "none",
        "--upsample-url": args.upsample_url and args.upsample != "openrouter",
    }
    for option, ignored in unused.items():
        if ignored:
            needs = "--safety" if option.startswith("--nsfw") else "--upsample"
            print(f"warning: {option} has no effect without {needs}", file=sys.stderr)


def model_name(args: argparse.Namespace) -> str:
    """The registry name asked for; an unknown name fails here, before anything loads."""
    return model_info(args.model or DEFAULT_MODEL).name


def open_pipeline(args: argparse.Namespace, name: str, *, progress=None, flow_model=None):
    """Load the model's pipeline as the options say, reporting each component to `progress`; returns it and what
    its speed and memory settings put on it (flux2.transforms.acceleration.Applied: step cache, memory report)."""
    import torch

    from flux2.pipeline import DEFAULT_WATERMARK, Flux2Pipeline

    check_device(args.device)
    warn_unused_options(args)
    if getattr(args, "gpus", 1) != 1 or getattr(args, "tensor_parallel", False):
        from flux2.transforms.acceleration import Applied

        return open_parallel(args, name), Applied()
    acceleration = acceleration_from_args(args)
    acceleration.prepare()
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    if acceleration.block_offload and flow_model is None:  # on the CPU: the blocks then visit the GPU one by one
        from flux2.util import load_flow_model

        flow_model = load_flow_model(name, device="cpu", weights_dir=args.weights_dir, dtype=dtype)
    pipe = Flux2Pipeline(
        name, device=args.device, dtype=dtype, weights_dir=args.weights_dir, cpu_offload=args.cpu_offload,
        safety=_safety(args), watermark=None if args.no_watermark else DEFAULT_WATERMARK, flow_model=flow_model,
        progress=progress,
    )  # fmt: skip
    if pipe.device.type == "cpu" and pipe.info.needs_files and args.device is None:
        print("note: no GPU found, running on the CPU: expect minutes per image", file=sys.stderr)
    pipe.upsampler = upsampler_for(args, pipe, args.upsample)
    return pipe, acceleration.apply(pipe)


def open_parallel(args: argparse.Namespace, name: str):
    """--gpus N: N processes generate each image together (flux2.parallel); only the options they support."""
    import torch

    from flux2.parallel import ParallelPipeline, ParallelWorker
    from flux2.pipeline import DEFAULT_WATERMARK
    from flux2.transforms.acceleration import Acceleration

    if args.gpus < 1 or (args.tensor_parallel and args.gpus < 2):
        raise ValueError(f"--gpus must be 2 or more to split a model (--tensor-parallel needs it too), got {args.gpus}")
    if acceleration_from_args(args) != Acceleration(threads=args.threads) or args.cpu_offload:
        raise ValueError("--gpus cannot be combined with the speed and memory options or --cpu-offload yet")
    if args.upsample != "none":
        raise ValueError("--gpus cannot be combined with --upsample: upsample first, and pass the result as the prompt")
    device = "cuda" if torch.cuda.is_available() and (args.device or "cuda").startswith("cuda") else "cpu"
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    options = {"safety": _safety(args), "watermark": None if args.no_watermark else DEFAULT_WATERMARK}
    options |= {"dtype": dtype} if dtype else {}
    options |= {"weights_dir": args.weights_dir} if args.weights_dir else {}
    pipe = ParallelPipeline(ParallelWorker(name, args.gpus, device=device, tensor=args.tensor_parallel, **options))
    atexit.register(pipe.close)
    return pipe


def upsampler_for(args: argparse.Namespace, pipe, mode: str, model: str | None = None, **options):
    """The upsampler for `mode`; on [dev] the loaded Mistral encoder does local upsampling, as in the reference."""
    from flux2.text_encoder import Mistral3SmallEmbedder
    from flux2.upsampling import make_upsampler

    model = model or args.upsample_model
    encoder = pipe.text_encoder
    if mode == "local" and model is None and isinstance(encoder, Mistral3SmallEmbedder):
        return make_upsampler(mode, model=encoder.model, processor=encoder.processor, device=pipe.device)
    if model:
        options["model"] = model
    if mode == "openrouter" and args.upsample_url:
        options["base_url"] = args.upsample_url
    return make_upsampler(mode, **options)


def _safety(args: argparse.Namespace):
    from flux2.safety import SafetyPolicy

    options = {"classifier_model": args.nsfw_model} if args.nsfw_model else {}
    if args.nsfw_threshold is not None:
        options["threshold"] = args.nsfw_threshold
    return SafetyPolicy.from_settings(args.safety, **options) if options else args.safety
