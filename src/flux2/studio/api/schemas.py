"""Request bodies, as the studio front end sends them (spec §1.9).

Pydantic parses their shape and types. Their generation fields are GenerationRequest fields under the front end's
names (`request_field`): the OpenAPI document shows the request's ranges, and the request checks them, once, when
a route converts the body (`to_request`) and fits it to the served model. The other fields keep their own limits.
"""

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from flux2.request import PIXELS_PER_TOKEN, PROMPT_MAX_CHARS, TRUE_CFG_DEFAULT, GenerationRequest, request_params

PROJECT_SEED_MAX = 2**63 - 1  # a project's seed is stored in an SQL INTEGER: a signed 64-bit number
TRIGGER_MAX_CHARS = 100
REQUEST_FIELD = "x-request-field"  # in a body field's JSON schema: the GenerationRequest field it is
_REQUEST_DEFAULT: Any = object()


def request_field(name: str, default: Any = _REQUEST_DEFAULT, **constraints: Any) -> Any:
    """A body field that is GenerationRequest's `name`: by default its default, and its range and help in the
    OpenAPI document. `constraints` are the studio's own rules on top (a prompt is not empty)."""
    if default is _REQUEST_DEFAULT:
        default = GenerationRequest.__dataclass_fields__[name].default
    schema = {**request_params()[name].json_schema(), REQUEST_FIELD: name}
    return Field(default, json_schema_extra=schema, **constraints)


class Body(BaseModel):
    # The front end sends fields of other features too; NaN and infinity are never valid numbers here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class GenerationBody(Body):
    """A body with generation fields, converted into a GenerationRequest by its `to_request`."""

    # Request fields set from a body field of another name, besides the `request_field`s (error messages).
    derived_names: ClassVar[dict[str, str]] = {}

    def request_values(self) -> dict[str, Any]:
        """The generation fields, under GenerationRequest's names."""
        return {request: getattr(self, name) for name, request in self.field_names().items()}

    @classmethod
    def field_names(cls) -> dict[str, str]:
        """Body field -> the GenerationRequest field it is."""
        return {name: info.json_schema_extra[REQUEST_FIELD] for name, info in cls.model_fields.items()
                if isinstance(info.json_schema_extra, dict) and REQUEST_FIELD in info.json_schema_extra}  # fmt: skip

    @classmethod
    def in_front_end_terms(cls, err: ValueError) -> str:
        """The request's error message, naming this body's field ("num_steps must be..." -> "num_inference_steps
        must be...")."""
        front = {request: name for name, request in cls.field_names().items()} | cls.derived_names
        field, space, rest = str(err).partition(" ")
        return f"{front.get(field, field)}{space}{rest}"


def true_cfg_scale(enabled: bool, guidance_scale: float | None) -> float | None:
    """The studio's true-CFG switch: its guidance slider is the scale when above 1, else TRUE_CFG_DEFAULT."""
    if not enabled:
        return None
    return guidance_scale if guidance_scale is not None and guidance_scale > 1 else TRUE_CFG_DEFAULT


class GenerateImageRequest(GenerationBody):
    derived_names: ClassVar[dict[str, str]] = {"true_cfg_scale": "guidance_scale"}

    project_id: str
    prompt: str = request_field("prompt", ..., min_length=1)
    negative_prompt: str = request_field("negative_prompt", "")
    width: int | None = request_field("width")
    height: int | None = request_field("height")
    num_inference_steps: int | None = request_field("num_steps")
    guidance_scale: float | None = request_field("guidance")
    seed: int | None = request_field("seed")
    reference_images: list[str] = Field(default_factory=list, max_length=10)  # element ids, asset ids, media paths
    enable_ae: bool = True  # accepted for compatibility: FLUX.2's own autoencoder is always used
    enable_true_cfg: bool = False

    def to_request(self) -> GenerationRequest:
        """References are resolved to files when the job runs; the request holds none yet."""
        return GenerationRequest(**self.request_values(),
                                 true_cfg_scale=true_cfg_scale(self.enable_true_cfg, self.guidance_scale))  # fmt: skip


class ShotConfig(GenerationBody):
    prompt: str = request_field("prompt", ..., min_length=1)
    negative_prompt: str = request_field("negative_prompt", "")
    width: int = request_field("width", 768)  # the studio's shot size, not the model's
    height: int = request_field("height", 512)
    num_frames: int = Field(121, ge=1)
    num_inference_steps: int | None = request_field("num_steps")
    cfg_scale: float | None = request_field("guidance")
    seed: int | None = request_field("seed")
    reference_images: list[str] = Field(default_factory=list, max_length=10)

    @field_validator("width", "height")
    @classmethod
    def _to_grid(cls, value: int) -> int:
        """Video sizes are multiples of 64; images need 16. Smaller values stay, for the range check to name."""
        return value // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN if value >= PIXELS_PER_TOKEN else value

    def to_request(self) -> GenerationRequest:
        return GenerationRequest(**self.request_values())


class AdvancedRequest(Body):
    project_id: str
    shot_config: ShotConfig


