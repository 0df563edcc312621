"""OpenAI's images API beside the studio routes, for clients that speak it (the `openai` packages, LangChain, Open
WebUI): POST /v1/images/generations (JSON) and /v1/images/edits (multipart: `image` or several `image[]`, and an
optional `mask`).

The API is synchronous for its client, the service is not: each of the `n` images is one studio job (seeds seed,
seed + 1, ...), queued through the same job machinery as every other route, so it shows in the queue, runs on the
one worker and can be cancelled (POST /jobs/{id}/cancel). The route waits for its jobs on the worker's events,
without blocking the event loop, and answers their images as base64 or as URLs of the studio's media route. A client
that goes away takes its jobs with it: they are cancelled.

The jobs and uploads belong to one project, "OpenAI images API" (id `openai-images`), made on first use: the
studio shows their images like any other. Errors have OpenAI's shape (openai_schemas.OpenAIError), on these routes
only; the API token is the service's (`Authorization: Bearer <token>`, which is what the clients send).
"""

import asyncio
import base64
import io
import time
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image, ImageOps
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import FormData, UploadFile

from flux2.editing import binary_mask, check_mask_size, working_size
from flux2.provenance import read_provenance, save_with_provenance
from flux2.registry import ModelInfo
from flux2.request import GenerationRequest
from flux2.studio.api.deps import JobsDep, MediaDep, ModelDep, SessionDep, SettingsDep, WorkerDep
from flux2.studio.api.jobs import queue_job
from flux2.studio.api.openai_schemas import (
    ERROR_ANSWERS,
    ImageDatum,
    ImageEditFields,
    ImageGenerationBody,
    ImageOptions,
    ImagesAnswer,
    OpenAIError,
    edit_form_schema,
    from_validation,
    parse_size,
    quality_steps,
    served_model,
    validated,
)
from flux2.studio.config import StudioSettings
from flux2.studio.events import EventBus
from flux2.studio.jobs_store import JobStore
from flux2.studio.payloads import ImageJob, InpaintJob, JobPayload
from flux2.studio.records import TERMINAL, Asset, Job, JobStatus, Project
from flux2.studio.storage import MediaStore
from flux2.studio.worker import Worker

PROJECT_ID = "openai-images"
PROJECT_NAME = "OpenAI images API"
WAKE_S = 1.0  # the jobs' rows are read again at least this often: a client's event queue may have dropped events
END_EVENTS = ("complete", "error", "cancelled")
MAX_EDIT_IMAGES = 10  # as the studio's reference_images
FORM_MAX_FIELDS = 24  # the text fields of ImageOptions, and a few a client may add
FORM_OVERHEAD = 64 * 1024  # form fields and boundaries around the files
FILE_FIELDS = ("image", "image[]", "mask")
# Request fields under the API's names, for error messages ("width must be..." -> "size: width must be...").
API_NAMES = {"width": "size", "height": "size", "num_steps": "quality", "num_images": "n", "prompt": "prompt",
             "seed": "seed"}  # fmt: skip


class OpenAIRoute(APIRoute):
    """Answers every error of its routes in OpenAI's shape, so these routes alone change the service's errors."""

    def get_route_handler(self):
        handle = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handle(request)
            except OpenAIError as err:
                return err.response()
            except RequestValidationError as err:
                return from_validation(list(err.errors()), ImageGenerationBody).response()
            except HTTPException as err:
                status = err.status_code if err.status_code in (401, 404) else 400
                return OpenAIError(status, str(err.detail)).response()
            except ValueError as err:  # the studio's own checks name the field (the app answers them 400 too)
                return OpenAIError(400, str(err)).response()

        return answer


PREFIX = "/v1"
router = APIRouter(prefix=PREFIX, tags=["openai"], route_class=OpenAIRoute, responses=ERROR_ANSWERS)


def unauthorized() -> JSONResponse:
    """The app's gatekeeper answer to a request of these routes without the right token, in OpenAI's shape (the
    clients then say why: openai.AuthenticationError with this message)."""
    message = "missing or wrong API token: send Authorization: Bearer <token> (the openai clients' api_key)"
    return OpenAIError(401, message, None, "invalid_api_key").response()


@dataclass(frozen=True)
class Service:
    """The parts of the studio these routes use."""

    jobs: JobStore
    worker: Worker
    media: MediaStore
    model: ModelInfo
    settings: StudioSettings


