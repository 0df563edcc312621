"""`flux2 img2img`, `flux2 inpaint` and `flux2 outpaint`: edit one source image, as `Flux2Pipeline.img2img`,
`.inpaint` and `.outpaint` do. Each mode's own options (strength, mask blur, crop padding, margins) come from the
request fields that mode takes (`Param.modes`); the model, feature and output options are `flux2 generate`'s."""

import argparse
from collections.abc import Callable
from pathlib import Path

from flux2.cli.generate import _output_options, check_side_files, exit_status, report, report_acceleration
from flux2.cli.options import add_feature_options, add_model_options, add_parallel_options, model_name, open_pipeline
from flux2.cli.output import output_target
from flux2.cli.request_options import add_request_options, flag, offered, request_from_args, resolved_for_flags
from flux2.registry import model_info
from flux2.request import ALL, GenerationRequest

MARGIN_FLAGS = "--left/--right/--top/--bottom"
SUBCOMMANDS = {
    "img2img": ("image to image: start from the source noised to --strength", """examples:
  flux2 img2img "an oil painting" -i photo.png --strength 0.6 -o painting.png
  flux2 img2img "winter" -i photo.png --seeds 1,2,3 -o variants/
"""),
    "inpaint": ("regenerate where the mask is white, keep the source exactly where it is black", """examples:
  flux2 inpaint "a red hat" -i portrait.png --mask hat.png -o hat.png
  flux2 inpaint "a cat" -i room.jpg --mask sofa.png --crop-padding 32 --mask-blur 4   # edit only the mask's box
"""),
    "outpaint": ("extend the canvas and fill the new border", """examples:
  flux2 outpaint "a wide beach" -i beach.png --left 256 --right 256 -o wide.png
"""),
}  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction) -> None:
    for mode, (summary, examples) in SUBCOMMANDS.items():
        p = sub.add_parser(
            mode,
            help=summary,
            description=summary,
            epilog=examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("prompt", help="what the edited image shows")
        p.add_argument("-i", "--image", type=Path, required=True, help="the source image (the output takes its size)")
        if mode == "inpaint":
            p.add_argument("--mask", type=Path, required=True, help="white: regenerate, black: keep exactly; "
                           "the source's size or aspect ratio")  # fmt: skip
        add_request_options(p, mode)
        add_model_options(p)
        add_parallel_options(p)
        add_feature_options(p)
        _output_options(p)
        p.set_defaults(handler=run, mode=mode)


def run(args: argparse.Namespace) -> int:
    # As for `flux2 generate`: everything a user can get wrong fails here, before minutes of loading.
    name = model_name(args)
    target = output_target(args.output, args.format)
    request = resolved_for_flags(edit_request(args), model_info(name))
    check_side_files(request, args, name)
    from flux2.cli.run import generate_and_save  # torch and the models' code: only once the input is known good
    from flux2.progress import TerminalProgress

    with TerminalProgress(enabled=not args.json) as progress:
        pipe, applied = open_pipeline(args, name, progress=progress)
    result = generate_and_save(pipe, target, request, sidecar=args.sidecar, show_progress=not args.json)
    report_acceleration(applied)
    report(result, as_json=args.json)
    return exit_status(result)


def edit_request(args: argparse.Namespace) -> GenerationRequest:
    """The request, with the source, the mask and the mode's own settings checked under their flags' names."""
    from flux2.editing import binary_mask, outpaint_canvas
    from flux2.images import open_image, open_mask

    mode = args.mode
    for name, spec in offered(mode).items():
        if spec.modes != ALL:  # the mode's own settings; the shared ones read as in `flux2 generate`
            spec.check(flag(name), getattr(args, name))
    source = open_image(args.image, "-i/--image")
    inputs = {"image": str(args.image)}
    if mode == "inpaint":
        _under("--mask", lambda: binary_mask(open_mask(args.mask), source.size))
        inputs["mask"] = str(args.mask)
    if mode == "outpaint":
        margins = {side: getattr(args, side) or 0 for side in ("left", "right", "top", "bottom")}
        if not any(margins.values()):
            raise ValueError(f"outpaint needs at least one of {MARGIN_FLAGS} above 0 (px to add on that side)")
        _under(MARGIN_FLAGS, lambda: outpaint_canvas(source, **margins))
    return request_from_args(args, mode, prompt=args.prompt, **inputs)


def _under(flags: str, check: Callable[[], object]) -> None:
    """Run a check of the engine's; its error names the option it is about."""
    try:
        check()
    except ValueError as err:
        raise ValueError(f"{flags}: {err}") from None
