"""Every generation parameter in one place: its type, default, allowed range, the modes that take it, and what
each model does with it.

`GenerationRequest` is what a caller asks for; None means "the model's default". Every door converts into it
in one place: `Flux2Pipeline.generate(**settings)`, the CLI's options (`flux2.cli.request_options`, built from the
fields below), the REPL's key=value settings, and the studio's request bodies and stored job payloads.

    request = GenerationRequest(prompt="a red fox", seed=7).resolve(model_info("flux.2-klein-4b"))

`check` validates ranges (no model needed); `resolve(info)` checks the model's rules, fills in its defaults and
draws a seed, once; `fitted(info)` drops what a model cannot use and says so (the studio's policy, where a
request comes from a front end made for other models). A resolved request is not resolved again for the same
model, so a seed is validated once and drawn once wherever the request travels.

Nothing here loads weights or opens images: the CLI checks every setting before minutes of loading.
"""

import functools
import math
import random
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from flux2.params import PIXELS_PER_TOKEN
from flux2.registry import ModelInfo

if TYPE_CHECKING:
    from flux2.images import ImageInput
else:
    ImageInput = Any  # flux2.images.ImageInput, named without importing PIL and torch

MAX_SIDE = 4096  # px: 65,536 tokens, beyond what the models were trained for and what one GPU holds
MAX_SEED = 2**63 - 1  # seeds are torch.Generator seeds: a signed 64-bit integer
NEW_SEED_RANGE = 2**31  # a drawn seed: short enough to read and type back
PROMPT_MAX_CHARS = 4000  # the text encoders keep 512 tokens; this is several times that
WORK_PIXELS = 1024**2  # diffusers' inpaint cap: larger sources are edited at about 1 MP and scaled back
TRUE_CFG_DEFAULT = 2.0  # the scale an HTTP client gets when it turns true CFG on without a scale above 1
LORA_STRENGTH_LIMIT = 10.0  # trainers suggest 0.5-1.5; past 10 a LoRA only burns the image (a typo like 80)
# Above this many output pixels a run takes many minutes and tens of GB (tokens grow with the area, attention with
# its square): the CLI asks for --force. The Python API and the studio do not read it.
LARGE_PIXELS = 4 * 1024**2