def _service(jobs: JobsDep, worker: WorkerDep, media: MediaDep, model: ModelDep, settings: SettingsDep) -> Service:
    return Service(jobs, worker, media, model, settings)


ServiceDep = Annotated[Service, Depends(_service)]


@router.post("/images/generations", summary="OpenAI-compatible: images from a prompt",
             response_model_exclude_none=True)  # fmt: skip
async def generations(body: ImageGenerationBody, request: Request, service: ServiceDep,
                      session: SessionDep) -> ImagesAnswer:  # fmt: skip
    served_model(body.model, service.model)
    body.image_format()  # a format that cannot be answered is refused before any work
    width, height = parse_size(body.size) or (None, None)
    requests, notes = _series(_base_request(body, service, width=width, height=height), body.n, service.model)
    await run_in_threadpool(_ensure_project, session)
    payloads = [ImageJob(project_id=PROJECT_ID, request=each, notes=notes) for each in requests]
    return await _answer(request, service, body, payloads)


@router.post("/images/edits", summary="OpenAI-compatible: edit images (with a mask: inpaint the transparent part)",
             response_model_exclude_none=True, openapi_extra=edit_form_schema())  # fmt: skip
async def edits(request: Request, service: ServiceDep, session: SessionDep) -> ImagesAnswer:
    limit = service.media.max_upload_bytes
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise OpenAIError(400, "send the edit as multipart/form-data: the files image (or image[]) and mask, and "
                               "the text fields", None, "invalid_request")  # fmt: skip
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > (MAX_EDIT_IMAGES + 1) * limit + FORM_OVERHEAD:
        raise OpenAIError(400, f"the request is {length} bytes: each file is limited to {limit} bytes, and an "
                               f"edit takes at most {MAX_EDIT_IMAGES} images and a mask", "image",
                          "file_too_large")  # fmt: skip
    async with request.form(max_files=MAX_EDIT_IMAGES + 1, max_fields=FORM_MAX_FIELDS) as form:
        fields = validated(ImageEditFields, _text_fields(form))
        served_model(fields.model, service.model)
        fields.image_format()
        images = [await _read(upload, limit, field) for field, upload in _images(form)]
        mask = await _read(form["mask"], limit, "mask") if "mask" in form else None
    edit = await run_in_threadpool(_prepared_edit, fields, images, mask, service.model)
    requests, notes = _series(edit.request(fields, service), fields.n, service.model)
    await run_in_threadpool(_ensure_project, session)
    stored = await run_in_threadpool(_store, service.media, session, edit.files)
    return await _answer(request, service, fields, edit.payloads(requests, notes, stored, service.media))


# ---------------------------------------------------------------------------------------------- requests and jobs


def _base_request(options: ImageOptions, service: Service, **inputs: Any) -> GenerationRequest:
    """What every image of the request shares; prompt upsampling runs when the service has an upsampler, and its
    prompt comes back as revised_prompt (as OpenAI's own prompt rewriting does)."""
    return GenerationRequest(prompt=options.prompt, seed=options.seed, num_images=options.n,
                             num_steps=quality_steps(options.quality, service.model),
                             upsample=service.settings.upsample != "none", **inputs)  # fmt: skip


def _series(base: GenerationRequest, n: int, info: ModelInfo) -> tuple[list[GenerationRequest], tuple[str, ...]]:
    """One resolved request per image, each a job of its own: seeds seed, seed + 1, ... (the first one drawn here
    if not given, and recorded with each job)."""
    try:
        base.check()  # with all n images: seed + n - 1 must be a seed too
        first, notes = replace(base, num_images=1).fitted(info)
        rest = [replace(base, num_images=1, seed=first.seed + i).fitted(info)[0] for i in range(1, n)]
    except ValueError as err:
        field = str(err).partition(" ")[0]
        param = API_NAMES.get(field)
        message = f"{param}: {err}" if param and param != field else str(err)
        raise OpenAIError(400, message, param, "invalid_value") from None
    return [first, *rest], notes


def _ensure_project(session) -> None:
    """The project the API's jobs and uploads belong to, made on first use (two first requests may race)."""
    if session.get(Project, PROJECT_ID) is None:
        session.add(Project(id=PROJECT_ID, name=PROJECT_NAME))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
    session.close()  # no transaction stays open while the route waits for its jobs


