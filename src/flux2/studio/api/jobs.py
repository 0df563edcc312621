"""Jobs: start image generation, follow it, cancel it; the queue's state. And what every job route shares: a body
checked once against the served model, and a job queued with its payload."""

import hashlib
from dataclasses import asdict, dataclass, replace
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException
from pydantic import BaseModel
from sqlmodel import Session, col, select

from flux2.registry import ModelInfo
from flux2.request import GenerationRequest
from flux2.studio.api.deps import JobsDep, MediaDep, ModelDep, SessionDep, WorkerDep
from flux2.studio.api.responses import CancelAnswer, GpuStatus, JobState, LastFrame, Queued
from flux2.studio.api.schemas import AdvancedRequest, GenerateImageRequest, GenerationBody
from flux2.studio.jobs_store import JobStore
from flux2.studio.payloads import ImageJob, JobPayload, ShotJob
from flux2.studio.records import Asset, Element, Job, JobStatus, Project
from flux2.studio.storage import MediaStore
from flux2.studio.worker import Worker

router = APIRouter(tags=["jobs"])
Notes = tuple[str, ...]

IDEMPOTENCY_KEY_MAX_CHARS = 255  # keys are UUIDs or similar; this only bounds what is stored
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_MAX_CHARS,
           description="Makes the submission safe to retry: the same key answers the job it made"),
]  # fmt: skip


@dataclass(frozen=True)
class Submission:
    """A job submission made with an Idempotency-Key: the key, and a digest of what was asked (route, body and
    query), so that a retry answers the job the first attempt made, and the key reused for something else is
    refused."""

    key: str
    digest: str

    @classmethod
    def of(cls, key: str | None, route: str, body: BaseModel, *query: str | None) -> "Submission | None":
        if key is None:
            return None
        asked = "\n".join([route, body.model_dump_json(), *(q or "" for q in query)])
        return cls(key, hashlib.sha256(asked.encode()).hexdigest())

    def job_id(self) -> str:
        """The id of the job this key makes when the client names none: one key, one id, so two retries that
        race each other cannot both create a job (the second insert hits the primary key)."""
        return f"job_{hashlib.sha256(self.key.encode()).hexdigest()[:12]}"

    def stamp(self, payload: JobPayload) -> JobPayload:
        return replace(payload, idempotency_key=self.key, request_digest=self.digest)


def earlier_job(session: Session, submission: Submission | None) -> Job | None:
    """The job an earlier submission with this key made, if any; 422 if that submission asked for something
    else. The key lives in Job.params (no column), so this reads it from there."""
    if submission is None:
        return None
    with Session(session.get_bind()) as fresh:  # a new transaction: it sees a job a racing request just made
        query = select(Job).where(col(Job.params)["idempotency_key"].as_string() == submission.key)
        job = fresh.exec(query).first()
    if job is not None and job.params.get("request_digest") != submission.digest:
        raise HTTPException(422, f"Idempotency-Key {submission.key!r} was used for another request (job "
                                 f"{job.id}): send a new key with a new request")  # fmt: skip
    return job


def fitted(body: GenerationBody, request: GenerationRequest, model: ModelInfo,
           media: MediaStore) -> tuple[GenerationRequest, Notes]:  # fmt: skip
    """The one check of a body's generation fields: their ranges, then the served model's rules, and that each
    LoRA is on offer. What the model cannot use is dropped, with a note; the seed is drawn here. A bad value is
    a 422 naming the body's field."""
    try:
        for i, lora in enumerate(request.loras):
            media.lora_file(lora.path, f"loras[{i}].name")
        return request.fitted(model)
    except ValueError as err:
        raise HTTPException(422, body.in_front_end_terms(err)) from None


def queue_job(jobs: JobStore, worker: Worker, payload: JobPayload, job_id: str | None = None,
              submission: Submission | None = None, session: Session | None = None) -> Queued:  # fmt: skip
    """Store the job and hand it to the worker. With a `submission` (which needs the request's `session`), a
    retry that lost the race to its twin answers the twin's job."""
    if submission is None:
        job = jobs.create(payload, job_id=job_id)
    else:
        try:
            job = jobs.create(submission.stamp(payload), job_id=job_id or submission.job_id())
        except ValueError:
            if session is None or (job := earlier_job(session, submission)) is None:
                raise
            return Queued(job_id=job.id, status="queued")
    worker.submit(job.id)
    return Queued(job_id=job.id, status="queued")


