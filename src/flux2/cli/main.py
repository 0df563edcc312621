"""Parse the command line and dispatch to a subcommand; every failure ends as one clear line."""

import argparse
import logging
import os
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from flux2 import __version__
from flux2.cli import edit_modes, generate, info, models, repl, serve, worker
from flux2.cli.errors import describe

EXAMPLES = """examples:
  flux2                                              interactive session (the reference's REPL)
  flux2 generate "a red fox in the snow" --seed 7 -o fox.png
  flux2 edit "make it night time" -i fox.png -o night.jpg
  flux2 img2img "an oil painting" -i fox.png --strength 0.6
  flux2 inpaint "a red hat" -i fox.png --mask hat.png
  flux2 outpaint "a wide snowfield" -i fox.png --left 256 --right 256
  flux2 generate "a fox" --seeds 1,2,3               one image per seed
  flux2 models                                       what is known, what is here, where
  flux2 download flux.2-klein-4b                     fetch the weights into the Hugging Face cache
  flux2 info fox.png                                 the image's provenance and watermark
  flux2 info fox.png --rerun -o again.png            make the image again from its record
  flux2 serve                                        the studio service on http://127.0.0.1:8000
  flux2 worker --model tiny --database-url postgresql://...   run queued studio jobs (scale-out)
  FLUX2_MODEL=tiny flux2 generate "self-test"        offline, random weights: a noise image
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flux2",
        description="FLUX.2 image generation and editing.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flux2 {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in (repl, generate, edit_modes, models, info, serve, worker):
        command.add_parsers(sub)
    for subparser in sub.choices.values():  # --verbose also after the subcommand, where users type it
        subparser.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log = _show_logs(args.verbose)
    if args.command is None:
        if not sys.stdin.isatty():  # the REPL needs a person at a terminal; scripts name a subcommand
            print("flux2: no terminal for the interactive session: name a subcommand (or run `flux2 repl`)\n",
                  file=sys.stderr)  # fmt: skip
            parser.print_help(sys.stderr)
            return 2
        args = parser.parse_args([*(["--verbose"] if args.verbose else []), "repl"])
    try:
        with logging_redirect_tqdm([log]):  # log lines print above the progress bars, not through them
            return args.handler(args)
    except BrokenPipeError:  # `flux2 models | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")  # nothing more may reach the closed pipe at exit
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.verbose:
            raise
        print(f"error: {describe(err)}", file=sys.stderr)
        return 1


def _show_logs(verbose: bool) -> logging.Logger:
    """Our warnings (and with --verbose our debug logs) on stderr; other libraries keep their own handlers."""
    log = logging.getLogger("flux2")
    for earlier in [h for h in log.handlers if getattr(h, "from_cli", False)]:  # main() run again in-process
        log.removeHandler(earlier)
    handler = logging.StreamHandler()
    handler.from_cli = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    return log
