"""`flux2 repl`: the reference's interactive session, with its settings, commands and messages.

Type a prompt to set it, `key=value` to change settings, an empty line to generate. Models stay loaded
between runs; Ctrl-C cancels a run and comes back here.
"""

import argparse
import getpass
import os
import shlex
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from flux2.cli.config import Config, format_config, parse_key_values, updated, validate
from flux2.cli.errors import describe
from flux2.cli.options import add_feature_options, add_model_options, open_pipeline, upsampler_for
from flux2.cli.output import FORMATS, Target, output_target
from flux2.registry import DEFAULT_MODEL, FLUX2_MODEL_INFO, ModelInfo, model_info

COMMANDS = {"run", "show", "reset", "quit", "q", "exit", "help", "h", "?"}
WEIGHTS_HINT = "FLUX2_WEIGHTS_DIR or --weights-dir"
MISSING_FILE = "File "  # how config.parse_key_values starts its line about an input image that is not there
HISTORY_FILE = Path("~/.flux2_history")
HELP = """\
Type a prompt to set it; an empty line (or `run`) generates an image.
Change settings with key=value, several per line:  seed=42 width=1024 height=768
  prompt, negative_prompt   text; quote it when it has spaces and `=`: prompt="a=b"
  seed                      an integer, or none for a new random seed each run (always printed)
  width, height             multiples of 16
  num_steps, guidance       fixed on the distilled models
  input_images              a.png,b.png  or  "a.png b.png";  [] clears
  match_image_size          the index of the input image whose size to use, or none
  upsample_prompt_mode      none, local or openrouter;  openrouter_model=NAME
  num_images, true_cfg_scale, cfg_mode, ...   every option of `flux2 generate`, by its name
Commands: run, show, reset (the defaults), help (h, ?), quit (q, exit).
Ctrl-C cancels a run; the model stays loaded.
"""
REPL_EXAMPLES = """examples:
  flux2 repl --model flux.2-klein-4b
  flux2 repl --model flux.2-klein-base-4b seed=7 width=1024 height=1024
  flux2 repl --model tiny --single-eval --prompt "a red fox"
"""


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "repl", help="interactive session (the default at a terminal)", description=__doc__,
        epilog=REPL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="starting settings, e.g. seed=7 width=1024")
    p.add_argument("--prompt", help="the starting prompt")
    p.add_argument("--single-eval", action="store_true", help="generate once with the settings, then exit")
    p.add_argument("--debug-mode", action="store_true", help="a one-block transformer with random weights")
    add_model_options(p)
    add_feature_options(p)
    p.add_argument("-o", "--output", type=Path, help="folder for the images (default: output/)")
    p.add_argument("--format", choices=sorted(FORMATS), help="image format (default: png)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    target = output_target(args.output, args.format)  # before the menu: a bad -o costs nothing
    opened = open_chosen_model(args)
    if opened is None:
        print("bye!")
        return 0
    session = Session(*opened, target, args)
    if args.single_eval:
        return 0 if session.generate() else 1
    return session.loop()


def open_chosen_model(args: argparse.Namespace):
    """(pipeline, starting settings) of --model, or of the model chosen from the menu; a menu choice whose weights
    cannot be found says what to set and shows the menu again. None when the menu is left."""
    from flux2.checkpoints import CheckpointError
    from flux2.weights import WeightsDownloadError, WeightsNotFoundError, resolve_weights_dir

    weights_dir = None if args.model else resolve_weights_dir(args.weights_dir)  # only the menu looks
    while (name := args.model or choose_model(weights_dir)) is not None:
        info = model_info(name)
        config = starting_config(args, info)
        print(format_config(config))
        try:
            return _open(args, info), config
        except (WeightsNotFoundError, WeightsDownloadError, CheckpointError) as err:
            if args.model:  # named on the command line: a script wants the error and the exit status
                raise
            print(f"! {describe(err)}\n! choose another model, or set what the message names and start again")
    return None


def _open(args: argparse.Namespace, info: ModelInfo):
    from flux2.progress import TerminalProgress

    with TerminalProgress() as progress:
        flow_model = _debug_model(info.name, args.device) if args.debug_mode else None
        return open_pipeline(args, info.name, progress=progress, flow_model=flow_model)[0]


def model_marks(weights_dir: Path | None) -> dict[str, str]:
    """Which models' weights are on this machine (variables, weights folder, Hugging Face cache), never fetching."""
    from flux2.weights import local_parts

    marks = {}
    for name, info in FLUX2_MODEL_INFO.items():
        if not info.needs_files:
            marks[name] = "built in"
            continue
        parts = local_parts(info, weights_dir).values()
        here = sum(part.present for part in parts)
        marks[name] = "here" if here == len(parts) else f"{here}/{len(parts)} here" if here else "not here"
    return marks


def choose_model(weights_dir: Path | None = None) -> str | None:
    """The reference's menu, each model marked with whether its weights are here: blank for the first entry, a
    number, or a name; None on EOF or Ctrl-C."""
    names = list(FLUX2_MODEL_INFO)
    marks = model_marks(weights_dir)
    print(f"Available models (here: weights on this machine; others download when chosen, or set {WEIGHTS_HINT}):")
    for i, name in enumerate(names, 1):
        print(f"  {i}. {name:22} {marks[name]:10} {FLUX2_MODEL_INFO[name].description}")
    while True:
        try:
            answer = input(f"Select a model [default: {DEFAULT_MODEL}]: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        if not answer:
            return DEFAULT_MODEL
        if answer.isdigit() and 1 <= int(answer) <= len(names):
            return names[int(answer) - 1]
        if answer.lower() in FLUX2_MODEL_INFO:
            return answer.lower()
        print(f"! unknown model {answer!r}: type a number from 1 to {len(names)} or a name")


def starting_config(args: argparse.Namespace, info: ModelInfo) -> Config:
    """The reference's startup order: defaults, the model's steps and guidance, the settings, the prompt."""
    overrides = parse_key_values(" ".join(shlex.quote(s) for s in args.settings))
    if bare := [key for key, value in overrides.items() if value is True]:
        raise ValueError(f"starting settings must be key=value, got {' '.join(bare)}")
    if args.upsample != "none":
        overrides.setdefault("upsample_prompt_mode", args.upsample)
    if args.upsample == "openrouter" and args.upsample_model:
        overrides.setdefault("openrouter_model", args.upsample_model)
    if args.prompt is not None:
        overrides["prompt"] = args.prompt
    return updated(Config.for_model(info), overrides, info)


def _debug_model(name: str, device: str | None):
    from flux2.util import load_flow_model

    return load_flow_model(name, debug_mode=True, device=device)


class Session:
    """The loop around one loaded pipeline: settings in, images out, the pipeline kept between runs."""

    def __init__(self, pipe, config: Config, target: Target, args: argparse.Namespace):
        self.pipe, self.config, self.target, self.args = pipe, config, target, args
        self.upsamplers: dict[tuple[str, str], object] = {}  # made once per (mode, model), kept for the session
        if pipe.upsampler is not None:  # the one --upsample already loaded
            self.upsamplers[self._upsampler_key()] = pipe.upsampler
        self.api_key: str | None = None

    def loop(self) -> int:
        enable_line_editing()
        while True:
            try:
                line = input("> ")
            except EOFError:
                break
            except KeyboardInterrupt:
                print("\n(quit to leave)")
                continue
            if self.handle_safely(line.strip()) == "quit":
                break
        print("bye!")
        return 0

    def handle_safely(self, line: str) -> str | None:
        """`handle`, where no failure and no Ctrl-C ends the session (the model stays loaded)."""
        try:
            return self.handle(line)
        except KeyboardInterrupt:
            print("\nstopped; the model is still loaded", file=sys.stderr)
        except Exception as err:
            self.report_error(err)
        return None

    def report_error(self, err: Exception) -> None:
        if self.args.verbose:
            traceback.print_exc()
        print(f"ERROR: {type(err).__name__}: {err}", file=sys.stderr)
        print("The model is still loaded. Please fix the error and try again.", file=sys.stderr)

    def handle(self, line: str) -> str | None:
        if not line:
            self.generate()
        elif line in COMMANDS:
            return self.command(line)
        elif "=" not in line:  # a line that is not a setting or a command is the new prompt
            self.update({"prompt": line})
        else:
            return self.settings_line(line)
        return None

    def settings_line(self, line: str) -> str | None:
        parsed = self.parsed(line)
        if parsed is None:
            return None
        pending: dict = {}  # settings and commands take effect in the order they were typed
        for key, value in parsed.items():
            if value is not True:
                pending[key] = value
                continue
            if pending:
                self.update(pending)
                pending = {}
            if key not in COMMANDS:
                print(f"! Unknown command: {key}")
            elif self.command(key) == "quit":
                return "quit"
        if pending:
            self.update(pending)
        return None

    def parsed(self, line: str) -> dict | None:
        """The line's settings and commands, with what parsing said printed; None when a value does not fit."""
        said: list[str] = []
        try:
            parsed = parse_key_values(line, said.append)
        except ValueError as err:
            parsed, said = None, [*said, f"! {err}"]
        for message in said:
            print(message)
        if parsed is not None:
            self.keep_references_if_mistyped(parsed, said)
        return parsed

    def keep_references_if_mistyped(self, parsed: dict, said: list[str]) -> None:
        """An `input_images=` with a path that is not there changes nothing: the earlier references stay."""
        if "input_images" in parsed and any(line.startswith(MISSING_FILE) for line in said):
            del parsed["input_images"]
            earlier = ", ".join(map(str, self.config.request.reference_images)) or "none"
            print(f"! input_images unchanged (still: {earlier}): fix the path and type the whole list again")

    def command(self, word: str) -> str | None:
        if word in ("quit", "q", "exit"):
            return "quit"
        if word == "run":
            self.generate()
        elif word == "show":
            print(format_config(self.config))
        elif word == "reset":
            self.config = Config.for_model(self.pipe.info)
            print(format_config(self.config))
        else:
            print(HELP)
        return None

    def update(self, updates: dict) -> None:
        """Screen new content, check the new settings against the model, then commit (never runs)."""
        updates = self.screened(updates)
        try:
            self.config = updated(self.config, updates, self.pipe.info)
        except ValueError as err:
            print(f"ERROR: {err}\nThe settings are unchanged.", file=sys.stderr)
            return
        if updates:  # the settings that changed; `show` prints them all
            print(format_config(self.config, tuple(updates)))

    def screened(self, updates: dict) -> dict:
        """The reference's moderation of a new prompt and new input images (when safety is on)."""
        from flux2.images import open_image

        safety = self.pipe.safety
        if safety.mode == "off":
            return updates
        updates = dict(updates)
        if "prompt" in updates and safety.check_prompt(updates["prompt"]) is not None:
            print("Your prompt has been flagged for potential copyright or public personas concerns. "
                  "Please choose another.")  # fmt: skip
            del updates["prompt"]
        for path in updates.get("input_images", ()):
            if safety.check_reference(open_image(path, "input image")) is not None:
                print(f"The image {path} has been flagged as unsuitable. Please choose another.")
                del updates["input_images"]
                break
        return updates

    def generate(self) -> bool:
        """One run with the current settings; any failure is reported and the model stays loaded."""
        try:
            validate(self.config, self.pipe.info)
            self._generate()
            return True
        except KeyboardInterrupt:
            print("\nstopped; the model is still loaded", file=sys.stderr)
        except Exception as err:
            self.report_error(err)
        return False

    def _generate(self) -> None:
        from flux2.cli.run import generate_and_save

        self.pipe.upsampler = self.upsampler()
        request = self.config.to_request()
        print(f"Generating with prompt: {request.prompt}")
        result = generate_and_save(self.pipe, self.target, request, sidecar=False, show_progress=True)
        for path, out in zip(result.paths, result.outputs, strict=True):
            record = out.record
            if record.upsampled_prompt:
                print(f"Upsampled prompt: {record.upsampled_prompt}")
            elif record.upsampling_error:
                print(f"! upsampling failed, used the prompt as given: {record.upsampling_error}")
                print("! prompt upsampling is off now (upsample_prompt_mode=... turns it back on)")
                self.config = replace(self.config, upsample_prompt_mode="none")
            if out.flagged is not None:
                print("Your output has been flagged. Please choose another prompt / input image combination")
            else:
                print(f"Saved {path} (seed {record.seed})")
        for line in result.rescued:
            print(f"! {line}", file=sys.stderr)
        if result.cancelled:
            print("Cancelled; the model is still loaded.")

    def _upsampler_key(self) -> tuple[str, str]:
        mode = self.config.upsample_prompt_mode
        return mode, self.config.openrouter_model if mode == "openrouter" else ""

    def upsampler(self):
        """The upsampler for the current mode, made once per (mode, model). OpenRouter asks for a missing key
        once; an upsampler that cannot be made turns upsampling off for the session, as in the reference."""
        if self.config.upsample_prompt_mode == "none":
            return None
        key = self._upsampler_key()
        if key not in self.upsamplers:
            try:
                self.upsamplers[key] = self._make_upsampler()
            except Exception as err:
                print(f"! prompt upsampling is off: {type(err).__name__}: {err}")
                self.config = replace(self.config, upsample_prompt_mode="none")
                return None
        return self.upsamplers[key]

    def _make_upsampler(self):
        from flux2.upsampling import OPENROUTER_API_KEY_ENV

        mode = self.config.upsample_prompt_mode
        if mode != "openrouter":
            return upsampler_for(self.args, self.pipe, mode)
        self.api_key = self.api_key or os.environ.get(OPENROUTER_API_KEY_ENV) or ask_api_key()
        if not self.api_key:
            raise ValueError("no OpenRouter API key")
        return upsampler_for(self.args, self.pipe, mode, model=self.config.openrouter_model, api_key=self.api_key)


def ask_api_key() -> str:
    from flux2.upsampling import OPENROUTER_API_KEY_ENV

    try:
        return getpass.getpass(f"{OPENROUTER_API_KEY_ENV} is not set. OpenRouter API key (blank: no upsampling): ")
    except (EOFError, KeyboardInterrupt):
        return ""


def enable_line_editing() -> None:
    """Arrow keys, editing and a history kept across sessions, where readline exists and a person types."""
    if not sys.stdin.isatty():
        return
    try:
        import atexit
        import readline
    except ImportError:  # Windows without pyreadline
        return
    history = HISTORY_FILE.expanduser()
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(_save_history, readline, history)


def _save_history(readline, history: Path) -> None:
    try:
        readline.write_history_file(history)
    except OSError:
        pass
