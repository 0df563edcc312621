"""`flux2 generate` and `flux2 edit`: one run for scripts and pipelines, then exit."""

import argparse
import json
import sys
from pathlib import Path

from flux2.cli.options import add_feature_options, add_model_options, add_parallel_options, model_name, open_pipeline
from flux2.cli.output import FORMATS, output_target
from flux2.cli.request_options import add_request_options, request_from_args, resolved_for_flags
from flux2.registry import model_info

NOTHING_WRITTEN = 3  # exit status when the safety policy withheld every image
SAVE_FAILED = 4  # exit status when an image could not be saved where asked (it was saved elsewhere)
GENERATE_EXAMPLES = """examples:
  flux2 generate "a red fox in the snow" --seed 7 -o fox.png
  flux2 generate "a bakery sign at dawn" --model flux.2-klein-base-4b --steps 28 --negative-prompt blurry
  flux2 generate "a lighthouse" --num-images 4 --format jpeg -o shots/ --json
  flux2 generate --prompt-file prompts.txt --seed 7 -o shots/      # one image per line, batched
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
        add_parallel_options(p)
        add_feature_options(p)
        _output_options(p)
        p.set_defaults(handler=run)


def _request_options(p: argparse.ArgumentParser, images_required: bool) -> None:
    p.add_argument("prompt", nargs="?", help="what to make (or --prompt-file)")
    p.add_argument("--prompt-file", type=Path, help="a text file of prompts, one per line (# starts a comment)")
    p.add_argument(
        "-i", "--image", action="append", default=[], type=Path, required=images_required,
        help="reference image (repeat for several)",
    )  # fmt: skip
    add_request_options(p)


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", type=Path, help="image file, or a folder (default: output/)")
    p.add_argument("--format", choices=sorted(FORMATS), help="image format when -o is a folder (default: png)")
    p.add_argument("--sidecar", action="store_true", help="also write the metadata to IMAGE.json")
    p.add_argument("--json", action="store_true", help="print one JSON object: output paths and every parameter")


def run(args: argparse.Namespace) -> int:
    # Everything a user can get wrong fails here, before minutes of loading; the seed is drawn here, once.
    name = model_name(args)
    target = output_target(args.output, args.format)
    check_weights_dir(args.weights_dir, name)
    images = open_inputs(args.image)
    prompts = read_prompts(args.prompt, args.prompt_file)
    request = resolved_for_flags(request_from_args(args, prompt=prompts[0], reference_images=images), model_info(name))
    for prompt in prompts[1:]:
        request.with_inputs(prompt=prompt)  # each line is checked (its length) before anything loads
    check_side_files(request, args, name)
    from flux2.cli.run import generate_and_save  # torch and the models' code: only once the input is known good
    from flux2.progress import TerminalProgress

    with TerminalProgress(enabled=not args.json) as progress:
        pipe, applied = open_pipeline(args, name, progress=progress)
    many = prompts if args.prompt_file else None
    result = generate_and_save(pipe, target, request, sidecar=args.sidecar, show_progress=not args.json, prompts=many)
    report_acceleration(applied)
    report(result, as_json=args.json)
    return exit_status(result)


def exit_status(result) -> int:
    """0, or: an image saved elsewhere than asked, a cancelled run (130), every image withheld."""
    if result.rescued:
        return SAVE_FAILED
    if result.cancelled:
        return 130
    return NOTHING_WRITTEN if result.outputs and all(path is None for path in result.paths) else 0


def read_prompts(prompt: str | None, prompt_file: Path | None) -> list[str]:
    """The prompt, or the file's non-empty lines that are not comments."""
    if (prompt is None) == (prompt_file is None):
        raise ValueError("give a prompt or --prompt-file, not both" if prompt else "give a prompt (or --prompt-file)")
    if prompt_file is None:
        return [prompt]
    try:
        lines = prompt_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--prompt-file {prompt_file}: cannot read it ({err})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"--prompt-file {prompt_file} has no prompts (one per line; # starts a comment)")
    return prompts


def open_inputs(paths: list[Path]) -> tuple:
    """Each -i image, opened now: a wrong path fails before the model loads, saying where it was looked for."""
    from flux2.images import open_image

    images = []
    for i, path in enumerate(paths):
        try:
            images.append(open_image(path, f"input image {i}"))
        except ValueError as err:
            where = "" if path.is_absolute() else f", relative to {Path.cwd()}"
            raise ValueError(f"-i {path}: {err} (check the path{where})") from None
    return tuple(images)


def check_weights_dir(weights_dir: Path | None, name: str) -> None:
    """--weights-dir (or $FLUX2_WEIGHTS_DIR) is a folder, checked before anything loads (for models with files)."""
    from flux2.weights import resolve_weights_dir

    if model_info(name).needs_files:
        resolve_weights_dir(weights_dir)


def report_acceleration(applied) -> None:
    """What the speed and memory settings did, on stderr."""
    if applied.step_cache is not None:
        stats = applied.step_cache.stats
        print(f"step cache: skipped {stats['skipped']} of {stats['calls']} transformer calls (last image)",
              file=sys.stderr)  # fmt: skip
    if applied.memory is not None:
        print(f"peak memory per stage ({applied.memory.source}):\n{applied.memory.format()}", file=sys.stderr)


def check_side_files(request, args: argparse.Namespace, name: str) -> None:
    """What a run reads besides the image model's weights, checked before those load: the LoRAs, the models that
    --safety and --upsample load (here, or the Hub reachable), and the signing certificate and key of the Content
    Credentials (FLUX2_C2PA_CERT / FLUX2_C2PA_KEY)."""
    from flux2.content_credentials import check_signing
    from flux2.side_models import check_side_models, side_models_needed

    check_lora_files(request.loras)
    needed = side_models_needed(model_info(name), args.safety, args.upsample, args.nsfw_model, args.upsample_model)
    check_side_models(needed, fetch_command=fetch_command(name, args))
    check_signing()


def fetch_command(name: str, args: argparse.Namespace) -> str:
    """The `flux2 download` command that fetches what these options load."""
    given = {"--safety": args.safety, "--upsample": args.upsample, "--nsfw-model": args.nsfw_model,
             "--upsample-model": args.upsample_model}  # fmt: skip
    unset = ("off", "none", None)
    return " ".join(
        ["flux2 download", name, *(f"{flag} {value}" for flag, value in given.items() if value not in unset)]
    )


def check_lora_files(loras) -> None:
    """Each --lora file is there and reads as a LoRA (its keys), before the model loads."""
    from flux2.checkpoints.lora import load_lora

    for lora in loras:
        if not Path(lora.path).is_file():
            raise ValueError(f"--lora {lora.path}: no such file")
        load_lora(lora.path)


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
    for line in result.rescued:
        print(f"error: {line}", file=sys.stderr)
    if result.cancelled:
        print(f"cancelled after {len(result.outputs)} image(s)", file=sys.stderr)
