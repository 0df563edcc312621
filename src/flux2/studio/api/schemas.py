"""Request bodies, as the studio front end sends them (spec §1.9).

Pydantic parses their shape and types. Their generation fields are GenerationRequest fields under the front end's
names (`request_field`): the OpenAPI document shows the request's ranges, and the request checks them, once, when
a route converts the body (`to_request`) and fits it to the served model. The other fields keep their own limits.
"""

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from flux2.request import (
    LORA_STRENGTH_LIMIT,
    PIXELS_PER_TOKEN,
    PROMPT_MAX_CHARS,
    TRUE_CFG_DEFAULT,
    GenerationRequest,
    LoraChoice,
    request_params,
)

MAX_LORAS = 8  # per job: each one adds its low-rank products to every layer it touches
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


def on_image_grid(side: int) -> int:
    """A shot's side on the image grid: video sizes are multiples of 64, images need 16. Smaller values stay, for
    the range check to name."""
    return side // PIXELS_PER_TOKEN * PIXELS_PER_TOKEN if side >= PIXELS_PER_TOKEN else side


class Body(BaseModel):
    # The front end sends fields of other features too; NaN and infinity are never valid numbers here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class LoraBody(Body):
    name: str = Field(min_length=1, max_length=255, description="a file in the service's LoRA folder (GET /loras)")
    strength: float = Field(1.0, ge=-LORA_STRENGTH_LIMIT, le=LORA_STRENGTH_LIMIT)


class GenerationBody(Body):
    """A body with generation fields, converted into a GenerationRequest by its `to_request`."""

    # Request fields set from a body field of another name, besides the `request_field`s (error messages).
    derived_names: ClassVar[dict[str, str]] = {}
    # Not sent by the studio app's front end; for other clients. Files are looked up when the job is queued.
    loras: list[LoraBody] = Field(default_factory=list, max_length=MAX_LORAS)

    def request_values(self) -> dict[str, Any]:
        """The generation fields, under GenerationRequest's names; a LoRA by its name in the LoRA folder."""
        values = {request: getattr(self, name) for name, request in self.field_names().items()}
        return values | {"loras": tuple(LoraChoice(lora.name, lora.strength) for lora in self.loras)}

    @classmethod
    def field_names(cls) -> dict[str, str]:
        """Body field -> the GenerationRequest field it is."""
        return {name: info.json_schema_extra[REQUEST_FIELD] for name, info in cls.model_fields.items()
                if isinstance(info.json_schema_extra, dict) and REQUEST_FIELD in info.json_schema_extra}  # fmt: skip

    @field_validator("enhance_prompt", mode="before", check_fields=False)
    @classmethod
    def _null_is_off(cls, value: object) -> object:
        return False if value is None else value  # the front end sends a shot's unset switch as null

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
    # Prompt enhancement by the service's upsampler (flux2 serve --upsample), only when asked; the image view
    # does not send it, the shot inspector does (ShotConfig).
    enhance_prompt: bool = request_field("upsample", False)

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
    enhance_prompt: bool = request_field("upsample", False)  # the shot's "enhance prompt" switch

    @field_validator("width", "height")
    @classmethod
    def _to_grid(cls, value: int) -> int:
        return on_image_grid(value)

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
    enhance_prompt: bool = request_field("upsample", False)  # not sent by the front end: off

    @field_validator("points")
    @classmethod
    def _pairs(cls, points: list[list[float]] | None) -> list[list[float]] | None:
        if points is not None and (not points or any(len(p) != 2 for p in points)):
            raise ValueError("points must be a non-empty list of [x, y] pairs")
        return points

    def to_request(self, image: str, mask: str) -> GenerationRequest:
        """`image` and `mask` as media URLs: the job resolves them to files when it runs."""
        return GenerationRequest(mode="inpaint", image=image, mask=mask, **self.request_values())


class SourceEditRequest(GenerationBody):
    """A job that changes one stored picture as a whole: POST /edit/outpaint and /edit/img2img."""

    image_path: str = Field(min_length=1, description="the picture: an asset id, or its media path as /upload "
                                                      "answers it (/projects/<id>/...)")  # fmt: skip
    prompt: str = request_field("prompt", ..., min_length=1)
    strength: float | None = request_field("strength")  # None: the mode's default
    num_inference_steps: int | None = request_field("num_steps")
    guidance_scale: float | None = request_field("guidance")
    seed: int | None = request_field("seed")
    enhance_prompt: bool = request_field("upsample", False)
    mode: ClassVar[str]

    def to_request(self, image: str) -> GenerationRequest:
        """`image` as a media URL: the job resolves it to a file when it runs."""
        return GenerationRequest(mode=self.mode, image=image, **self.request_values())


