"""Editing jobs (inpainting, outpainting, image-to-image), and masks from the segmentation service (points and
labels arrive as JSON, never code).

/edit/segment and /edit/detect take two forms, told apart by the request's content type: JSON naming a stored
picture (`image_path`), or multipart with the picture itself as the file `image`, as the studio's masking canvas
sends it (points and labels as JSON strings). The multipart /edit/segment answers the mask itself (a PNG body),
the JSON one the stored mask's URL.
"""

import io
import json
import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from flux2.editing import binary_mask
from flux2.images import open_mask
from flux2.params import PIXELS_PER_TOKEN
from flux2.request import MAX_SIDE
from flux2.studio.api.deps import JobsDep, MediaDep, ModelDep, SegmentationDep, SessionDep, WorkerDep
from flux2.studio.api.jobs import IdempotencyKey, Submission, earlier_job, fitted, queue_job
from flux2.studio.api.responses import FoundObjects, InpaintQueued, Mask, Queued, SamHealth
from flux2.studio.api.schemas import (
    DetectForm,
    Img2ImgRequest,
    InpaintRequest,
    OutpaintRequest,
    SegmentForm,
    SegmentRequest,
    SourceEditRequest,
    TextSegmentRequest,
)
from flux2.studio.payloads import Img2ImgJob, InpaintJob, OutpaintJob, read_payload
from flux2.studio.records import Asset
from flux2.studio.segmentation import SegmentationError
from flux2.studio.storage import check_safe_id

