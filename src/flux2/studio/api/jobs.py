"""Jobs: start image generation, follow it, cancel it; the queue's state."""

from fastapi import APIRouter, HTTPException

from flux2.studio.api.deps import SessionDep, StudioDep
from flux2.studio.api.schemas import AdvancedRequest, GenerateImageRequest
from flux2.studio.records import Job, Project

router = APIRouter(tags=["jobs"])


def job_status(job: Job) -> dict:
    """The one status schema of every job, live or finished (`error` repeats error_message for older clients)."""
    return {
        "job_id": job.id,
        "type": job.type,
        "project_id": job.project_id,
        "status": job.status,
        "progress": job.progress,
        "status_message": job.status_message,
        "error_message": job.error_message,
        "error": job.error_message,
        "asset_id": job.asset_id,
        "seed": job.seed,
        "output_url": job.output_url,
        "thumbnail_url": job.thumbnail_url,
        "enhanced_prompt": job.enhanced_prompt,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


def queue_job(studio, job_type: str, project_id: str | None, prompt: str, params: dict, job_id: str | None = None):
    job = studio.jobs.create(job_type, project_id, prompt, params, seed=params.get("seed"), job_id=job_id)
    studio.worker.submit(job.id)
    return {"job_id": job.id, "status": "queued"}


def require_project(session, project_id: str) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise HTTPException(404, f"project_id {project_id!r}: no such project")
    return project


@router.post("/generate/image", summary="Queue a text-to-image job (with element or image references)")
def generate_image(body: GenerateImageRequest, studio: StudioDep, session: SessionDep) -> dict:
    require_project(session, body.project_id)
    return queue_job(studio, "image", body.project_id, body.prompt, body.model_dump())


@router.post("/generate/advanced", summary="The studio's shot generation: one frame is an image job")
def generate_advanced(body: AdvancedRequest, studio: StudioDep, session: SessionDep) -> dict:
    require_project(session, body.project_id)
    shot = body.shot_config
    if shot.num_frames != 1:
        raise HTTPException(501, "video generation is not part of this service: only num_frames == 1 (an image)")
    params = {**shot.model_dump(), "guidance_scale": shot.cfg_scale}
    return queue_job(studio, "advanced", body.project_id, shot.prompt, params)


@router.get("/status/{job_id}", summary="A job's status (the same schema for every job type)")
def status(job_id: str, studio: StudioDep) -> dict:
    job = studio.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"job_id {job_id!r}: no such job")
    return job_status(job)


@router.post("/jobs/{job_id}/cancel", summary="Cancel a queued job, or stop a running one at its next step")
def cancel(job_id: str, studio: StudioDep) -> dict:
    if studio.jobs.get(job_id) is None:
        raise HTTPException(404, f"job_id {job_id!r}: no such job")
    return {"job_id": job_id, "status": studio.worker.cancel(job_id)}


@router.get("/projects/{project_id}/active_jobs", summary="The project's queued and running jobs")
def active_jobs(project_id: str, studio: StudioDep) -> list[dict]:
    return [job_status(job) for job in studio.jobs.active(project_id)]


@router.get("/gpu/status", summary="Whether the model is busy, and how many jobs wait")
def gpu_status(studio: StudioDep) -> dict:
    return studio.worker.status()
