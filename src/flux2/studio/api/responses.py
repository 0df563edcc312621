"""What routes answer, as the studio front end reads it (spec §1.9). Projects are answered as `ProjectOut` (times
in epoch seconds), gallery images as `GalleryImage`, elements as their records (flux2.studio.records); a job's
status is `JobState`, the one schema of /status, active_jobs and every SSE event."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from flux2.studio.api.schemas import SceneSave, ShotSave

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


class SamHealth(BaseModel):
    online: bool
    latency_ms: float | None
    status: str


# The front end reads a project's times as epoch seconds (`new Date(ts * 1000)`); records keep aware datetimes.
EpochSeconds = Annotated[datetime, PlainSerializer(lambda when: when.timestamp(), return_type=float)]


class ProjectOut(BaseModel):
    """A project as every project route answers it."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    created_at: EpochSeconds
    updated_at: EpochSeconds
    resolution_w: int
    resolution_h: int
    fps: int
    seed: int
    script_content: str | None


class ShotOut(ShotSave):
    """A stored shot: what was saved (the fields it has no column for included), and its project."""

    project_id: str


class ProjectDetail(ProjectOut):
    """One project with its storyboard, as the front end loads it (projectSlice.ts loadProject): scenes in their
    order, shots in the order they were saved."""

    scenes: list[SceneSave]
    shots: list[ShotOut]


class ThumbnailQueued(BaseModel):
    shot_id: str
    status: Literal["queued", "skipped"]
    job_id: str | None = None  # queued: its image job
    detail: str | None = None  # skipped: why


class ThumbnailsQueued(BaseModel):
    """What shotSlice.ts reads: `results`, counting the `queued` ones."""

    status: Literal["success"]
    results: list[ThumbnailQueued]


class LastFrame(BaseModel):
    """The last frame of a job's output, for the front end's "Extend" (InspectorPanel.tsx reads `url`): an
    image output is its own last frame."""

    job_id: str
    url: str  # a media URL
    path: str  # the same URL: never a server path


class GalleryImage(BaseModel):
    """An image of `GET /projects/{pid}/images`: the asset, and its meta as a JSON string (`meta_json`), which the
    front end parses to reuse an image's settings."""

    model_config = ConfigDict(from_attributes=True)

    id: str
    project_id: str | None
    job_id: str | None
    type: str
    path: str  # relative to the data folder
    url: str
    thumbnail_url: str | None
    filename: str
    width: int
    height: int
    duration: float | None
    meta: dict[str, Any]
    meta_json: str
    created_at: datetime


class LibraryItem(BaseModel):
    """An entry of the asset library (`GET /uploads`), under the names its media panel reads."""

    id: str
    asset_id: str  # = id
    url: str
    path: str  # the media URL, as `access_path`: never a server path
    access_path: str
    type: str  # "image" or "video"
    filename: str
    thumbnail: str | None
    width: int
    height: int
    project_id: str | None
    created_at: EpochSeconds


class FoundObject(BaseModel):
    """One object of POST /edit/detect, every field as the masking canvas reads it (SegmentationOverlay.tsx):
    none may be missing."""

    model_config = ConfigDict(extra="allow")  # the segmentation service's other fields, passed on

    id: int | str
    mask: str  # base64 PNG (no data: prefix), drawn over the picture
    bbox: list[float] = Field(min_length=4, max_length=4)  # [x0, y0, x1, y1] in the picture's pixels
    score: float
    label: str


class FoundObjects(BaseModel):
    model_config = ConfigDict(extra="allow")

    objects: list[FoundObject]
    count: int | None = None
    prompt: str | None = None


class LoraOnOffer(BaseModel):
    name: str  # what a job's `loras[i].name` names
    size_bytes: int
    modified: EpochSeconds