router = APIRouter(tags=["edit"])
PROJECT_URL = re.compile(r"^/?projects/([A-Za-z0-9_-]+)/")
# The request is checked before the segmentation service is asked for a mask; this stands in for that mask.
MASK_TO_COME = "(the mask the segmentation service makes)"
MULTIPART = "multipart/form-data"
M = TypeVar("M", bound=BaseModel)
FORM_MAX_FIELDS = 8  # image, points, labels / text, confidence, and a few the front end may add
FORM_MAX_FILES = 3  # the picture; a field sent as a file by mistake is then named in the answer, not counted
FORM_OVERHEAD = 64 * 1024  # form fields and boundaries around the picture's bytes
PNG_ANSWER = {"description": "multipart: the mask (PNG, 0/255); JSON: the stored mask's URL",
              "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}  # fmt: skip


def _two_forms(json_body: type[BaseModel], form: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a route that takes JSON or multipart (the route reads the request itself)."""
    fields = form.model_json_schema()
    multipart = {**fields, "properties": {"image": {"type": "string", "format": "binary"}, **fields["properties"]},
                 "required": ["image", *fields.get("required", [])]}  # fmt: skip
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_body.model_json_schema()},
        MULTIPART: {"schema": multipart}}}}  # fmt: skip


@router.post("/edit/inpaint", summary="Queue an inpainting job; the mask is given, or made from text or points")
async def inpaint(
    body: InpaintRequest,
    jobs: JobsDep,
    worker: WorkerDep,
    media: MediaDep,
    model: ModelDep,
    segmentation: SegmentationDep,
    session: SessionDep,
    job_id: Annotated[str | None, Query()] = None,
    idempotency_key: IdempotencyKey = None,
) -> InpaintQueued:
    submission = Submission.of(idempotency_key, "/edit/inpaint", body, job_id)
    if (earlier := await run_in_threadpool(earlier_job, session, submission)) is not None:
        return _inpaint_queued(earlier)
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
    mask_file = _resolve(media, body.mask_path, "mask_path") if body.mask_path else None
    given_mask = media.url_for(mask_file) if mask_file else None
    request, notes = fitted(body, body.to_request(media.url_for(image), given_mask or MASK_TO_COME), model, media)
    if mask_file is not None:
        await run_in_threadpool(_check_mask, image, mask_file, given_mask)
    mask_path = given_mask or await _segmented_mask(body, media, segmentation, image, project_id)
    payload = InpaintJob(project_id=project_id, request=request.with_inputs(mask=mask_path), notes=notes)
    try:
        queued = await run_in_threadpool(queue_job, jobs, worker, payload, job_id, submission, session)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None
    return InpaintQueued(**queued.model_dump(), mask_path=mask_path)


def _inpaint_queued(job) -> InpaintQueued:
    """The answer the job's first submission got."""
    return InpaintQueued(job_id=job.id, status="queued", mask_path=read_payload(job).request.mask)


@router.post("/edit/outpaint", summary="Queue an outpainting job: the picture on a canvas grown by the margins")
async def outpaint(body: OutpaintRequest, jobs: JobsDep, worker: WorkerDep, media: MediaDep, model: ModelDep,
                   session: SessionDep, idempotency_key: IdempotencyKey = None) -> Queued:  # fmt: skip
    if not (body.left or body.right or body.top or body.bottom):
        raise HTTPException(422, "left, right, top, bottom: give at least one margin above 0 px (the border to add)")
    return await _queue_source_edit("/edit/outpaint", body, OutpaintJob, jobs, worker, media, model, session,
                                    idempotency_key)  # fmt: skip


@router.post("/edit/img2img", summary="Queue an image-to-image job: the picture noised to `strength`, redrawn")
async def img2img(body: Img2ImgRequest, jobs: JobsDep, worker: WorkerDep, media: MediaDep, model: ModelDep,
                  session: SessionDep, idempotency_key: IdempotencyKey = None) -> Queued:  # fmt: skip
    return await _queue_source_edit("/edit/img2img", body, Img2ImgJob, jobs, worker, media, model, session,
                                    idempotency_key)  # fmt: skip


async def _queue_source_edit(route: str, body: SourceEditRequest, kind: type[OutpaintJob | Img2ImgJob], jobs, worker,
                             media, model, session, idempotency_key: str | None) -> Queued:  # fmt: skip
    """The outpainting and image-to-image routes: the source found, the body checked against the served model
    and the source's size, the job queued (or, for a retry with its Idempotency-Key, the job it made)."""
    submission = Submission.of(idempotency_key, route, body)
    if (earlier := await run_in_threadpool(earlier_job, session, submission)) is not None:
        return Queued(job_id=earlier.id, status="queued")
    image, project_id = await run_in_threadpool(_source, media, session, body.image_path)
    request, notes = fitted(body, body.to_request(media.url_for(image)), model, media)
    size = await run_in_threadpool(_picture_size, image)
    if isinstance(body, OutpaintRequest):
        _check_canvas(size, body)
    payload = kind(project_id=project_id, request=request, notes=notes)
    try:
        return await run_in_threadpool(queue_job, jobs, worker, payload, None, submission, session)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None


def _source(media, session, given: str) -> tuple[Path, str]:
    """The picture to edit and its project: an asset's file, or a media path inside a project's folder."""
    asset = session.get(Asset, given) if not given.startswith("/") else None
    image = _resolve(media, asset.url if asset is not None else given, "image_path")
    project_id = _project_of(media.url_for(image))
    if project_id is None:
        raise HTTPException(422, "image_path must be an asset id or an image of a project (/projects/<id>/...): "
                                 "upload it with its project_id")  # fmt: skip
    return image, project_id


def _picture_size(image: Path) -> tuple[int, int]:
    try:
        with Image.open(image) as picture:
            return picture.size
    except (OSError, Image.DecompressionBombError) as err:
        raise HTTPException(422, f"image_path: not a readable image ({err})") from None


def _check_canvas(size: tuple[int, int], body: OutpaintRequest) -> None:
    """The grown canvas, checked now rather than when the job runs: on the model's 16 px grid, at most MAX_SIDE
    each way."""
    for sides, before, grow in (("left and right", size[0], body.left + body.right),
                                ("top and bottom", size[1], body.top + body.bottom)):  # fmt: skip
        after = before + grow
        what = f"{sides}: the picture's {before} px grow to {after} px"
        if after > MAX_SIDE:
            raise HTTPException(422, f"{what}, over the {MAX_SIDE} px a side may have: use smaller margins")
        if after % PIXELS_PER_TOKEN:
            more, less = PIXELS_PER_TOKEN - after % PIXELS_PER_TOKEN, after % PIXELS_PER_TOKEN
            hint = f"add {more} px" + (f" or take away {less} px" if grow >= less else "")
            raise HTTPException(422, f"{what}, not a multiple of {PIXELS_PER_TOKEN}: {hint}")


def _check_mask(image: Path, mask: Path, mask_url: str) -> None:
    """The engine's own check (flux2.editing: `check_mask_size` inside `binary_mask`), now rather than when the
    job runs: one channel, and the image's size or aspect ratio."""
    try:
        with Image.open(image) as picture:
            size = picture.size
    except (OSError, Image.DecompressionBombError) as err:
        raise HTTPException(422, f"image_path: not a readable image ({err})") from None
    try:
        binary_mask(open_mask(mask), size)
    except (ValueError, Image.DecompressionBombError) as err:
        raise HTTPException(422, f"mask_path {mask_url!r}: {err}") from None


@router.post("/edit/segment", summary="A mask from points, by the segmentation service: JSON or multipart",
             responses={200: PNG_ANSWER}, openapi_extra=_two_forms(SegmentRequest, SegmentForm))  # fmt: skip
async def segment(request: Request, media: MediaDep, segmentation: SegmentationDep) -> Mask:
    if _is_multipart(request):
        async with _form(request, media.max_upload_bytes) as form:
            picture = await _form_image(form, media.max_upload_bytes)
            fields = _validated(SegmentForm, {name: _json_field(form, name) for name in ("points", "labels")})
        labels = _labels(fields.points, fields.labels)
        png = await _segmentation(segmentation.mask_from_points(picture, fields.points, labels))
        return Response(png, media_type="image/png")
    body = _validated(SegmentRequest, await request.body())
    image = _resolve(media, body.image_path, "image_path")
    labels = _labels(body.points, body.labels)
    mask = segmentation.mask_from_points(await _read(image), body.points, labels)
    return Mask(mask_path=await _save_mask(media, mask, _project_of(media.url_for(image))))


@router.post("/edit/segment-text", summary="A mask of what the text names, by the segmentation service")
async def segment_text(body: TextSegmentRequest, media: MediaDep, segmentation: SegmentationDep) -> Mask:
    image = _resolve(media, body.image_path, "image_path")
    mask = segmentation.mask_from_text(await _read(image), body.text, body.confidence)
    return Mask(mask_path=await _save_mask(media, mask, _project_of(media.url_for(image))))


@router.post("/edit/detect", summary="Objects the text names: boxes, scores and masks; JSON or multipart",
             openapi_extra=_two_forms(TextSegmentRequest, DetectForm))  # fmt: skip
async def detect(request: Request, media: MediaDep, segmentation: SegmentationDep) -> FoundObjects:
    if _is_multipart(request):
        async with _form(request, media.max_upload_bytes) as form:
            picture = await _form_image(form, media.max_upload_bytes)
            fields = _validated(DetectForm, {name: _text_field(form, name) for name in ("text", "confidence")
                                             if form.get(name) is not None})  # fmt: skip
    else:
        fields = _validated(TextSegmentRequest, await request.body())
        picture = await _read(_resolve(media, fields.image_path, "image_path"))
    found = await _segmentation(segmentation.detect(picture, fields.text, fields.confidence))
    try:
        return FoundObjects.model_validate(found)
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


def _labels(points: list[list[float]], labels: list[int] | None) -> list[int]:
    """One label per point; all foreground when none are given."""
    labels = labels or [1] * len(points)
    if len(labels) != len(points):
        raise HTTPException(422, f"labels: {len(labels)} labels for {len(points)} points")
    return labels


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith(MULTIPART)


def _form(request: Request, max_bytes: int):
    """The request's form (as an async context manager, which closes its files); a body announced as larger
    than a picture of `max_bytes` may be is refused before it is read."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes + FORM_OVERHEAD:
        raise HTTPException(413, f"image: pictures are limited to {max_bytes} bytes")
    return request.form(max_files=FORM_MAX_FILES, max_fields=FORM_MAX_FIELDS)


def _validated(model: type[M], data: bytes | dict[str, Any]) -> M:
    """`data` (a JSON body, or form fields) as `model`; a 422 naming each bad field, as FastAPI words them."""
    try:
        return model.model_validate_json(data) if isinstance(data, bytes) else model.model_validate(data)
    except ValidationError as err:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in err.errors(include_url=False)]
        raise RequestValidationError(errors) from None


def _text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if isinstance(value, UploadFile):
        raise HTTPException(422, f"{name} must be a text field, not a file")
    return value


def _json_field(form: FormData, name: str) -> Any:
    """A form field that holds JSON (the canvas sends points and labels so); None when it is not there."""
    text = _text_field(form, name)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise HTTPException(422, f"{name} must be a JSON string such as [[120, 80]], got {text[:80]!r}") from None


async def _form_image(form: FormData, max_bytes: int) -> bytes:
    """The picture sent as the file field `image`: an image of at most `max_bytes` bytes."""
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        what = "no field `image`" if upload is None else "a text field"
        raise HTTPException(422, f"image: send the picture as a file field named image (got {what})")
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"image: pictures are limited to {max_bytes} bytes")
    await run_in_threadpool(_check_picture, data)
    return data


def _check_picture(data: bytes) -> None:
    try:
        with Image.open(io.BytesIO(data)) as picture:
            picture.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise HTTPException(422, f"image: not a readable picture (PNG, JPEG, WebP...): {err}") from None


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
