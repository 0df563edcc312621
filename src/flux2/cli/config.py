"""The REPL's settings: the reference CLI's `Config`, its key=value parsing, its coercions and its checks."""

import shlex
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from flux2.registry import ModelInfo
from flux2.settings import check_settings

DEFAULT_PROMPT = (
    "a photo of a forest with mist swirling around the tree trunks. The word 'FLUX.2' is painted over it in big, "
    "red brush strokes with visible texture"
)
UPSAMPLE_MODES = ("none", "local", "openrouter")
INT_FIELDS = ("seed", "width", "height", "num_steps", "match_image_size")

Say = Callable[[str], None]


@dataclass(frozen=True)
class Config:
    """The reference's fields and defaults (spec §9.2), plus `negative_prompt` for the klein base models."""

    prompt: str = DEFAULT_PROMPT
    seed: int | None = None  # None: a random seed, printed and stored with the image
    width: int = 1360
    height: int = 768
    num_steps: int = 50
    guidance: float = 4.0
    input_images: tuple[Path, ...] = ()
    match_image_size: int | None = None  # use the size of this input image instead of width/height
    upsample_prompt_mode: str = "none"
    openrouter_model: str = "mistralai/pixtral-large-2411"
    negative_prompt: str = ""  # ours: the reference's CFG always used the empty prompt

    @classmethod
    def for_model(cls, info: ModelInfo) -> "Config":
        """The defaults with the model's steps and guidance, as the reference's startup and `reset` apply them."""
        return cls(num_steps=info.num_steps, guidance=info.guidance)


FIELD_NAMES = tuple(f.name for f in fields(Config))


def parse_key_values(line: str, say: Say = print) -> dict[str, object]:
    """`key=value` tokens (split as a shell would) coerced to the field's type; a token without `=` maps to
    True (a bare command). Unknown keys are reported and skipped; a value that does not fit raises ValueError."""
    parsed: dict[str, object] = {}
    for token in shlex.split(line):
        if "=" not in token:
            parsed[token] = True
            continue
        key, raw = token.split("=", 1)
        if key not in FIELD_NAMES:
            say(f"! unknown key: {key}")
            continue
        parsed[key] = coerce_value(key, raw, say)
    return parsed


def coerce_value(key: str, raw: str, say: Say = print) -> object:
    """The reference's coercions: ints ("none" or empty is None), guidance a float, input_images a list of
    existing paths, the upsampling mode lower-cased and checked, everything else the raw string."""
    if key in INT_FIELDS:
        if raw.strip().lower() in ("", "none"):
            return None
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{key} must be an integer (or none), got {raw!r}") from None
    if key == "guidance":
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"guidance must be a number, got {raw!r}") from None
    if key == "input_images":
        return tuple(_existing_images(raw, say))
    if key == "upsample_prompt_mode":
        mode = raw.strip().lower()
        if mode not in UPSAMPLE_MODES:
            raise ValueError(f"upsample_prompt_mode must be one of {', '.join(UPSAMPLE_MODES)}, got {raw!r}")
        return mode
    if key == "openrouter_model":
        return raw.strip().strip("\"'")
    return raw


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


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system
        return False


def updated(config: Config, updates: dict[str, object], info: ModelInfo) -> Config:
    """`config` with `updates` applied, or ValueError naming what the model does not allow (nothing changes)."""
    new = replace(config, **updates)
    validate(new, info)
    return new


def validate(config: Config, info: ModelInfo) -> None:
    if config.width is None or config.height is None:
        raise ValueError("width and height need a value (a multiple of 16)")
    if config.num_steps is None:
        raise ValueError("num_steps needs a value (a positive integer)")
    check_settings(
        info, width=config.width, height=config.height, num_steps=config.num_steps, guidance=config.guidance,
        seed=config.seed, negative_prompt=config.negative_prompt,
    )  # fmt: skip
    if config.match_image_size is not None and config.match_image_size < 0:
        raise ValueError(
            f"match_image_size must be an input image index (0, 1, ...) or none, got {config.match_image_size}"
        )


def format_config(config: Config, names: tuple[str, ...] = FIELD_NAMES) -> str:
    """One `name  value` line per field (or per field in `names`)."""
    lines = []
    for name in names:
        value = getattr(config, name)
        if name == "input_images":
            value = "[" + ", ".join(str(p) for p in value) + "]"
        elif name == "seed" and value is None:
            value = "None (random)"
        lines.append(f"  {name:21} {value}")
    return "\n".join(lines)