def check_references(media: MediaStore, session, project_id: str, items: list[str]) -> None:
    """Each reference is an element of this project with a picture, an asset of this project, or a media file
    inside the data folder: anything else is refused now, not after the job waited in the queue."""
    for i, item in enumerate(items):
        element = session.get(Element, item)
        if element is not None and element.project_id == project_id:
            if not element.image_path:
                raise HTTPException(422, f"reference_images[{i}]: element {element.name!r} has no picture yet")
            continue
        asset = session.get(Asset, item)
        if asset is not None and asset.project_id == project_id:
            continue
        try:
            path = media.resolve(item, f"reference_images[{i}]")
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        if not path.is_file():
            raise HTTPException(422, f"reference_images[{i}] {item!r}: no element, asset or file by that name")


def require_project(session, project_id: str) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise HTTPException(404, f"project_id {project_id!r}: no such project")
    return project


@router.post("/generate/image", summary="Queue a text-to-image job (with element or image references)")
def generate_image(body: GenerateImageRequest, jobs: JobsDep, worker: WorkerDep, media: MediaDep, model: ModelDep,
                   session: SessionDep, idempotency_key: IdempotencyKey = None) -> Queued:  # fmt: skip
    submission = Submission.of(idempotency_key, "/generate/image", body)
    if (earlier := earlier_job(session, submission)) is not None:
        return Queued(job_id=earlier.id, status="queued")
    request, notes = fitted(body, body.to_request(), model, media)
    require_project(session, body.project_id)
    check_references(media, session, body.project_id, body.reference_images)
    payload = ImageJob(project_id=body.project_id, request=request, references=tuple(body.reference_images),
                       notes=notes)  # fmt: skip
    return queue_job(jobs, worker, payload, submission=submission, session=session)


@router.post("/generate/advanced", summary="The studio's shot generation: one frame is an image job")
def generate_advanced(body: AdvancedRequest, jobs: JobsDep, worker: WorkerDep, media: MediaDep, model: ModelDep,
                      session: SessionDep, idempotency_key: IdempotencyKey = None) -> Queued:  # fmt: skip
    submission = Submission.of(idempotency_key, "/generate/advanced", body)
    if (earlier := earlier_job(session, submission)) is not None:
        return Queued(job_id=earlier.id, status="queued")
    require_project(session, body.project_id)
    shot = body.shot_config
    if shot.num_frames != 1:
        raise HTTPException(501, "video generation is not part of this service: only num_frames == 1 (an image)")
    request, notes = fitted(shot, shot.to_request(), model, media)
    check_references(media, session, body.project_id, shot.reference_images)
    payload = ShotJob(project_id=body.project_id, request=request, references=tuple(shot.reference_images),
                      notes=notes)  # fmt: skip
    return queue_job(jobs, worker, payload, submission=submission, session=session)


@router.get("/status/{job_id}", summary="A job's status (the same schema for every job type)")
def status(job_id: str, jobs: JobsDep) -> JobState:
    job = jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"job_id {job_id!r}: no such job")
    return JobState.of(job)


@router.get("/shot/{job_id}/last-frame", summary="The last frame of a job's output (an image is its own)")
@router.post("/shot/{job_id}/last-frame", summary="The same; the front end's Extend asks with POST")
def last_frame(job_id: str, jobs: JobsDep, media: MediaDep) -> LastFrame:
    """Every output of this service is one image, which is its own last frame: its URL, for the front end to
    condition the next shot on. 404 for an unknown job, one without an output yet, or one whose image is gone."""
    job = jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"job_id {job_id!r}: no such job")
    if job.status != JobStatus.COMPLETED or not job.output_url:
        raise HTTPException(404, f"job_id {job_id!r} has no output ({job.status})")
    if not media.resolve(job.output_url, "output").is_file():
        raise HTTPException(404, f"job_id {job_id!r}: its output {job.output_url} was deleted")
    return LastFrame(job_id=job_id, url=job.output_url, path=job.output_url)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a queued job, or stop a running one at its next step")
def cancel(job_id: str, jobs: JobsDep, worker: WorkerDep) -> CancelAnswer:
    if jobs.get(job_id) is None:
        raise HTTPException(404, f"job_id {job_id!r}: no such job")
    return CancelAnswer(job_id=job_id, status=worker.cancel(job_id))


@router.get("/projects/{project_id}/active_jobs", summary="The project's queued and running jobs")
def active_jobs(project_id: str, jobs: JobsDep, session: SessionDep) -> list[JobState]:
    require_project(session, project_id)
    return [JobState.of(job) for job in jobs.active(project_id)]


@router.get("/gpu/status", summary="Whether the model is busy, and how many jobs wait")
def gpu_status(worker: WorkerDep) -> GpuStatus:
    return GpuStatus(**asdict(worker.status()))
