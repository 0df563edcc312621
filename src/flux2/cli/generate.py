"""The `flux2` command: one-shot generation and editing.

flux2 generate "a lighthouse at dusk" --model flux.2-klein-4b --seed 7
flux2 edit "make the sky purple" -i photo.jpg -o edited.png
FLUX2_MODEL=tiny flux2 generate "self-test"          # offline, random weights, noise image
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from flux2.provenance import image_format, save_with_provenance
from flux2.registry import DEFAULT_MODEL, FLUX2_MODEL_INFO

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux2",
        description="FLUX.2 image generation and editing.",
        epilog='example: flux2 generate "a red fox in the snow" --seed 7 -o fox.png',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image", epilog='example: flux2 generate "a fox" --seed 7')
    _generation_options(gen)
    edit = sub.add_parser(
        "edit", help="edit with one or more reference images", epilog='example: flux2 edit "make it night" -i day.jpg'
    )
    _generation_options(edit)
    sub.add_parser("models", help="list the known models")
    return parser


def _generation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument(
        "--model",
        default=os.environ.get("FLUX2_MODEL", DEFAULT_MODEL),
        help=f"registry name (default: $FLUX2_MODEL or {DEFAULT_MODEL}); 'tiny' runs offline",
    )
    p.add_argument("-i", "--image", action="append", default=[], type=Path, help="reference image (repeatable)")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance (default: the model's)")
    p.add_argument("--seed", type=int, help="seed of the first image (default: random, always reported)")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--negative-prompt", help="negative prompt (klein base models)")
    p.add_argument("--match-image-size", type=int, help="use the size of reference image N (0-based)")
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("outputs"),
        help="image file (.png, .jpg, .webp) or folder (default: outputs/)",
    )
    p.add_argument("--sidecar", action="store_true", help="also write the metadata to IMAGE.json")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weights dtype (default: bf16; fp32 for tiny)")
    p.add_argument("--weights-dir", type=Path, help="folder holding the weights (or $FLUX2_WEIGHTS_DIR)")
    p.add_argument("--cpu-offload", action="store_true", help="keep models on the CPU until they run")
    p.add_argument("--json", action="store_true", help="print one JSON object with outputs and parameters")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "models":
            return _list_models()
        return _generate(args)
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


def _list_models() -> int:
    for name, info in FLUX2_MODEL_INFO.items():
        print(f"{name:22} {info.description}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from flux2.pipeline import DEFAULT_WATERMARK, Flux2Pipeline
    from flux2.progress import TerminalProgress

    if args.command == "edit" and not args.image:
        raise ValueError("edit needs at least one input image (-i IMAGE)")
    output_target(args.output)  # a bad -o fails now, not after the models have loaded
    dtype = getattr(torch, DTYPES[args.dtype]) if args.dtype else None
    pipe = Flux2Pipeline(
        args.model, device=args.device, dtype=dtype, weights_dir=args.weights_dir, cpu_offload=args.cpu_offload,
        upsampler=_upsampler(args), safety=_safety(args), watermark=None if args.no_watermark else DEFAULT_WATERMARK,
    )  # fmt: skip
    if pipe.device.type == "cpu" and not pipe.info.is_tiny:
        print("note: running on the CPU; expect minutes per image", file=sys.stderr)
    with TerminalProgress(enabled=not args.json) as progress:
        outputs = pipe.generate(
            args.prompt,
            width=args.width,
            height=args.height,
            num_steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
            num_images=args.num_images,
            negative_prompt=args.negative_prompt,
            reference_images=args.image,
            match_image_size=args.match_image_size,
            callback=progress,
        )
    # A flagged output has no pixels: it is reported, never written.
    paths = [
        None if out.image is None else save_image(out.image, out.record.to_dict(), args.output, args.sidecar)
        for out in outputs
    ]
    if args.json:
        outputs_json = [None if p is None else str(p) for p in paths]
        print(json.dumps({"outputs": outputs_json, "images": [o.record.to_dict() for o in outputs]}))
    for path, out in zip(paths, outputs, strict=True):
        if out.flagged is not None:
            print(f"withheld seed {out.record.seed}: {out.flagged.detail}", file=sys.stderr)
        elif not args.json:
            print(f"saved {path} (seed {out.record.seed})")
    return 0


def output_target(output: Path) -> tuple[Path, str, str]:
    """(folder, file stem, suffix) for -o: an image file name, or a folder (flux2.png, flux2-1.png, ...)."""
    if not output.suffix:
        return output, "flux2", ".png"
    image_format(output)  # a clear error for an unknown suffix
    return output.parent, output.stem, output.suffix


def _upsampler(args: argparse.Namespace):
    from flux2.upsampling import make_upsampler

    options = {"model": args.upsample_model} if args.upsample_model else {}
    if args.upsample == "openrouter" and args.upsample_url:
        options["base_url"] = args.upsample_url
    return make_upsampler(args.upsample, **options)


def _safety(args: argparse.Namespace):
    from flux2.safety import SafetyPolicy

    options = {"classifier_model": args.nsfw_model} if args.nsfw_model else {}
    if args.nsfw_threshold is not None:
        options["threshold"] = args.nsfw_threshold
    return SafetyPolicy.from_settings(args.safety, **options) if options else args.safety


def save_image(image, record: dict, output: Path, sidecar: bool = False) -> Path:
    """The image with its provenance metadata; never overwrites an existing file."""
    target = _free_name(*output_target(output))
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_with_provenance(image, target, record, sidecar=sidecar)


def _free_name(folder: Path, stem: str, suffix: str) -> Path:
    candidate = folder / f"{stem}{suffix}"
    n = 1
    while candidate.exists():
        candidate = folder / f"{stem}-{n}{suffix}"
        n += 1
    return candidate