Mode = Literal["generate", "img2img", "inpaint", "outpaint"]
CfgMode = Literal["auto", "batched", "sequential"]
MODES: tuple[str, ...] = get_args(Mode)
EDIT_MODES = frozenset({"img2img", "inpaint", "outpaint"})
CFG_MODES: tuple[str, ...] = get_args(CfgMode)
STRENGTH_DEFAULT = {"img2img": 0.8, "inpaint": 1.0, "outpaint": 1.0}  # how far back on the schedule an edit starts
ALL, EDITS, GENERATE = frozenset(MODES), EDIT_MODES, frozenset({"generate"})
INPUTS = frozenset({"prompt", "reference_images", "ip_adapter_images", "image", "mask", "loras"})  # with_inputs


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA file and how strongly it applies: 1 as trained, 0 not at all, negative pushes away from it."""

    path: str
    strength: float = 1.0

    @classmethod
    def of(cls, value: object) -> "LoraChoice":
        """From `"path"`, `"path:0.8"`, `(path, 0.8)`, `{"path": ..., "strength": ...}` or a LoraChoice."""
        if isinstance(value, LoraChoice):
            return value
        if isinstance(value, str | Path):
            return cls.parse(str(value))
        if isinstance(value, dict) and set(value) <= {"path", "strength"} and "path" in value:
            return cls(str(value["path"]), value.get("strength", 1.0))
        if isinstance(value, tuple | list) and len(value) == 2 and isinstance(value[0], str | Path):
            return cls(str(value[0]), value[1])
        raise ValueError(f"a LoRA is PATH[:STRENGTH], (path, strength) or {{'path', 'strength'}}, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> "LoraChoice":
        """`PATH[:STRENGTH]`; a colon that is not followed by a number is part of the path (C:\\loras\\a)."""
        path, colon, strength = text.rpartition(":")
        if colon and path:
            try:
                return cls(path, float(strength))
            except ValueError:
                pass
        return cls(text)

    def problem(self) -> str | None:
        if not isinstance(self.path, str) or not self.path:
            return f"its path must be a non-empty file path, got {self.path!r}"
        strength = self.strength
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            return f"its strength must be a number, got {strength!r}"
        if abs(strength) > LORA_STRENGTH_LIMIT:
            return f"its strength must be in [-{LORA_STRENGTH_LIMIT:g}, {LORA_STRENGTH_LIMIT:g}], got {strength!r}"
        return None

    def __str__(self) -> str:
        return f"{self.path}:{self.strength:g}"


@dataclass(frozen=True)
class Param:
    """What one request field accepts: a kind, bounds, and the modes that take it; plus where it is offered."""

    help: str
    kind: type  # int, float, str, bool; object for an image (a file path or a PIL image), tuple for several;
    # LoraChoice for a tuple of LoRAs
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    multiple_of: int | None = None
    max_length: int | None = None
    choices: tuple[str, ...] = ()
    allowed: str = ""  # how to say the range, when the bounds alone read badly
    modes: frozenset[str] = ALL  # modes where a value other than the default may be given
    cli: bool = True  # an option of `flux2 generate` / `flux2 edit`
    flag_alias: str | None = None  # an older or shorter flag for the same option
    many: bool = False  # a tuple of `kind` values, each checked against the bounds (on the CLI: comma-separated)

    def check(self, name: str, value: object) -> None:
        """ValueError naming the field, the value and what is allowed; None (the default) always passes."""
        if value is None or self.kind in (object, tuple):
            return  # images are checked when they are opened
        if self.many:
            for i, item in enumerate(value if isinstance(value, tuple) else [value]):
                replace(self, many=False).check(f"{name}[{i}]", item)
            return
        if self.kind is LoraChoice:
            for i, item in enumerate(value if isinstance(value, tuple) else [value]):
                problem = "it must be a LoraChoice" if not isinstance(item, LoraChoice) else item.problem()
                if problem:
                    raise ValueError(f"{name}[{i}] ({item}): {problem}")
            return
        if not self._fits(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}{self._nearest(value)}")

    def _fits(self, value: object) -> bool:
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is str:
            return isinstance(value, str) and (not self.choices or value in self.choices) and (
                self.max_length is None or len(value) <= self.max_length)  # fmt: skip
        numeric = int if self.kind is int else int | float
        if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
            return False
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.multiple_of is None or value % self.multiple_of == 0)
        )

    def _nearest(self, value: object) -> str:
        """For a number off the grid (a width of 1000): the allowed values either side of it."""
        if self.multiple_of is None or isinstance(value, bool) or not isinstance(value, int | float):
            return ""
        if not math.isfinite(value):
            return ""
        step, low, high = self.multiple_of, self.ge or self.multiple_of, self.le or math.inf
        below, above = math.floor(value / step) * step, math.ceil(value / step) * step
        options = sorted({int(v) for v in (below, above) if low <= v <= high})
        return f" (nearest allowed: {' or '.join(map(str, options))})" if options else ""

    def describe(self) -> str:
        if self.allowed:
            return self.allowed
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.kind is str:
            return f"text of at most {self.max_length} characters" if self.max_length else "text"
        if self.kind is bool:
            return "true or false"
        if self.kind is LoraChoice:
            limit = f"{LORA_STRENGTH_LIMIT:g}"
            return f"LoRA files, each PATH[:STRENGTH] with a strength in [-{limit}, {limit}]"
        low = f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}" if self.gt is not None else ""
        high = f"<= {self.le:g}" if self.le is not None else ""
        what = "an integer" if self.kind is int else "a number"
        return " ".join(part for part in (what, low, "and" if low and high else "", high) if part)

    def json_schema(self) -> dict[str, object]:
        """The bounds as JSON Schema keywords, for the studio's OpenAPI document."""
        schema = {"minimum": self.ge, "exclusiveMinimum": self.gt, "maximum": self.le,
                  "multipleOf": self.multiple_of, "maxLength": self.max_length,
                  "enum": list(self.choices) or None, "description": self.help}  # fmt: skip
        return {key: value for key, value in schema.items() if value is not None}


