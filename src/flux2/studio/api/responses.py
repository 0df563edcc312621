"""What routes answer, as the studio front end reads it (spec §1.9). Projects, elements and assets are answered
as their records (flux2.studio.records); a job's status is `JobState`, the one schema of /status, active_jobs
and every SSE event."""

from typing import Literal

from pydantic import BaseModel, ConfigDict

# Answered by the job routes; defined with the events, whose data it also is.
from flux2.studio.events import JobState as JobState


class Health(BaseModel):
    status: Literal["ok"]


class Queued(BaseModel):
    job_id: str
    status: Literal["queued"]


class InpaintQueued(Queued):
    mask_path: str  # the mask's media URL: given, or made by the segmentation service


class CancelAnswer(BaseModel):
    job_id: str
    status: Literal["cancelled", "cancelling", "not_found_or_already_done"]


class GpuStatus(BaseModel):
    busy: bool
    queued: int
    running: str | None  # the running job's id


class ProjectDeleted(BaseModel):
    status: Literal["deleted"]
    project_id: str


class ElementDeleted(BaseModel):
    status: Literal["deleted"]
    element_id: str


class AssetDeleted(BaseModel):
    status: Literal["deleted"]
    asset_id: str


class Uploaded(BaseModel):
    url: str
    asset_id: str
    type: str
    filename: str
    access_path: str  # what clients send back as a reference or source: the media URL, never a server path


class Mask(BaseModel):
    mask_path: str  # a media URL


class DetectedObject(BaseModel):
    model_config = ConfigDict(extra="allow")  # the segmentation service's fields, passed on as it sends them

    id: int | str | None = None
    mask: str | None = None  # base64 PNG
    bbox: list[int | float] | None = None  # [x0, y0, x1, y1]
    score: float | None = None
    label: str | None = None


class Detection(BaseModel):
    model_config = ConfigDict(extra="allow")

    objects: list[DetectedObject]
    count: int | None = None
    prompt: str | None = None


class SamHealth(BaseModel):
    online: bool
    latency_ms: float | None
    status: str
