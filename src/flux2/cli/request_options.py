"""The generation options of `flux2 generate` / `flux2 edit` and of the editing subcommands, made from
GenerationRequest's fields: a new request field with `cli=True` becomes an option here with its type, choices and
help, and a field only some editing modes take (`Param.modes`) becomes an option of those modes' subcommands."""

import argparse
import re

from flux2.registry import DEFAULT_MODEL, ModelInfo, model_info
from flux2.request import ALL, LARGE_PIXELS, GenerationRequest, LoraChoice, Param, request_params

MP = 1024**2


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def offered(mode: str = "generate") -> dict[str, Param]:
    """The fields a subcommand for `mode` offers: those marked `cli` that the mode takes, and the settings of the
    mode's own (fields that only some modes take), except images, which each subcommand names itself."""
    return {
        name: spec for name, spec in request_params().items()
        if mode in spec.modes and (spec.cli or spec.modes != ALL) and spec.kind not in (object, tuple)
    }  # fmt: skip


def add_request_options(p: argparse.ArgumentParser, mode: str = "generate") -> None:
    for name, spec in offered(mode).items():
        names = [flag(name)] + ([spec.flag_alias] if spec.flag_alias else [])
        help = f"{spec.help}. Allowed: {spec.describe()}"
        p.add_argument(*names, dest=name, default=None, help=help, **_argument(spec))
    if mode == "generate":
        p.add_argument("--force", action="store_true",
                       help=f"run a size above {LARGE_PIXELS / MP:g} MP (many minutes, tens of GB)")  # fmt: skip


def _argument(spec: Param) -> dict:
    if spec.kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if spec.kind is LoraChoice:  # repeatable: --lora style.safetensors:0.8 --lora detail.safetensors
        return {"type": LoraChoice.parse, "action": "append", "metavar": "PATH[:STRENGTH]"}
    if spec.many:  # --seeds 1,2,3
        return {"type": _comma_list(spec.kind), "metavar": "N,N,..."}
    return {"type": spec.kind, "choices": spec.choices or None, "metavar": "|".join(spec.choices) or None}


def _comma_list(kind: type):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(item) for item in text.split(",") if item.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"a comma-separated list of {kind.__name__} values, got {text!r}"
            ) from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def resolved_for_flags(request: GenerationRequest, info) -> GenerationRequest:
    """`request.resolve(info)`, its errors naming the options a user types (`--num-steps`) rather than the fields."""
    try:
        return request.resolve(info)
    except ValueError as err:
        raise ValueError(in_flag_words(str(err))) from None


def in_flag_words(message: str) -> str:
    """A request error in the CLI's words: the field it starts with, and every field name with an underscore
    (unmistakably a name, unlike `seed` or `prompt` in a sentence), become the option's flag."""
    options = {name for name, spec in request_params().items() if spec.cli}
    field, space, rest = message.partition(" ")
    if (name := field.split("[")[0]) in options:
        message = f"{flag(name)}{field[len(name) :]}{space}{rest}"
    for name in sorted((n for n in options if "_" in n), key=len, reverse=True):
        message = re.sub(rf"(?<![-\w]){name}\b", flag(name), message)
    return message


def request_from_args(args: argparse.Namespace, mode: str = "generate", **more) -> GenerationRequest:
    """The request the options describe (options not given keep the request's defaults); a size above
    LARGE_PIXELS without --force fails here, before anything loads."""
    given = {name: getattr(args, name, None) for name in offered(mode)}
    if given.get("seed_list") and (given.get("seed") is not None or given.get("num_images") is not None):
        raise ValueError("give either --seeds or --seed/--num-images, not both")
    settings = {k: v for k, v in given.items() if v is not None} | ({"mode": mode} if mode != "generate" else {})
    request = GenerationRequest.from_settings(mode, **settings, **more)
    if mode == "generate" and not getattr(args, "force", False):
        check_size(request, model_info(getattr(args, "model", None) or DEFAULT_MODEL))
    return request


def check_size(request: GenerationRequest, info: ModelInfo) -> None:
    """A text-to-image size above LARGE_PIXELS asks for --force rather than running for many minutes silently."""
    if request.match_image_size is not None:
        return  # the size of a reference image, known once it is opened
    width, height = request.width or info.width, request.height or info.height
    if width * height > LARGE_PIXELS:
        raise ValueError(
            f"--width {width} --height {height} is {width * height / MP:.1f} MP, above {LARGE_PIXELS / MP:g} MP: "
            f"about {width * height / MP:.0f}x the tokens of a 1 MP image, so many minutes per image and tens of GB "
            "of memory (attention grows with the square of the tokens); add --force to run it anyway"
        )
