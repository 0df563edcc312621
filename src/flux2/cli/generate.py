"""`flux2 generate` and `flux2 edit`: one run for scripts and pipelines, then exit."""

import argparse
import json
import sys
from pathlib import Path

from flux2.cli.options import add_feature_options, add_model_options, model_name, open_pipeline
from flux2.cli.output import FORMATS, output_target
from flux2.registry import model_info
from flux2.settings import check_settings

NOTHING_WRITTEN = 3  # exit status when the safety policy withheld every image
GENERATE_EXAMPLES = """examples:
  flux2 generate "a red fox in the snow" --seed 7 -o fox.png
  flux2 generate "a bakery sign at dawn" --model flux.2-klein-base-4b --steps 28 --negative-prompt blurry
  flux2 generate "a lighthouse" --num-images 4 --format jpeg -o shots/ --json
"""
EDIT_EXAMPLES = """examples:
  flux2 edit "make it night time" -i fox.png -o night.png
  flux2 edit "the cat from image 1 on the sofa from image 2" -i cat.jpg -i sofa.jpg --match-image-size 1
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for name, summary, examples in [
        ("generate", "text to image", GENERATE_EXAMPLES),
        ("edit", "edit with one or more reference images", EDIT_EXAMPLES),
    ]:
        p = sub.add_parser(
            name, help=summary, description=summary, epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        _request_options(p, images_required=name == "edit")
        add_model_options(p)
        add_feature_options(p)
        _output_options(p)
        p.set_defaults(handler=run)


def _request_options(p: argparse.ArgumentParser, images_required: bool) -> None:
    p.add_argument("prompt")
    p.add_argument(
        "-i", "--image", action="append", default=[], type=Path, required=images_required,
        help="reference image (repeat for several)",
    )  # fmt: skip
    p.add_argument("--width", type=int, help="multiple of 16 (default: the model's)")
    p.add_argument("--height", type=int, help="multiple of 16 (default: the model's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--seed", type=int, help="seed of the first image (default: random; always reported)")
    p.add_argument("--num-images", type=int, default=1, help="images to make; image i uses seed + i")
    p.add_argument("--negative-prompt", help="what to steer away from (klein base models)")
    p.add_argument("--match-image-size", type=int, metavar="N", help="use the size of reference image N (0-based)")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, help="image file, or a folder (default: output/)")
    p.add_argument("--format", choices=sorted(FORMATS), help="image format when -o is a folder (default: png)")
    p.add_argument("--sidecar", action="store_true", help="also write the metadata to IMAGE.json")
    p.add_argument("--json", action="store_true", help="print one JSON object: output paths and every parameter")


def run(args: argparse.Namespace) -> int:
    from flux2.cli.run import generate_and_save
    from flux2.progress import TerminalProgress

    # Everything a user can get wrong fails here, before minutes of loading.
    name = model_name(args)
    target = output_target(args.output, args.format)
    check_settings(
        model_info(name), width=args.width, height=args.height, num_steps=args.steps, guidance=args.guidance,
        seed=args.seed, num_images=args.num_images, negative_prompt=args.negative_prompt,
    )  # fmt: skip
    images = _input_images(args)
    with TerminalProgress(enabled=not args.json) as progress:
        pipe = open_pipeline(args, name, progress=progress)
    result = generate_and_save(
        pipe, target, sidecar=args.sidecar, show_progress=not args.json,
        prompt=args.prompt, width=args.width, height=args.height, num_steps=args.steps, guidance=args.guidance,
        seed=args.seed, num_images=args.num_images, negative_prompt=args.negative_prompt,
        reference_images=images, match_image_size=args.match_image_size,
    )  # fmt: skip
    report(result, as_json=args.json)
    if result.cancelled:
        return 130
    return NOTHING_WRITTEN if result.outputs and all(path is None for path in result.paths) else 0


def _input_images(args: argparse.Namespace) -> list:
    from flux2.sampling import open_image

    images = [open_image(path, f"input image {i}") for i, path in enumerate(args.image)]
    if args.match_image_size is not None:
        if args.width is not None or args.height is not None:
            raise ValueError("give either --width/--height or --match-image-size, not both")
        if not 0 <= args.match_image_size < len(images):
            raise ValueError(f"--match-image-size {args.match_image_size}: there are {len(images)} input images")
    return images


def report(result, as_json: bool) -> None:
    """Saved paths and seeds on stdout (or one JSON object); withheld outputs and cancellation on stderr."""
    if as_json:
        print(json.dumps({
            "outputs": [None if p is None else str(p) for p in result.paths],
            "images": [out.record.to_dict() for out in result.outputs],
            "cancelled": result.cancelled,
        }))  # fmt: skip
    for path, out in zip(result.paths, result.outputs, strict=True):
        if out.flagged is not None:
            print(f"withheld seed {out.record.seed}: {out.flagged.detail}", file=sys.stderr)
        elif not as_json:
            print(f"saved {path} (seed {out.record.seed})")
    if result.cancelled:
        print(f"cancelled after {len(result.outputs)} image(s)", file=sys.stderr)
