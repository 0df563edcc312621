"""Jobs: start image generation, follow it, cancel it; the queue's state."""

from fastapi import APIRouter, HTTPException

from flux2.studio.api.deps import SessionDep, StudioDep
from flux2.studio.api.schemas import AdvancedRequest, GenerateImageRequest
from flux2.studio.records import Asset, Element, Project, job_status

router = APIRouter(tags=["jobs"])


def queue_job(studio, job_type: str, project_id: str | None, prompt: str, params: dict, job_id: str | None = None):
    job = studio.jobs.create(job_type, project_id, prompt, params, seed=params.get("seed"), job_id=job_id)
    studio.worker.submit(job.id)
    return {"job_id": job.id, "status": "queued"}


def check_references(studio, session, project_id: str, items: list[str]) -> None:
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
            path = studio.media.resolve(item, f"reference_images[{i}]")
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
def generate_image(body: GenerateImageRequest, studio: StudioDep, session: SessionDep) -> dict:
    require_project(session, body.project_id)
    check_references(studio, session, body.project_id, body.reference_images)
    return queue_job(studio, "image", body.project_id, body.prompt, body.model_dump())


@router.post("/generate/advanced", summary="The studio's shot generation: one frame is an image job")
def generate_advanced(body: AdvancedRequest, studio: StudioDep, session: SessionDep) -> dict:
    require_project(session, body.project_id)
    shot = body.shot_config
    if shot.num_frames != 1:
        raise HTTPException(501, "video generation is not part of this service: only num_frames == 1 (an image)")
    check_references(studio, session, body.project_id, shot.reference_images)
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
def active_jobs(project_id: str, studio: StudioDep, session: SessionDep) -> list[dict]:
    require_project(session, project_id)
    return [job_status(job) for job in studio.jobs.active(project_id)]


@router.get("/gpu/status", summary="Whether the model is busy, and how many jobs wait")
def gpu_status(studio: StudioDep) -> dict:
    return studio.worker.status()
