"""Job events for Server-Sent Events clients: one schema (`JobState`, which /status and active_jobs return too),
one bounded queue per client.

Workers publish from their threads; each client reads from an asyncio queue on the event loop. A slow client
loses its oldest events and never holds up a worker.
"""

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, SerializerFunctionWrapHandler, field_serializer, model_serializer

from flux2.studio.payloads import InpaintJob, ThumbnailJob
from flux2.studio.records import Job, JobStatus, utcnow

EVENT_NAMES = ("progress", "complete", "error", "cancelled")
# Below this share of the work the job is still loading the model or encoding, whose time says nothing of the
# denoising steps' (tasks.PROGRESS_SPAN): no estimate yet.
ETA_MIN_PROGRESS = 12


class JobState(BaseModel):
    """The one status schema of every job, in /status, active_jobs and every SSE event. `error` repeats
    error_message, `message` repeats status_message, and `url` and `video_url` repeat output_url, for the studio
    front end's readers; an `error` event's `message` is the error, a `complete` event's `type` the kind of output.

    Per job type, as the front end reads it (spec: milimo-frontend-contract.md):
    * its SSE `complete` makes `url` the shot's video and `actual_frames` its frame count, so an inpaint job (an
      edited frame of a shot) sends no `url` at all (the key is left out: a reader that tests presence must not
      find it), `thumbnail_url` = the full inpainted image, and no `actual_frames`;
    * a storyboard thumbnail job's `complete` carries `shot_id`; its `url` and `thumbnail_url` are both the
      picture, which becomes that shot's thumbnail (serverSlice.ts reads `url` for a `thumbnail` event), and it
      has no `actual_frames` and no `video_url` (either would change the shot's frame count or video);
    * every other job's output is one image: `url` is it, `thumbnail_url` its quarter-size thumbnail,
      `actual_frames` 1 once it is done;
    * /status after a page reload (utils/jobPoller.ts) reads `video_url` = the output (also for images and
      inpainting, as the studio's own backend answers), `thumbnail_url`, `actual_frames`, `enhanced_prompt` and
      `eta_seconds`.
    """

    job_id: str
    type: str
    project_id: str | None
    status: str
    progress: int
    status_message: str
    message: str
    error_message: str | None
    error: str | None
    asset_id: str | None
    seed: int | None
    output_url: str | None
    url: str | None = None  # left out of the JSON for inpaint jobs (see above)
    shot_id: str | None = None  # the shot of a thumbnail job
    video_url: str | None = None
    thumbnail_url: str | None
    actual_frames: int | None = None
    eta_seconds: float | None = None  # while processing, from the time the steps so far took
    enhanced_prompt: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def of(cls, job: Job) -> "JobState":
        inpaint = job.type == InpaintJob.job_type
        thumbnail = job.type == ThumbnailJob.job_type
        done = job.status == JobStatus.COMPLETED and job.output_url is not None
        return cls(
            job_id=job.id, type=job.type, project_id=job.project_id, status=job.status, progress=job.progress,
            status_message=job.status_message, message=job.status_message, error_message=job.error_message,
            error=job.error_message, asset_id=job.asset_id, seed=job.seed, output_url=job.output_url,
            url=None if inpaint else job.output_url, video_url=None if thumbnail else job.output_url,
            shot_id=job.params.get("shot_id") if thumbnail else None,
            thumbnail_url=job.output_url if inpaint or thumbnail else job.thumbnail_url,
            actual_frames=1 if done and not (inpaint or thumbnail) else None, eta_seconds=eta_seconds(job),
            enhanced_prompt=job.enhanced_prompt, created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at,
        )  # fmt: skip

    # No return annotation: with one, the OpenAPI document would show a bare object instead of this schema.
    @model_serializer(mode="wrap")
    def _per_job_type(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        if self.type == InpaintJob.job_type:
            data.pop("url", None)
        return data

    @field_serializer("created_at", "started_at", "finished_at")
    def _iso(self, value: datetime | None) -> str | None:
        return value.isoformat() if value else None


def eta_seconds(job: Job) -> float | None:
    """Seconds left of a processing job, from the pace of its progress so far; None before there is one."""
    if job.status != JobStatus.PROCESSING or job.started_at is None or job.progress < ETA_MIN_PROGRESS:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    return round(max(0.0, elapsed * (100 - job.progress) / job.progress), 1)


@dataclass(frozen=True)
class JobEvent:
    name: str  # one of EVENT_NAMES
    state: JobState


class EventBus:
    def __init__(self, queue_size: int = 100):
        if queue_size < 1:
            raise ValueError(f"sse_queue_size must be >= 1, got {queue_size}")
        self.queue_size = queue_size
        self._clients: set[asyncio.Queue] = set()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the clients live on (the app's, at startup)."""
        self._loop = loop

    def publish(self, event: JobEvent) -> None:
        """Safe from any thread; without a loop (no server running) events go nowhere."""
        if event.name not in EVENT_NAMES:
            raise ValueError(f"event name must be one of {EVENT_NAMES}, got {event.name!r}")
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with self._lock:
            clients = list(self._clients)
        for queue in clients:
            loop.call_soon_threadsafe(_put_dropping_oldest, queue, event)

    async def subscribe(self) -> AsyncIterator[JobEvent]:
        """Every event published while the caller iterates."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=self.queue_size)
        with self._lock:
            self._clients.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            with self._lock:
                self._clients.discard(queue)

    @property
    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)


def _put_dropping_oldest(queue: asyncio.Queue, event: JobEvent) -> None:
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(event)