class OutpaintRequest(SourceEditRequest):
    mode: ClassVar[str] = "outpaint"

    left: int = request_field("left")
    right: int = request_field("right")
    top: int = request_field("top")
    bottom: int = request_field("bottom")
    mask_blur: float = request_field("mask_blur")


class Img2ImgRequest(SourceEditRequest):
    mode: ClassVar[str] = "img2img"


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
    enhance_prompt: bool = request_field("upsample", False)  # not sent by the front end: off

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


SQL_INT = {"ge": -(2**63), "le": 2**63 - 1}  # what an SQL INTEGER holds: a signed 64-bit number
SAVE_MAX_SHOTS = 10_000  # a bound on one save's size, far above a storyboard's
THUMBNAIL_MAX_SHOTS = 500  # one image job each


class SceneSave(Body):
    """A scene as the front end saves and loads it (projectSlice.ts)."""

    id: str = Field(min_length=1)  # checked as a safe id by the route, which names the scene's place
    index: int | None = Field(None, **SQL_INT)  # None: its place in the list
    name: str = ""
    script_content: str | None = None


class ShotSave(Body):
    """A shot as the front end saves and loads it (projectSlice.ts saveProject / loadProject; snake_case). Fields
    not named here are kept as they came (`model_extra`) and given back on load."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)  # checked as a safe id by the route, which names the shot's place
    scene_id: str | None = None  # one of the project's scenes
    index: int | None = Field(None, **SQL_INT)  # its place within its scene
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = Field(None, **SQL_INT)
    width: int | None = Field(None, **SQL_INT)  # None: the project's resolution_w
    height: int | None = Field(None, **SQL_INT)  # None: the project's resolution_h (the front end omits it)
    num_frames: int | None = Field(None, **SQL_INT)
    fps: int | None = Field(None, **SQL_INT)  # None: the project's fps
    cfg_scale: float | None = None
    enhance_prompt: bool | None = None
    upscale: bool | None = None
    pipeline_override: str | None = None
    auto_continue: bool | None = None
    track_index: int | None = Field(None, **SQL_INT)
    start_frame: int | None = Field(None, **SQL_INT)
    trim_in: int | None = Field(None, **SQL_INT)
    trim_out: int | None = Field(None, **SQL_INT)
    action: str | None = None
    dialogue: str | None = None
    character: str | None = None
    shot_type: str | None = None
    timeline: list[dict[str, Any]] | None = None  # conditioning items: {type, path, frame_index, strength}
    matched_elements: Any = None
    last_job_id: str | None = None
    thumbnail_url: str | None = None
    video_url: str | None = None
    enhanced_prompt_result: str | None = None

    @field_validator("scene_id")
    @classmethod
    def _no_scene(cls, value: str | None) -> str | None:
        return value or None  # "" is no scene

    @field_validator("timeline")
    @classmethod
    def _frame_index(cls, items: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        """The front end saves an item's frame as `frameIndex` and loads it from `frame_index`: keep both."""
        if items is None:
            return None
        return [{**item, "frame_index": item["frameIndex"]} if "frameIndex" in item and "frame_index" not in item
                else item for item in items]  # fmt: skip


class ProjectSave(ProjectUpdate):
    """`PUT /projects/{id}`: the front end's auto-save of its whole project. It creates the project with that id
    if there is none yet. `scenes` and `shots`, when sent, replace the project's (a list left out keeps what is
    stored)."""

    script: str | None = None  # another name of script_content
    scenes: list[SceneSave] | None = Field(None, max_length=SAVE_MAX_SHOTS)
    shots: list[ShotSave] | None = Field(None, max_length=SAVE_MAX_SHOTS)

    def fields(self) -> dict[str, Any]:
        """The given project fields, under the record's names."""
        values = self.model_dump(exclude_none=True, exclude={"script", "scenes", "shots"})
        if self.script_content is None and self.script is not None:
            values["script_content"] = self.script
        return values


class ThumbnailRequest(Body):
    """`POST /projects/{pid}/storyboard/generate-thumbnails` (shotSlice.ts sends `shot_ids` only)."""

    shot_ids: list[str] = Field(min_length=1, max_length=THUMBNAIL_MAX_SHOTS)
    force: bool = False  # also shots that have a thumbnail already
    width: int | None = request_field("width", None)  # None: the shot's width
    height: int | None = request_field("height", None)  # None: the shot's height


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


class SegmentRequest(SegmentForm):
    """POST /edit/segment as JSON: the picture is a stored image."""

    image_path: str


class TextSegmentRequest(DetectForm):
    """POST /edit/segment-text and /edit/detect as JSON: the picture is a stored image."""

    image_path: str
