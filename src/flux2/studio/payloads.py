"""What each job type carries: its request, resolved for the served model when the job was queued (so its seed is
drawn and recorded once), and what a request cannot hold (the project, references as the client named them, the
notes on what the model does not use).

A payload is data only: it is stored as JSON in `Job.params` under its job type, and `read_payload(job)` reads it
back, so a worker in another process gets exactly what the route decided.
"""

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Self

from flux2.request import GenerationRequest
from flux2.studio.records import Job

TYPE_KEY = "type"  # the job type, in Job.params


@dataclass(frozen=True, kw_only=True)
class Payload:
    job_type: ClassVar[str]

    project_id: str  # where the output goes
    request: GenerationRequest  # resolved: model defaults filled in, seed drawn
    notes: tuple[str, ...] = ()  # what the model does not use of what was sent, said in the job's status
    # The client's Idempotency-Key header, and a digest of the request it came with: a retry with that key answers
    # this job (flux2.studio.api.jobs.Submission). Kept here, in Job.params, so no column is needed.
    idempotency_key: str | None = None
    request_digest: str | None = None

    def __post_init__(self) -> None:
        if self.request.resolved_for is None:
            raise ValueError("a job's request must be resolved for the served model before it is queued "
                             "(GenerationRequest.fitted or resolve)")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "request"}
        data = {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}
        return {TYPE_KEY: self.job_type, "request": self.request.to_json(), **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name != "request"}
        values = {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}
        return cls(**values, request=GenerationRequest.from_json(data["request"]))


@dataclass(frozen=True, kw_only=True)
class ImageJob(Payload):
    """Text-to-image, with references: POST /generate/image."""

    job_type: ClassVar[str] = "image"

    references: tuple[str, ...] = ()  # element ids, asset ids or media paths, resolved to files when it runs


@dataclass(frozen=True, kw_only=True)
class ShotJob(ImageJob):
    """A single-frame shot of POST /generate/advanced: an image job under the shot's job type."""

    job_type: ClassVar[str] = "advanced"


@dataclass(frozen=True, kw_only=True)
class ThumbnailJob(ImageJob):
    """A storyboard picture of a shot, made from the shot's prompt and size: it becomes the shot's
    thumbnail_url. The shot is named by its project and its id (ids are unique within a project)."""

    job_type: ClassVar[str] = "thumbnail"

    shot_id: str


@dataclass(frozen=True, kw_only=True)
class InpaintJob(Payload):
    """Inpainting: the request's `image` and `mask` are media URLs, resolved to files when it runs."""

    job_type: ClassVar[str] = "inpaint"


@dataclass(frozen=True, kw_only=True)
class OutpaintJob(Payload):
    """Outpainting: the request's `image` (a media URL, resolved to a file when it runs) on a canvas grown by the
    request's margins."""

    job_type: ClassVar[str] = "outpaint"


@dataclass(frozen=True, kw_only=True)
class Img2ImgJob(Payload):
    """Image-to-image: the request's `image` (a media URL, resolved to a file when it runs) noised to the
    request's strength, then denoised."""

    job_type: ClassVar[str] = "img2img"


@dataclass(frozen=True, kw_only=True)
class VisualizeJob(Payload):
    """A picture of an element, which becomes the element's image."""

    job_type: ClassVar[str] = "visualize"

    element_id: str


JobPayload = ImageJob | ShotJob | ThumbnailJob | InpaintJob | OutpaintJob | Img2ImgJob | VisualizeJob
PAYLOADS: dict[str, type[JobPayload]] = {
    kind.job_type: kind for kind in (ImageJob, ShotJob, ThumbnailJob, InpaintJob, OutpaintJob, Img2ImgJob, VisualizeJob)
}


def read_payload(job: Job) -> JobPayload:
    """The typed payload a job was queued with; ValueError when its params are not one (a job of an older
    version, say)."""
    kind = PAYLOADS.get(job.params.get(TYPE_KEY))
    if kind is None or kind.job_type != job.type:
        raise ValueError(f"job {job.id}: its params are not a {job.type!r} job payload of this version: queue it "
                         "again")  # fmt: skip
    try:
        return kind.from_json(job.params)
    except (KeyError, TypeError) as err:
        raise ValueError(f"job {job.id}: its {job.type!r} payload is incomplete ({err}): queue it again") from None
