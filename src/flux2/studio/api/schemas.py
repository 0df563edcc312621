"""Request bodies, as the studio front end sends them (spec §1.9), checked field by field."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Body(BaseModel):
    # The front end sends fields of other features too; NaN and infinity are never valid numbers here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class GenerateImageRequest(Body):
    project_id: str
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = ""
    width: int = Field(1024, ge=64, le=4096, multiple_of=16)  # the model works in 16 px tokens
    height: int = Field(1024, ge=64, le=4096, multiple_of=16)
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    seed: int | None = Field(None, ge=0, le=2**63 - 2)
    reference_images: list[str] = Field(default_factory=list, max_length=10)  # element ids, asset ids, media paths
    enable_ae: bool = True  # accepted for compatibility: FLUX.2's own autoencoder is always used
    enable_true_cfg: bool = False


class ShotConfig(Body):
    prompt: str = Field(min_length=1, max_length=4000)
    negative_prompt: str = ""
    width: int = Field(768, ge=64, le=4096)
    height: int = Field(512, ge=64, le=4096)
    num_frames: int = Field(121, ge=1)
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    cfg_scale: float | None = Field(None, ge=0, le=30)
    seed: int | None = Field(None, ge=0, le=2**63 - 2)
    reference_images: list[str] = Field(default_factory=list, max_length=10)

    @field_validator("width", "height")
    @classmethod
    def _to_grid(cls, value: int) -> int:
        return value // 16 * 16  # video sizes are multiples of 64; images need 16


class AdvancedRequest(Body):
    project_id: str
    shot_config: ShotConfig


class InpaintRequest(Body):
    image_path: str
    prompt: str = Field(min_length=1, max_length=4000)
    mask_path: str | None = None
    points: list[list[float]] | None = None  # [[x, y], ...] in image pixels, for the segmentation service
    labels: list[int] | None = None  # 1 foreground, 0 background, one per point
    text_mask: str | None = None  # what to mask, described in words
    strength: float = Field(1.0, gt=0, le=1)
    mask_blur: float = Field(8.0, ge=0, le=128)
    num_inference_steps: int | None = Field(None, ge=1, le=200)  # base models; the distilled ones run their own
    guidance_scale: float | None = Field(None, ge=0, le=30)
    seed: int | None = Field(None, ge=0, le=2**63 - 2)

    @field_validator("points")
    @classmethod
    def _pairs(cls, points: list[list[float]] | None) -> list[list[float]] | None:
        if points is not None and (not points or any(len(p) != 2 for p in points)):
            raise ValueError("points must be a non-empty list of [x, y] pairs")
        return points


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
    seed: int = Field(42, ge=0)
    script_content: str | None = None


class ProjectUpdate(Body):
    name: str | None = Field(None, min_length=1, max_length=200)
    resolution_w: int | None = Field(None, ge=64, le=8192)
    resolution_h: int | None = Field(None, ge=64, le=8192)
    fps: int | None = Field(None, ge=1, le=240)
    seed: int | None = Field(None, ge=0)
    script_content: str | None = None


class ElementCreate(Body):
    name: str = Field(min_length=1, max_length=200)
    trigger_word: str = Field(min_length=1, max_length=100)
    type: Literal["character", "location", "object"] = "character"
    description: str = ""
    image_path: str | None = None

    @field_validator("image_path")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None  # the front end sends "" for "no picture yet"


class ElementUpdate(Body):
    name: str | None = Field(None, min_length=1, max_length=200)
    trigger_word: str | None = Field(None, min_length=1, max_length=100)
    type: Literal["character", "location", "object"] | None = None
    description: str | None = None
    image_path: str | None = None  # "" clears the picture


class VisualizeRequest(Body):
    prompt_override: str | None = Field(None, max_length=4000)
    width: int = Field(1024, ge=64, le=4096, multiple_of=16)
    height: int = Field(1024, ge=64, le=4096, multiple_of=16)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    enable_ae: bool = True
    seed: int | None = Field(None, ge=0, le=2**63 - 2)
