"""Inpainting jobs, and masks from the segmentation service (points and labels arrive as JSON, never code)."""

import re
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from flux2.studio.api.deps import JobsDep, MediaDep, ModelDep, SegmentationDep, WorkerDep
from flux2.studio.api.jobs import fitted, queue_job
from flux2.studio.api.responses import Detection, InpaintQueued, Mask, SamHealth
from flux2.studio.api.schemas import InpaintRequest, SegmentRequest, TextSegmentRequest
from flux2.studio.payloads import InpaintJob
from flux2.studio.segmentation import SegmentationError
from flux2.studio.storage import check_safe_id

router = APIRouter(tags=["edit"])
PROJECT_URL = re.compile(r"^/?projects/([A-Za-z0-9_-]+)/")
# The request is checked before the segmentation service is asked for a mask; this stands in for that mask.
MASK_TO_COME = "(the mask the segmentation service makes)"


@router.post("/edit/inpaint", summary="Queue an inpainting job; the mask is given, or made from text or points")
async def inpaint(
    body: InpaintRequest,
    jobs: JobsDep,
    worker: WorkerDep,
    media: MediaDep,
    model: ModelDep,
    segmentation: SegmentationDep,
    job_id: Annotated[str | None, Query()] = None,
) -> InpaintQueued:
    image = _resolve(media, body.image_path, "image_path")
    if job_id is not None:
        try:
            check_safe_id("job_id", job_id)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        if await run_in_threadpool(jobs.get, job_id) is not None:
            raise HTTPException(409, f"job_id {job_id!r} is already taken")
    if body.points is not None and body.labels is not None and len(body.labels) != len(body.points):
        raise HTTPException(422, f"labels: {len(body.labels)} labels for {len(body.points)} points")
    project_id = _project_of(media.url_for(image))
    if project_id is None:
        raise HTTPException(422, "image_path must be an image of a project (/projects/<id>/...): upload it with "
                                 "its project_id")  # fmt: skip
    if not (body.mask_path or body.text_mask or body.points):
        raise HTTPException(422, "give a mask: mask_path, text_mask (words) or points ([[x, y], ...])")
    given_mask = media.url_for(_resolve(media, body.mask_path, "mask_path")) if body.mask_path else None
    request, notes = fitted(body, body.to_request(media.url_for(image), given_mask or MASK_TO_COME), model)
    mask_path = given_mask or await _segmented_mask(body, media, segmentation, image, project_id)
    payload = InpaintJob(project_id=project_id, request=request.with_inputs(mask=mask_path), notes=notes)
    try:
        queued = await run_in_threadpool(queue_job, jobs, worker, payload, job_id)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None
    return InpaintQueued(**queued.model_dump(), mask_path=mask_path)


@router.post("/edit/segment", summary="A mask from points, by the segmentation service")
async def segment(body: SegmentRequest, media: MediaDep, segmentation: SegmentationDep) -> Mask:
    image = _resolve(media, body.image_path, "image_path")
    labels = body.labels or [1] * len(body.points)
    if len(labels) != len(body.points):
        raise HTTPException(422, f"labels: {len(labels)} labels for {len(body.points)} points")
    mask = segmentation.mask_from_points(await _read(image), body.points, labels)
    return Mask(mask_path=await _save_mask(media, mask, _project_of(media.url_for(image))))


@router.post("/edit/segment-text", summary="A mask of what the text names, by the segmentation service")
async def segment_text(body: TextSegmentRequest, media: MediaDep, segmentation: SegmentationDep) -> Mask:
    image = _resolve(media, body.image_path, "image_path")
    mask = segmentation.mask_from_text(await _read(image), body.text, body.confidence)
    return Mask(mask_path=await _save_mask(media, mask, _project_of(media.url_for(image))))


@router.post("/edit/detect", summary="Objects the text names: boxes, scores and masks")
async def detect(body: TextSegmentRequest, media: MediaDep, segmentation: SegmentationDep) -> Detection:
    image = _resolve(media, body.image_path, "image_path")
    found = await _segmentation(segmentation.detect(await _read(image), body.text, body.confidence))
    try:
        return Detection.model_validate(found)
    except ValidationError as err:
        raise HTTPException(502, f"the segmentation service's /detect answer is malformed: {err}") from None


@router.get("/sam/health", summary="Whether the segmentation service answers, and how fast")
async def sam_health(segmentation: SegmentationDep) -> SamHealth:
    health = await segmentation.health()
    return SamHealth(online=health.online, latency_ms=health.latency_ms, status=health.status)


async def _segmented_mask(body: InpaintRequest, media, segmentation, image, project_id: str) -> str:
    """The mask the segmentation service makes from the body's words or points, saved with the project."""
    picture = await _read(image)
    if body.text_mask:
        return await _save_mask(media, segmentation.mask_from_text(picture, body.text_mask), project_id)
    labels = body.labels or [1] * len(body.points)
    return await _save_mask(media, segmentation.mask_from_points(picture, body.points, labels), project_id)


async def _save_mask(media, pending, project_id: str | None) -> str:
    png = await _segmentation(pending)
    path = await run_in_threadpool(media.save_upload, png, "mask.png", project_id, "general")
    return media.url_for(path)


async def _read(path) -> bytes:
    return await run_in_threadpool(path.read_bytes)


async def _segmentation(pending):
    try:
        return await pending
    except SegmentationError as err:
        raise HTTPException(503 if err.unavailable else 502, str(err)) from None


def _resolve(media, client_path: str, field: str):
    try:
        path = media.resolve(client_path, field)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    if not path.is_file():
        raise HTTPException(404, f"{field} {client_path!r}: no such file")
    return path


def _project_of(url: str) -> str | None:
    match = PROJECT_URL.match(url)
    return match.group(1) if match else None
