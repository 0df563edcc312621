"""Inpainting jobs, and masks from the segmentation service (points and labels arrive as JSON, never code)."""

import re
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool

from flux2.studio.api.deps import StudioDep
from flux2.studio.api.jobs import queue_job
from flux2.studio.api.schemas import InpaintRequest, SegmentRequest, TextSegmentRequest
from flux2.studio.segmentation import SegmentationError
from flux2.studio.storage import check_safe_id

router = APIRouter(tags=["edit"])
PROJECT_URL = re.compile(r"^/?projects/([A-Za-z0-9_-]+)/")


@router.post("/edit/inpaint", summary="Queue an inpainting job; the mask is given, or made from text or points")
async def inpaint(body: InpaintRequest, studio: StudioDep, job_id: Annotated[str | None, Query()] = None) -> dict:
    image = _resolve(studio, body.image_path, "image_path")
    if job_id is not None:
        try:
            check_safe_id("job_id", job_id)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        if await run_in_threadpool(studio.jobs.get, job_id) is not None:
            raise HTTPException(409, f"job_id {job_id!r} is already taken")
    if body.points is not None and body.labels is not None and len(body.labels) != len(body.points):
        raise HTTPException(422, f"labels: {len(body.labels)} labels for {len(body.points)} points")
    project_id = _project_of(studio.media.url_for(image))
    if project_id is None:
        raise HTTPException(422, "image_path must be an image of a project (/projects/<id>/...): upload it with "
                                 "its project_id")  # fmt: skip
    if body.mask_path:
        mask_path = studio.media.url_for(_resolve(studio, body.mask_path, "mask_path"))
    elif body.text_mask:
        mask_path = await _save_mask(studio, studio.segmentation.mask_from_text(await _read(image), body.text_mask),
                                     project_id)  # fmt: skip
    elif body.points:
        labels = body.labels or [1] * len(body.points)
        mask_path = await _save_mask(studio, studio.segmentation.mask_from_points(await _read(image), body.points,
                                                                                  labels), project_id)  # fmt: skip
    else:
        raise HTTPException(422, "give a mask: mask_path, text_mask (words) or points ([[x, y], ...])")
    params = {**body.model_dump(exclude={"points", "labels", "text_mask"}), "mask_path": mask_path,
              "image_path": studio.media.url_for(image)}  # fmt: skip
    try:
        queued = await run_in_threadpool(queue_job, studio, "inpaint", project_id, body.prompt, params, job_id)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None
    return {**queued, "mask_path": mask_path}


@router.post("/edit/segment", summary="A mask from points, by the segmentation service")
async def segment(body: SegmentRequest, studio: StudioDep) -> dict:
    image = _resolve(studio, body.image_path, "image_path")
    labels = body.labels or [1] * len(body.points)
    if len(labels) != len(body.points):
        raise HTTPException(422, f"labels: {len(labels)} labels for {len(body.points)} points")
    mask = studio.segmentation.mask_from_points(await _read(image), body.points, labels)
    return {"mask_path": await _save_mask(studio, mask, _project_of(studio.media.url_for(image)))}


@router.post("/edit/segment-text", summary="A mask of what the text names, by the segmentation service")
async def segment_text(body: TextSegmentRequest, studio: StudioDep) -> dict:
    image = _resolve(studio, body.image_path, "image_path")
    mask = studio.segmentation.mask_from_text(await _read(image), body.text, body.confidence)
    return {"mask_path": await _save_mask(studio, mask, _project_of(studio.media.url_for(image)))}


@router.post("/edit/detect", summary="Objects the text names: boxes, scores and masks")
async def detect(body: TextSegmentRequest, studio: StudioDep) -> dict:
    image = _resolve(studio, body.image_path, "image_path")
    return await _segmentation(studio.segmentation.detect(await _read(image), body.text, body.confidence))


@router.get("/sam/health", summary="Whether the segmentation service answers, and how fast")
async def sam_health(studio: StudioDep) -> dict:
    health = await studio.segmentation.health()
    return {"online": health.online, "latency_ms": health.latency_ms, "status": health.status}


async def _save_mask(studio, pending, project_id: str | None) -> str:
    png = await _segmentation(pending)
    path = await run_in_threadpool(studio.media.save_upload, png, "mask.png", project_id, "general")
    return studio.media.url_for(path)


async def _read(path) -> bytes:
    return await run_in_threadpool(path.read_bytes)


async def _segmentation(pending):
    try:
        return await pending
    except SegmentationError as err:
        raise HTTPException(503 if err.unavailable else 502, str(err)) from None


def _resolve(studio, client_path: str, field: str):
    try:
        path = studio.media.resolve(client_path, field)
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    if not path.is_file():
        raise HTTPException(404, f"{field} {client_path!r}: no such file")
    return path


def _project_of(url: str) -> str | None:
    match = PROJECT_URL.match(url)
    return match.group(1) if match else None