class InpaintRequest(GenerationBody):
    image_path: str
    prompt: str = request_field("prompt", ..., min_length=1)
    mask_path: str | None = None
    points: list[list[float]] | None = None  # [[x, y], ...] in image pixels, for the segmentation service
    labels: list[int] | None = None  # 1 foreground, 0 background, one per point
    text_mask: str | None = None  # what to mask, described in words
    strength: float | None = request_field("strength")
    mask_blur: float = request_field("mask_blur")
    num_inference_steps: int | None = request_field("num_steps")  # base models; the distilled ones run their own
    guidance_scale: float | None = request_field("guidance")
    seed: int | None = request_field("seed")

    @field_validator("points")
    @classmethod
    def _pairs(cls, points: list[list[float]] | None) -> list[list[float]] | None:
        if points is not None and (not points or any(len(p) != 2 for p in points)):
            raise ValueError("points must be a non-empty list of [x, y] pairs")
        return points

    def to_request(self, image: str, mask: str) -> GenerationRequest:
        """`image` and `mask` as media URLs: the job resolves them to files when it runs."""
        return GenerationRequest(mode="inpaint", image=image, mask=mask, **self.request_values())


class SegmentRequest(Body):
    image_path: str
    points: list[list[float]] = Field(min_length=1)
    labels: list[int] | None = None

    @field_validator("points")
    @classmethod
    def _pairs(cls, points: list[list[float]]) -> list[list[float]]:
        if any(len(p) != 2 for p in points):
            raise ValueError("points must be [x, y] pairs")
        return points


class TextSegmentRequest(Body):
    image_path: str
    text: str = Field(min_length=1, max_length=500)
    confidence: float = Field(0.5, ge=0, le=1)


class ProjectCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    resolution_w: int = Field(768, ge=64, le=8192)
    resolution_h: int = Field(512, ge=64, le=8192)
    fps: int = Field(25, ge=1, le=240)
    seed: int = Field(42, ge=0, le=PROJECT_SEED_MAX)
    script_content: str | None = None


class ProjectUpdate(Body):
    name: str | None = Field(None, min_length=1, max_length=200)
    resolution_w: int | None = Field(None, ge=64, le=8192)
    resolution_h: int | None = Field(None, ge=64, le=8192)
    fps: int | None = Field(None, ge=1, le=240)
    seed: int | None = Field(None, ge=0, le=PROJECT_SEED_MAX)
    script_content: str | None = None


class ElementCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    trigger_word: str = Field("", max_length=TRIGGER_MAX_CHARS, validate_default=True)  # "" or none: from the name
    type: Literal["character", "location", "object"] = "character"
    description: str = ""
    image_path: str | None = None

    @field_validator("image_path")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None  # the front end sends "" for "no picture yet"

    @field_validator("trigger_word")
    @classmethod
    def _from_name(cls, value: str, info: ValidationInfo) -> str:
        return value.strip() or trigger_from_name(info.data.get("name", ""))


class ElementUpdate(Body):
    name: str | None = Field(None, min_length=1, max_length=200)
    trigger_word: str | None = Field(None, max_length=TRIGGER_MAX_CHARS)  # "": made from the name
    type: Literal["character", "location", "object"] | None = None
    description: str | None = None
    image_path: str | None = None  # "" clears the picture


class VisualizeRequest(GenerationBody):
    derived_names: ClassVar[dict[str, str]] = {"prompt": "prompt_override"}

    prompt_override: str | None = Field(None, max_length=PROMPT_MAX_CHARS)
    width: int | None = request_field("width")
    height: int | None = request_field("height")
    guidance_scale: float | None = request_field("guidance")
    enable_ae: bool = True
    seed: int | None = request_field("seed")

    def to_request(self, prompt: str) -> GenerationRequest:
        """`prompt`: the override, or the route's picture of the element in words."""
        return GenerationRequest(prompt=prompt, **self.request_values())


def trigger_from_name(name: str) -> str:
    """The trigger word of an element created without one: "@" and its name without spaces ("Old Tom" ->
    "@OldTom"), the studio app's own rule (its backend's element manager). Too long a result is an error."""
    trigger = "@" + name.replace(" ", "")
    if len(trigger) > TRIGGER_MAX_CHARS:
        raise ValueError(
            f"trigger_word made from the name is {len(trigger)} characters, over {TRIGGER_MAX_CHARS}: "
            "give a shorter trigger_word"
        )
    return trigger


class ProjectSave(Body):
    """`PUT /projects/{id}`: the front end's auto-save of its whole project. It creates the project with that id
    if there is none yet. Of the rest (scenes, shots) only the script is kept for now."""

    name: str | None = Field(None, min_length=1, max_length=200)
    resolution_w: int | None = Field(None, ge=64, le=8192)
    resolution_h: int | None = Field(None, ge=64, le=8192)
    fps: int | None = Field(None, ge=1, le=240)
    seed: int | None = Field(None, ge=0, le=PROJECT_SEED_MAX)
    script_content: str | None = None
    script: str | None = None  # another name of script_content

    def fields(self) -> dict[str, Any]:
        """The given fields, under the record's names."""
        values = self.model_dump(exclude_none=True, exclude={"script"})
        if self.script_content is None and self.script is not None:
            values["script_content"] = self.script
        return values


class SegmentForm(Body):
    """The fields of POST /edit/segment as the masking canvas sends them (multipart, with the picture as the file
    `image`): `points` and `labels` are JSON strings there, parsed before they get here."""

    points: list[list[float]] = Field(min_length=1)  # [[x, y], ...] in the picture's pixels
    labels: list[int] | None = None  # 1 foreground, 0 background, one per point; default all 1

    @field_validator("points")
    @classmethod
    def _pairs(cls, points: list[list[float]]) -> list[list[float]]:
        if any(len(p) != 2 for p in points):
            raise ValueError("points must be [x, y] pairs")
        return points


class DetectForm(Body):
    """The fields of POST /edit/detect as the masking canvas sends them (multipart, with the file `image`)."""

    text: str = Field(min_length=1, max_length=500)
    confidence: float = Field(0.5, ge=0, le=1)