async def _answer(request: Request, service: Service, options: ImageOptions,
                  payloads: list[JobPayload]) -> ImagesAnswer:  # fmt: skip
    """Queue the jobs, wait for all of them, answer their images (or the first failure)."""
    async with JobWatch(service.worker.events, request) as watch:
        ids: list[str] = []
        try:
            for payload in payloads:
                ids.append((await run_in_threadpool(queue_job, service.jobs, service.worker, payload)).job_id)
        except RuntimeError as err:  # the worker is shutting down
            await _cancel(service, ids)
            raise OpenAIError(503, f"the service is stopping: {err}", None, "service_unavailable") from None
        rows = await watch.finished(ids, service)
    _check_outcome(rows)
    data, size = await run_in_threadpool(_images_of, rows, options, service, str(request.base_url))
    return ImagesAnswer(created=int(time.time()), data=data, output_format=options.image_format(), size=size,
                        quality=options.quality)  # fmt: skip


async def _cancel(service: Service, ids: list[str]) -> None:
    for job_id in ids:
        await run_in_threadpool(service.worker.cancel, job_id)


def _check_outcome(rows: list[Job]) -> None:
    """A failed job's error (or a cancelled one's) as the answer; the client is told not to retry."""
    failed = sorted((row for row in rows if row.status != JobStatus.COMPLETED),
                    key=lambda row: row.status != JobStatus.FAILED)  # fmt: skip
    if not failed:
        return
    row = failed[0]
    if row.status == JobStatus.FAILED:
        raise OpenAIError(500, f"job {row.id} failed: {row.error_message}", None, "job_failed", retry=False)
    raise OpenAIError(500, f"job {row.id} was cancelled before its image was made (POST /jobs/{row.id}/cancel, or "
                           "the service stopped)", None, "job_cancelled", retry=False)  # fmt: skip