def param(default: object = None, **spec) -> Any:
    """A request field with its Param; mutable defaults are not allowed here (tuples only)."""
    return field(default=default, metadata={"param": Param(**spec)})


SIDE = dict(kind=int, ge=PIXELS_PER_TOKEN, le=MAX_SIDE, multiple_of=PIXELS_PER_TOKEN,
            allowed=f"a positive multiple of {PIXELS_PER_TOKEN} px, at most {MAX_SIDE}", modes=GENERATE)  # fmt: skip
MARGIN = dict(kind=int, ge=0, le=MAX_SIDE, allowed="a whole number of px >= 0", modes=frozenset({"outpaint"}),
              cli=False)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One generation: text-to-image, multi-reference editing, image-to-image, inpainting or outpainting.

    Image i of `num_images` uses seed + i and is exactly what a single run with that seed gives; `seed_list`
    names each image's seed instead (one image per seed: the prompt is encoded once for all of them).
    """

    prompt: str = param("", kind=str, max_length=PROMPT_MAX_CHARS, help="what to make", cli=False)
    negative_prompt: str | None = param(
        kind=str,
        max_length=PROMPT_MAX_CHARS,
        help="what to steer away from (CFG: klein base models, or true_cfg_scale)",
    )
    width: int | None = param(help="image width (default: the model's)", **SIDE)
    height: int | None = param(help="image height (default: the model's)", **SIDE)
    num_steps: int | None = param(kind=int, ge=1, le=200, allowed="a positive integer, at most 200",
                                  help="denoising steps (default: the model's; fixed on distilled models)",
                                  flag_alias="--steps")  # fmt: skip
    guidance: float | None = param(
        kind=float, ge=0, le=30, help="guidance scale (default: the model's; fixed on distilled models)"
    )
    seed: int | None = param(
        kind=int,
        ge=0,
        le=MAX_SEED,
        allowed=f"an integer in [0, {MAX_SEED}]",
        help="seed of the first image (default: random; always recorded)",
    )
    num_images: int = param(
        1, kind=int, ge=1, allowed="a positive integer", help="images to make; image i uses seed + i"
    )
    seed_list: tuple[int, ...] = param(
        (),
        kind=int,
        ge=0,
        le=MAX_SEED,
        many=True,
        flag_alias="--seeds",
        allowed=f"an integer in [0, {MAX_SEED}] (several: 1,2,3)",
        help="one image per seed, in this order (instead of seed and num_images)",
    )
    reference_images: tuple[ImageInput, ...] = param((), kind=tuple, help="reference images to edit with", cli=False)
    match_image_size: int | None = param(kind=int, ge=0, modes=GENERATE, allowed="a reference image index (0, 1, ...)",
                                         help="use the size of reference image N (0-based)")  # fmt: skip
    true_cfg_scale: float | None = param(
        kind=float,
        gt=1,
        le=30,
        allowed="a number > 1 (1 is the plain run), <= 30",
        help="true CFG on a distilled model or [dev]: about twice the time",
    )
    cfg_mode: CfgMode = param("auto", kind=str, choices=CFG_MODES,
                              help="CFG passes: batched, sequential (less memory), or auto (batched, sequential when "
                                   "out of memory)")  # fmt: skip
    ip_adapter_images: tuple[ImageInput, ...] = param((), kind=tuple, help="IP-Adapter image prompts", cli=False)
    ip_adapter_scale: float = param(
        1.0,
        kind=float,
        ge=0,
        allowed="a finite number >= 0",
        cli=False,
        help="how much the IP-Adapter tokens change the result (0: not at all)",
    )
    loras: tuple[LoraChoice, ...] = param(
        (), kind=LoraChoice, flag_alias="--lora", help="LoRA files to apply, each with a strength (default 1)"
    )
    upsample: bool = param(True, kind=bool, help="use the pipeline's prompt upsampler for this request", cli=False)
    # Editing a source image (every mode but "generate"); the output takes the source's size.
    mode: Mode = param("generate", kind=str, choices=MODES, help="what to do with `image`", cli=False)
    image: ImageInput | None = param(kind=object, modes=EDITS, help="the source image", cli=False)
    mask: ImageInput | None = param(
        kind=object, modes=frozenset({"inpaint"}), cli=False, help="white: regenerate, black: keep exactly"
    )
    strength: float | None = param(
        kind=float,
        gt=0,
        le=1,
        modes=EDITS,
        allowed="a number in (0, 1]",
        cli=False,
        help="how far back on the schedule the edit starts (1: from pure noise)",
    )
    mask_blur: float = param(
        8.0,
        kind=float,
        ge=0,
        le=128,
        modes=frozenset({"inpaint", "outpaint"}),
        cli=False,
        allowed="a number of px >= 0, at most 128",
        help="soft mask edge, in px",
    )
    crop_padding: int | None = param(
        kind=int,
        ge=0,
        modes=frozenset({"inpaint"}),
        cli=False,
        allowed="a whole number of px >= 0",
        help="edit only the mask's box grown by this many px, then paste it back",
    )
    source_as_reference: bool = param(
        True,
        kind=bool,
        modes=frozenset({"inpaint", "outpaint"}),
        cli=False,
        help="the clean source also conditions the model",
    )
    max_pixels: int = param(
        WORK_PIXELS,
        kind=int,
        ge=PIXELS_PER_TOKEN**2,
        modes=EDITS,
        cli=False,
        help="edit at most this many pixels (larger sources are scaled down and back)",
    )
    left: int = param(0, help="outpaint: px added on the left", **MARGIN)
    right: int = param(0, help="outpaint: px added on the right", **MARGIN)
    top: int = param(0, help="outpaint: px added at the top", **MARGIN)
    bottom: int = param(0, help="outpaint: px added at the bottom", **MARGIN)
    # The model `resolve` checked this request for. Not an argument: any `replace` makes a request that is checked
    # again; only `with_inputs` keeps it (a prompt or image files settled later, checked there).
    resolved_for: str | None = field(default=None, init=False, compare=False)

    # ------------------------------------------------------------------ checks

    def check(self) -> "GenerationRequest":
        """Ranges and modes, without a model; returns self."""
        for name, spec in request_params().items():
            spec.check(name, getattr(self, name))
        self._check_mode()
        if self.seed_list and (self.seed is not None or self.num_images not in (1, len(self.seed_list))):
            raise ValueError("give either seed_list (--seeds) or seed and num_images, not both")
        if self.seed is not None and self.seed > MAX_SEED - (self.num_images - 1):
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED - self.num_images + 1}] for "
                             f"{self.num_images} images, got {self.seed!r}")  # fmt: skip
        if self.match_image_size is not None:
            if self.width is not None or self.height is not None:
                raise ValueError("give either width/height or match_image_size, not both")
            if self.match_image_size >= len(self.reference_images):
                raise ValueError(f"match_image_size={self.match_image_size} but there are "
                                 f"{len(self.reference_images)} reference images")  # fmt: skip
        return self

    def _check_mode(self) -> None:
        if self.mode != "generate" and self.image is None:
            raise ValueError(f"{self.mode} needs a source image")
        if self.mode == "inpaint" and self.mask is None:
            raise ValueError("inpaint needs a mask (white: regenerate, black: keep)")
        params = request_params()
        given = [name for name, spec in params.items() if self.mode not in spec.modes
                 and getattr(self, name) != GenerationRequest.__dataclass_fields__[name].default]  # fmt: skip
        if sized := [name for name in given if name in ("width", "height", "match_image_size")]:
            raise ValueError(f"{self.mode} takes its size from the source image: do not pass {', '.join(sized)}")
        if given:
            takes = ", ".join(name for name, spec in params.items() if self.mode in spec.modes)
            raise ValueError(f"{self.mode} does not take {', '.join(given)}; it takes {takes}")
        if self.mode == "outpaint" and self.left + self.right + self.top + self.bottom == 0:
            raise ValueError("outpaint needs at least one margin > 0 (left, right, top or bottom)")

    def check_model(self, info: ModelInfo) -> "GenerationRequest":
        """`check`, then the model's rules: what a distilled model fixes, what only CFG uses."""
        self.check()
        return self._check_rules(info)

    def _check_rules(self, info: ModelInfo) -> "GenerationRequest":
        num_steps = info.num_steps if self.num_steps is None else self.num_steps
        guidance = info.guidance if self.guidance is None else self.guidance
        info.check_fixed(num_steps, guidance)
        if guidance != info.guidance and not info.uses_cfg and not info.params.use_guidance_embed:
            raise ValueError(f"{info.name} has no guidance (no guidance embedding and no CFG): leave guidance at "
                             f"{info.guidance}; for true CFG use true_cfg_scale")  # fmt: skip
        if self.true_cfg_scale is not None and info.uses_cfg:
            raise ValueError(f"{info.name} runs true CFG already: its scale is `guidance`, not true_cfg_scale")
        if self.negative_prompt and not self.runs_cfg(info):
            raise ValueError(f"{info.name} does not use a negative prompt: only CFG does (the klein base models "
                             "always; other models with true_cfg_scale, at twice the cost)")  # fmt: skip
        ip_active = self.ip_adapter_images and self.ip_adapter_scale != 0
        if ip_active and self.cfg_mode == "batched" and self.cfg_scale(info) is not None:
            raise ValueError("IP-Adapter tokens stay out of the unconditional pass: use cfg_mode sequential or auto")
        return self

    # ------------------------------------------------------------------ per-model values

    def resolve(self, info: ModelInfo) -> "GenerationRequest":
        """Checked for `info`, with its defaults filled in and a seed drawn: what runs. Idempotent per model."""
        if self.resolved_for == info.name:
            return self
        return self.check_model(info)._filled(info)

    def _filled(self, info: ModelInfo) -> "GenerationRequest":
        sized = self.mode != "generate" or self.match_image_size is not None  # the size comes from an image
        resolved = replace(
            self,
            width=None if sized else self.width or info.width,
            height=None if sized else self.height or info.height,
            num_steps=info.num_steps if self.num_steps is None else self.num_steps,
            guidance=float(info.guidance if self.guidance is None else self.guidance),
            seed=random.randrange(NEW_SEED_RANGE) if self.seed is None and not self.seed_list else self.seed,
            num_images=len(self.seed_list) or self.num_images,  # the count of images, for code that counts
            negative_prompt=self.negative_prompt or None,  # "" is the default negative, not a request
            strength=self.strength if self.strength is not None else STRENGTH_DEFAULT.get(self.mode),
        )
        return resolved._resolved(info.name)

    def with_inputs(self, **inputs) -> "GenerationRequest":
        """This request with its prompt or images replaced (a service settles files and trigger words when a job
        runs), still resolved: only the new values are checked."""
        if unknown := sorted(inputs.keys() - INPUTS):
            raise ValueError(f"with_inputs takes {', '.join(sorted(INPUTS))}, not {', '.join(unknown)}")
        new = replace(self, **inputs)
        for name, value in inputs.items():
            request_params()[name].check(name, value)
        if new.match_image_size is not None and new.match_image_size >= len(new.reference_images):
            raise ValueError(f"match_image_size={new.match_image_size} but there are "
                             f"{len(new.reference_images)} reference images")  # fmt: skip
        return new._resolved(self.resolved_for)

    def _resolved(self, model: str | None) -> "GenerationRequest":
        object.__setattr__(self, "resolved_for", model)  # frozen: set once, on a request made just now
        return self

    def fitted(self, info: ModelInfo) -> tuple["GenerationRequest", tuple[str, ...]]:
        """This request without what `info` cannot use, and a note for each thing dropped: for front ends that
        send every field to every model. Values out of range are refused first, whatever the model; what is
        left is resolved for `info`."""
        self.check()
        drop: dict[str, object] = {}
        notes = []
        if info.fixed_params and (self.num_steps, self.guidance) != (None, None):
            drop |= {"num_steps": None, "guidance": None}
            notes.append(f"{info.name} is distilled: it runs {info.num_steps} steps at guidance {info.guidance}")
        elif self.guidance is not None and not info.uses_cfg and not info.params.use_guidance_embed:
            drop["guidance"] = None
            notes.append(f"{info.name} has no guidance: guidance_scale not used")
        if self.true_cfg_scale is not None and info.uses_cfg:
            drop["true_cfg_scale"] = None  # its CFG scale is the guidance
        elif self.negative_prompt and self.true_cfg_scale is None and not info.uses_cfg:
            drop["negative_prompt"] = None
            notes.append(f"the negative prompt needs true CFG on {info.name} (true_cfg_scale): not used")
        # Ranges were checked above, before anything was dropped; the model's rules apply to what is left.
        return replace(self, **drop)._check_rules(info)._filled(info), tuple(notes)

    def runs_cfg(self, info: ModelInfo) -> bool:
        return info.uses_cfg or self.true_cfg_scale is not None

    def cfg_scale(self, info: ModelInfo) -> float | None:
        """The CFG scale when two passes run (base models: guidance; others: true_cfg_scale); None for one pass
        (a scale of 1 is the conditional pass alone)."""
        scale = (info.guidance if self.guidance is None else self.guidance) if info.uses_cfg else self.true_cfg_scale
        return None if scale is None or scale == 1.0 else float(scale)

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: `seed_list` as given, else seed, seed + 1, ... for `num_images`."""
        if self.seed_list:
            return list(self.seed_list)
        if self.seed is None:
            raise ValueError("the request has no seed yet: resolve it for a model first")
        return [self.seed + i for i in range(self.num_images)]

    # ------------------------------------------------------------------ conversions

    @classmethod
    def from_settings(cls, what: str = "generate", **settings) -> "GenerationRequest":
        """A request from keyword arguments, with an error that lists the settings when one is unknown."""
        params = request_params()
        if unknown := sorted(settings.keys() - params.keys()):
            raise ValueError(f"{what} does not take {', '.join(unknown)}; it takes {', '.join(sorted(params))}")
        images = {name: tuple(value) for name, value in settings.items() if params[name].kind is tuple
                  or (params[name].many and isinstance(value, list))}  # fmt: skip
        if "loras" in settings:
            images["loras"] = tuple(LoraChoice.of(item) for item in settings["loras"])
        return cls(**{**settings, **images})

    def to_json(self) -> dict[str, object]:
        """JSON-ready fields, and the model it was resolved for (images as paths: a stored request holds no
        pixels)."""
        data = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if "param" in f.metadata and f.metadata["param"].kind in (object, tuple):
                value = _json_images(f.name, value)
            elif f.name == "loras":
                value = [{"path": lora.path, "strength": lora.strength} for lora in value]
            data[f.name] = value
        return data

    @classmethod
    def from_json(cls, data: dict[str, object]) -> "GenerationRequest":
        """A stored request as it was stored: resolved for the model it names, not checked again."""
        names = request_params()
        values = {key: tuple(value) if isinstance(value, list) else value for key, value in data.items()
                  if key in names}  # fmt: skip
        values["loras"] = tuple(LoraChoice.of(item) for item in values.get("loras", ()))
        return cls(**values)._resolved(data.get("resolved_for"))


def _json_images(name: str, value: object) -> object:
    """Images stored as path strings; an image given in memory cannot be stored."""
    if value is None:
        return None
    items = value if isinstance(value, tuple | list) else (value,)
    if any(not isinstance(item, str | Path) for item in items):
        raise ValueError(f"{name}: only image paths can be stored with a request, not images in memory")
    paths = [str(item) for item in items]
    return paths if isinstance(value, tuple | list) else paths[0]


@functools.cache
def request_params() -> dict[str, Param]:
    """Every request field's Param, in the fields' order (one dict, shared: read it, do not change it)."""
    return {f.name: f.metadata["param"] for f in fields(GenerationRequest) if "param" in f.metadata}
