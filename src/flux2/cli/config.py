"""The REPL's settings: the reference CLI's `Config` keys and key=value parsing, over a GenerationRequest.

The generation settings are the request's own fields (their types, ranges and model rules come from
flux2.request); the REPL adds the reference's names for two of them (`input_images` for reference_images), its
startup size, and the prompt-upsampling choice, which picks an upsampler rather than describing an image.
"""

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from flux2.registry import ModelInfo
from flux2.request import GenerationRequest, LoraChoice, request_params

DEFAULT_PROMPT = (
    "a photo of a forest with mist swirling around the tree trunks. The word 'FLUX.2' is painted over it in big, "
    "red brush strokes with visible texture"
)
REFERENCE_SIZE = {"width": 1360, "height": 768}  # the reference REPL's startup size (spec §9.2)
UPSAMPLE_MODES = ("none", "local", "openrouter")
# The reference's keys (REPL name -> request field), then every other option the CLI offers.
REFERENCE_KEYS = {
    "prompt": "prompt", "seed": "seed", "width": "width", "height": "height", "num_steps": "num_steps",
    "guidance": "guidance", "input_images": "reference_images", "match_image_size": "match_image_size",
}  # fmt: skip
REPL_KEYS = REFERENCE_KEYS | {name: name for name, spec in request_params().items() if spec.cli}
SESSION_KEYS = ("upsample_prompt_mode", "openrouter_model")  # the upsampler, not the image

Say = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    """The session's request plus its upsampling choice."""

    request: GenerationRequest = field(
        default_factory=lambda: GenerationRequest(prompt=DEFAULT_PROMPT, **REFERENCE_SIZE)
    )
    upsample_prompt_mode: str = "none"
    openrouter_model: str = "mistralai/pixtral-large-2411"

    @classmethod
    def for_model(cls, info: ModelInfo) -> "Config":
        """The defaults with the model's steps and guidance, as the reference's startup and `reset` apply them."""
        return cls(replace(cls().request, num_steps=info.num_steps, guidance=info.guidance))

    def get(self, key: str) -> object:
        return getattr(self, key) if key in SESSION_KEYS else getattr(self.request, REPL_KEYS[key])

    def with_values(self, values: dict[str, object]) -> "Config":
        session = {key: value for key, value in values.items() if key in SESSION_KEYS}
        fields = {REPL_KEYS[key]: value for key, value in values.items() if key not in SESSION_KEYS}
        return replace(self, request=replace(self.request, **fields), **session)

    def to_request(self) -> GenerationRequest:
        """What a run asks for: with match_image_size the reference image's size replaces width and height."""
        if self.request.match_image_size is not None:
            return replace(self.request, width=None, height=None)
        return self.request


ALL_KEYS = (*REFERENCE_KEYS, *SESSION_KEYS, *(key for key in REPL_KEYS if key not in REFERENCE_KEYS))


def parse_key_values(line: str, say: Say = print) -> dict[str, object]:
    """`key=value` tokens (split as a shell would) coerced to the field's type; a token without `=` maps to
    True (a bare command). Unknown keys are reported and skipped; a value that does not fit raises ValueError."""
    parsed: dict[str, object] = {}
    for token in shlex.split(line):
        if "=" not in token:
            parsed[token] = True
            continue
        key, raw = token.split("=", 1)
        if key not in ALL_KEYS:
            say(f"! unknown key: {key}")
            continue
        parsed[key] = coerce_value(key, raw, say)
    return parsed


def coerce_value(key: str, raw: str, say: Say = print) -> object:
    """The reference's coercions: ints ("none" or empty is None), floats, input_images a list of existing
    paths, the upsampling mode lower-cased and checked, everything else the raw string."""
    if key == "upsample_prompt_mode":
        mode = raw.strip().lower()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_prompt_mode must be one of {', '.join(UPSAMPLE_MODES)}, got {raw!r}")
        return mode
    if key == "openrouter_model":
        return raw.strip().strip("\"'")
    spec = request_params()[REPL_KEYS[key]]
    kind = spec.kind
    if kind is tuple:
        return tuple(_existing_images(raw, say))
    if kind is LoraChoice:
        return tuple(_existing_loras(raw))
    if spec.many:  # seed_list=1,2,3 (or [1, 2, 3]; [] clears)
        items = [item.strip() for item in raw.strip().removeprefix("[").removesuffix("]").split(",") if item.strip()]
        return tuple(coerce_one(key, item, kind) for item in items)
    return coerce_one(key, raw, kind)


def coerce_one(key: str, raw: str, kind: type) -> object:
    if kind in (int, float) and raw.strip().lower() in ("", "none"):
        return None
    try:
        return kind(raw) if kind in (int, float) else raw
    except ValueError:
        what = "an integer (or none)" if kind is int else "a number"
        raise ValueError(f"{key} must be {what}, got {raw!r}") from None


def _existing_images(raw: str, say: Say) -> list[Path]:
    """`a.png,b.png`, `"a.png b.png"`, `[a.png, b.png]`; `[]` or nothing clears. Missing files are skipped."""
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    if not raw.strip():
        return []
    pieces = raw.split(",") if "," in raw and " " not in raw else shlex.split(raw)
    paths = [Path(part.strip()) for piece in pieces for part in piece.split(",") if part.strip()]
    found = [path for path in paths if _is_file(path)]
    for path in paths:
        if path not in found:
            say(f"File {path} not found. Skipping for now. Please check your path")
    return found


def _existing_loras(raw: str) -> list[LoraChoice]:
    """`a.safetensors:0.8,b.safetensors` (or separated by spaces); `[]` or nothing clears. A missing file is an
    error: a LoRA left out silently would make a different image than the one asked for."""
    raw = raw.strip().removeprefix("[").removesuffix("]")
    pieces = [part.strip() for piece in shlex.split(raw) for part in piece.split(",") if part.strip()]
    loras = [LoraChoice.parse(piece) for piece in pieces]
    if missing := [lora.path for lora in loras if not _is_file(Path(lora.path))]:
        raise ValueError(f"loras: no such file: {', '.join(missing)}")
    return loras


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system
        return False


def updated(config: Config, updates: dict[str, object], info: ModelInfo) -> Config:
    """`config` with `updates` applied, or ValueError naming what the model does not allow (nothing changes)."""
    new = config.with_values(updates)
    validate(new, info)
    return new


def validate(config: Config, info: ModelInfo) -> None:
    request = config.request
    if request.width is None or request.height is None:
        raise ValueError("width and height need a value (a multiple of 16)")
    if request.num_steps is None:
        raise ValueError("num_steps needs a value (a positive integer)")
    replace(config.to_request(), match_image_size=None).check_model(info)  # the index is checked at the run


def format_config(config: Config, names: tuple[str, ...] = ALL_KEYS) -> str:
    """One `name  value` line per setting (or per setting in `names`)."""
    lines = []
    for name in names:
        value = config.get(name)
        if name == "input_images":
            value = "[" + ", ".join(str(p) for p in value) + "]"
        elif name == "loras":
            value = "[" + ", ".join(str(lora) for lora in value) + "]"
        elif name == "seed" and value is None:
            value = "None (random)"
        lines.append(f"  {name:21} {value}")
    return "\n".join(lines)
