"""The storyboard: concept-art thumbnails of a project's shots, one image job per shot. Each job's picture
becomes its shot's thumbnail_url when the job completes (flux2.studio.jobs_store.JobStore.complete_with_asset)."""

from fastapi import APIRouter, HTTPException
from sqlmodel import col, select

from flux2.registry import ModelInfo
from flux2.request import GenerationRequest
from flux2.studio.api.deps import JobsDep, ModelDep, SessionDep, WorkerDep
from flux2.studio.api.jobs import Notes, queue_job, require_project
from flux2.studio.api.responses import ThumbnailQueued, ThumbnailsQueued
from flux2.studio.api.schemas import ThumbnailRequest, on_image_grid
from flux2.studio.payloads import ThumbnailJob
from flux2.studio.records import Shot

router = APIRouter(tags=["storyboard"])


@router.post("/projects/{project_id}/storyboard/generate-thumbnails",
             summary="Queue a concept-art thumbnail for each shot (one image job each)")  # fmt: skip
def generate_thumbnails(project_id: str, body: ThumbnailRequest, jobs: JobsDep, worker: WorkerDep, model: ModelDep,
                        session: SessionDep) -> ThumbnailsQueued:  # fmt: skip
    """Shots that have a thumbnail already are skipped unless `force`. Every shot is checked before any job is
    queued: an unknown shot is a 404 naming it, a shot the model cannot draw a 422 naming it."""
    require_project(session, project_id)
    wanted = list(dict.fromkeys(body.shot_ids))
    query = select(Shot).where(Shot.project_id == project_id, col(Shot.id).in_(wanted))
    shots = {shot.id: shot for shot in session.exec(query)}
    if missing := [shot_id for shot_id in wanted if shot_id not in shots]:
        raise HTTPException(404, f"shot_ids: no such shot in project {project_id!r}: {', '.join(map(repr, missing))}")
    results: list[ThumbnailQueued] = []
    payloads: list[ThumbnailJob] = []
    for shot_id in wanted:
        shot = shots[shot_id]
        if shot.thumbnail_url and not body.force:
            results.append(ThumbnailQueued(shot_id=shot_id, status="skipped", detail="it has a thumbnail already"))
            continue
        request, notes = thumbnail_request(shot, body, model)
        payloads.append(ThumbnailJob(project_id=project_id, shot_id=shot_id, request=request, notes=notes))
    for payload in payloads:
        queued = queue_job(jobs, worker, payload)
        results.append(ThumbnailQueued(shot_id=payload.shot_id, status="queued", job_id=queued.job_id))
    order = {shot_id: i for i, shot_id in enumerate(wanted)}
    return ThumbnailsQueued(status="success", results=sorted(results, key=lambda result: order[result.shot_id]))


def thumbnail_request(shot: Shot, body: ThumbnailRequest, model: ModelInfo) -> tuple[GenerationRequest, Notes]:
    """The shot's picture as a request for the served model: its prompt (or its action), negative prompt, seed,
    and size (the body's, else the shot's, on the model's 16-pixel grid as shots are)."""
    prompt = shot.prompt or shot.action
    if not prompt:
        raise HTTPException(422, f"shot {shot.id!r} has no prompt or action to draw")
    width, height = (body.width or shot.width, body.height or shot.height)
    width, height = (None if side is None else on_image_grid(side) for side in (width, height))
    try:
        request = GenerationRequest(prompt=prompt, negative_prompt=shot.negative_prompt or "", width=width,
                                    height=height, seed=shot.seed, upsample=False)  # fmt: skip
        return request.fitted(model)
    except ValueError as err:
        raise HTTPException(422, f"shot {shot.id!r}: {err}") from None