class JobWatch:
    """Wakes when the worker's events say one of the awaited jobs ended, or when the client goes away. Entered
    before the jobs are queued, so no event is missed; the job rows are the truth, read on each wake."""

    def __init__(self, events: EventBus, request: Request):
        self._stream, self._request = events.subscribe(), request
        self._next: asyncio.Future | None = None
        self._gone: asyncio.Future | None = None

    async def __aenter__(self) -> "JobWatch":
        self._next = asyncio.ensure_future(self._stream.__anext__())
        self._gone = asyncio.ensure_future(_departure(self._request))
        await asyncio.sleep(0)  # the subscription starts: from here on every event is kept for us
        return self

    async def __aexit__(self, *exc) -> None:
        for task in (self._next, self._gone):
            task.cancel()
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await task
        await self._stream.aclose()

    async def finished(self, ids: list[str], service: Service) -> list[Job]:
        """The jobs' rows once all have ended, or one failed or was cancelled (the others are cancelled then, as
        they are when the client goes away)."""
        while True:
            rows = await run_in_threadpool(lambda: [service.jobs.get(job_id) for job_id in ids])
            if all(row.status in TERMINAL for row in rows):
                return rows
            if any(row.status in (JobStatus.FAILED, JobStatus.CANCELLED) for row in rows):
                await _cancel(service, ids)
                return rows
            if self._gone.done():
                await _cancel(service, ids)
                raise OpenAIError(400, "the client went away: its jobs were cancelled")
            await self._wake(set(ids))

    async def _wake(self, ids: set[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAKE_S
        while (left := deadline - loop.time()) > 0:
            done, _ = await asyncio.wait({self._next, self._gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done or self._gone in done:
                return
            event = self._next.result()
            self._next = asyncio.ensure_future(self._stream.__anext__())
            if event.name in END_EVENTS and event.state.job_id in ids:
                return


async def _departure(request: Request) -> None:
    """Returns when the client disconnects: the request's body is read, so the next message is that."""
    try:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a server that cannot tell: the jobs are awaited to their end, as if the client stayed
        await asyncio.Future()  # never done; cancelled when the watch ends


# ---------------------------------------------------------------------------------------------- answers


def _images_of(rows: list[Job], options: ImageOptions, service: Service,
               base_url: str) -> tuple[list[ImageDatum], str]:  # fmt: skip
    """Each job's image as the client asked for it, and the images' size."""
    data, size = [], ""
    for row in rows:
        path = service.media.resolve(row.output_url, "output")
        if not path.is_file():
            raise OpenAIError(500, f"job {row.id}: its image {row.output_url} was deleted before it could be sent",
                              None, "image_deleted", retry=False)  # fmt: skip
        with Image.open(path) as image:
            size = f"{image.width}x{image.height}"
        revised = row.enhanced_prompt if row.enhanced_prompt and row.enhanced_prompt != options.prompt else None
        if options.answer_format() == "url":
            data.append(ImageDatum(url=_media_url(base_url, row.output_url, service.settings.api_token),
                                   revised_prompt=revised))  # fmt: skip
        else:
            encoded = base64.b64encode(_encoded(path, options.image_format())).decode()
            data.append(ImageDatum(b64_json=encoded, revised_prompt=revised))
    return data, size


def _media_url(base_url: str, output_url: str, token: str | None) -> str:
    """The output's absolute URL on the media route; with an API token, the token rides along as ?token= (media
    GETs take it so, as browsers fetch them without headers)."""
    url = base_url.rstrip("/") + output_url
    return f"{url}?token={quote(token, safe='')}" if token else url


def _encoded(path: Path, image_format: str) -> bytes:
    """The stored output (a JPEG) in `image_format`, its provenance record carried over."""
    if image_format == "jpeg":
        return path.read_bytes()
    with Image.open(path) as stored:
        image = stored.convert("RGB")
    record = read_provenance(path) or {}
    with TemporaryDirectory() as folder:
        return save_with_provenance(image, Path(folder) / f"image.{image_format}", record).read_bytes()


# ---------------------------------------------------------------------------------------------- edits


def _text_fields(form: FormData) -> dict[str, str]:
    fields = {}
    for name, value in form.multi_items():
        if name in FILE_FIELDS:
            continue
        if isinstance(value, UploadFile):
            raise OpenAIError(400, f"{name} must be a text field, not a file (files: image, image[], mask)", name,
                              "invalid_value")  # fmt: skip
        fields[name] = value
    return fields


def _images(form: FormData) -> list[tuple[str, UploadFile]]:
    """The images to edit, sent as `image` (one) or `image[]` (several, as the openai clients send a list)."""
    named = [("image", item) for item in form.getlist("image")]
    named += [(f"image[{i}]", item) for i, item in enumerate(form.getlist("image[]"))]
    if not named:
        raise OpenAIError(400, "missing required parameter 'image': send the picture to edit as the file image (or "
                               "several as image[])", "image", "missing_required_parameter")  # fmt: skip
    if len(named) > MAX_EDIT_IMAGES:
        raise OpenAIError(400, f"image: at most {MAX_EDIT_IMAGES} images, got {len(named)}", "image", "invalid_value")
    for field, item in named:
        if not isinstance(item, UploadFile):
            raise OpenAIError(400, f"{field} must be a file (an image), not a text field", "image", "invalid_value")
    return named


async def _read(upload: object, limit: int, field: str) -> "Upload":
    if not isinstance(upload, UploadFile):
        raise OpenAIError(400, f"{field} must be a file (an image), not a text field", field, "invalid_value")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise OpenAIError(400, f"{field} ({upload.filename}) is over the upload limit of {limit} bytes", field,
                          "file_too_large")  # fmt: skip
    return Upload(field, upload.filename or f"{field}.png", data)


@dataclass(frozen=True)
class Upload:
    field: str  # the form field, for errors: image, image[1], mask
    filename: str
    data: bytes


@dataclass(frozen=True)
class PreparedEdit:
    """An edit checked and converted in memory, before anything is written: the files to store (the source
    first; with a mask, the mask last, as a studio mask) and the output size."""

    files: list[Upload]
    size: tuple[int, int]
    masked: bool

    def request(self, fields: ImageEditFields, service: Service) -> GenerationRequest:
        """The request the jobs run; its image files are set once they are stored (`payloads`)."""
        if self.masked:  # inpainting takes its size from the source, which is prepared at the output size
            return _base_request(fields, service, mode="inpaint", image="(stored)", mask="(stored)")
        return _base_request(fields, service, width=self.size[0], height=self.size[1])

    def payloads(self, requests: list[GenerationRequest], notes: tuple[str, ...], stored: list[Path],
                 media: MediaStore) -> list[JobPayload]:  # fmt: skip
        urls = [media.url_for(path) for path in stored]
        if not self.masked:
            return [ImageJob(project_id=PROJECT_ID, request=each, references=tuple(urls), notes=notes)
                    for each in requests]  # fmt: skip
        # An inpaint job resolves its image and mask when it runs; further images go to the model as references,
        # which it opens as files.
        inputs = {"image": urls[0], "mask": urls[-1], "reference_images": tuple(str(path) for path in stored[1:-1])}
        return [InpaintJob(project_id=PROJECT_ID, request=each.with_inputs(**inputs), notes=notes)
                for each in requests]  # fmt: skip


def _prepared_edit(fields: ImageEditFields, images: list[Upload], mask: Upload | None, info: ModelInfo) -> PreparedEdit:
    """Checks every file and the size. With a mask, the source and the mask are brought to the asked size (the
    source's own by default); without one, the images are references and the output is the asked size, or the
    first image's scaled to about the model's default pixel count."""
    pictures = [_picture(upload) for upload in images]
    asked = parse_size(fields.size)
    if mask is None:
        source = pictures[0]
        size = asked or _fitted_size(source.size, info)
        return PreparedEdit(images, size, masked=False)
    size = asked or pictures[0].size
    source = images[0]
    if pictures[0].size != size:
        source = Upload(source.field, source.filename, _png(pictures[0].convert("RGB").resize(size, Image.LANCZOS)))
    studio_mask = Upload("mask", "mask.png", _png(_studio_mask(mask, pictures[0].size, size)))
    return PreparedEdit([source, *images[1:], studio_mask], size, masked=True)


def _fitted_size(size: tuple[int, int], info: ModelInfo) -> tuple[int, int]:
    try:
        return working_size(*size, info.width * info.height)
    except ValueError as err:
        raise OpenAIError(400, f"image: {err}", "image", "invalid_value") from None


def _picture(upload: Upload) -> Image.Image:
    try:
        with Image.open(io.BytesIO(upload.data)) as picture:
            picture.load()
            return picture.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise OpenAIError(400, f"{upload.field} ({upload.filename}) is not a readable image (PNG, JPEG, WebP): "
                               f"{err}", upload.field.split("[")[0], "invalid_image") from None  # fmt: skip


def _studio_mask(mask: Upload, source_size: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    """OpenAI's mask (transparent where to edit) as the studio's (white where to edit, black where to keep), at
    `size`. It must have the source's size or aspect ratio (the studio's mask rule)."""
    picture = _picture(mask)
    if "A" not in picture.getbands() and "transparency" not in picture.info:
        raise OpenAIError(400, f"mask must be a PNG with an alpha channel (RGBA): its transparent pixels (alpha 0) "
                               f"mark where to edit; got a {picture.mode} image without transparency", "mask",
                          "invalid_mask")  # fmt: skip
    to_edit = ImageOps.invert(picture.convert("RGBA").getchannel("A"))
    try:
        check_mask_size(to_edit.size, source_size)
        hard = binary_mask(to_edit, source_size)
    except ValueError as err:
        raise OpenAIError(400, f"mask: {err}", "mask", "invalid_mask") from None
    if hard.getextrema()[1] == 0:
        raise OpenAIError(400, "mask has no transparent pixels: nothing to edit (alpha 0 marks where to edit)",
                          "mask", "invalid_mask")  # fmt: skip
    return hard if hard.size == size else hard.resize(size, Image.NEAREST)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _store(media: MediaStore, session, files: list[Upload]) -> list[Path]:
    """The edit's files among the project's uploads, each an asset of the library (as POST /upload makes)."""
    paths = []
    for upload in files:
        try:
            path = media.save_upload(upload.data, upload.filename, PROJECT_ID, "general")
        except ValueError as err:
            raise OpenAIError(400, f"{upload.field}: {err}", upload.field.split("[")[0], "invalid_image") from None
        with Image.open(path) as picture:
            width, height = picture.size
        session.add(Asset(project_id=PROJECT_ID, type="image", path=media.relative_path(path), url=media.url_for(path),
                          filename=path.name, width=width, height=height,
                          meta={"source": "openai-edit", "kind": upload.field}))  # fmt: skip
        paths.append(path)
    session.commit()
    session.close()
    return paths
