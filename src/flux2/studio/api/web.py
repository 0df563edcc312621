"""The service's own web page: `/` and its files under `/web/` (shipped in the package, nothing fetched from
elsewhere), what the page needs to know about the served model (`/web/config`), the queue it can reorder and
clear (`/queue`), and an image's watermark check. Everything else the page does goes through the same routes as
any other client."""

import re
from functools import cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from PIL import Image
from pydantic import BaseModel, Field

from flux2.registry import FLUX2_MODEL_INFO, ModelInfo
from flux2.request import (
    LORA_STRENGTH_LIMIT,
    MAX_SEED,
    MAX_SIDE,
    PIXELS_PER_TOKEN,
    PROMPT_MAX_CHARS,
    TRUE_CFG_DEFAULT,
)
from flux2.studio.api.deps import JobsDep, MediaDep, ModelDep, SessionDep, SettingsDep, WorkerDep
from flux2.studio.api.schemas import MAX_LORAS, Body
from flux2.studio.events import JobState
from flux2.studio.records import Asset, Job

router = APIRouter(tags=["web page"])
MAX_REFERENCES = 10  # GenerateImageRequest.reference_images' max_length
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
PAGE_FILE_NAME = re.compile(r"[A-Za-z0-9_-]+\.(html|js|css|svg)")  # the suffixes of STATIC_TYPES
NO_CACHE = {"Cache-Control": "no-cache"}  # the page follows the installed package, never a stale copy


@cache
def web_dir() -> Path:
    return Path(str(files("flux2.studio") / "web"))


def is_page_file(path: str) -> bool:
    """`/` or `/web/<name>` of a static file type: what the gatekeeper lets through without the API token (the
    page then asks for it). `/web/config` and `/web/assets/...` are data, not page files."""
    name = path.removeprefix("/web/")
    return path == "/" or (name != path and PAGE_FILE_NAME.fullmatch(name) is not None)


class ModelChoice(BaseModel):
    """A model as the page's picker shows it: which controls apply, and whether this service runs it."""

    name: str
    description: str
    served: bool  # only the served model takes jobs: another needs `flux2 serve --model NAME`
    fixed: list[str]  # settings a distilled model does not let change ("num_steps", "guidance")
    uses_cfg: bool  # a negative prompt and a CFG scale apply (two passes per step)
    num_steps: int
    guidance: float
    width: int
    height: int
    licence: str


class PageConfig(BaseModel):
    served: str
    models: list[ModelChoice]
    grid: int = PIXELS_PER_TOKEN  # sizes are multiples of this
    max_side: int = MAX_SIDE
    max_seed: int = MAX_SEED
    prompt_max_chars: int = PROMPT_MAX_CHARS
    max_loras: int = MAX_LORAS
    lora_strength_limit: float = LORA_STRENGTH_LIMIT
    max_references: int = MAX_REFERENCES
    true_cfg_default: float = TRUE_CFG_DEFAULT
    enhance_available: bool  # the service was started with an upsampler (--upsample)


class QueuedJob(JobState):
    prompt: str | None = None  # what the queue shows of each job


class QueueState(BaseModel):
    running: QueuedJob | None
    queued: list[QueuedJob]  # next first


class QueueOrder(Body):
    job_ids: list[str] = Field(min_length=1, description="queued jobs, in the order they should run next")


class QueueCleared(BaseModel):
    cancelled: list[str]


class WatermarkAnswer(BaseModel):
    asset_id: str
    detected: bool
    bit_accuracy: float | None  # None: the image is too small to hold the mark
    method: str | None
    detail: str


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(web_dir() / "index.html", media_type="text/html", headers=NO_CACHE)


@router.get("/web/config", summary="What the web page shows: the served model, the others, the limits")
def page_config(model: ModelDep, settings: SettingsDep) -> PageConfig:
    choices = [_choice(info, info.name == model.name) for info in FLUX2_MODEL_INFO.values()]
    return PageConfig(served=model.name, models=choices, enhance_available=settings.upsample != "none")


@router.get("/web/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    path = web_dir() / name
    if Path(name).name != name or path.suffix not in STATIC_TYPES or not path.is_file():
        raise HTTPException(404, f"/web/{name}: no such file of the web page")
    return FileResponse(path, media_type=STATIC_TYPES[path.suffix], headers=NO_CACHE)


@router.get("/queue", tags=["jobs"], summary="The running job and the queued ones, next first")
def queue_state(jobs: JobsDep, worker: WorkerDep) -> QueueState:
    running_id = worker.status().running
    running = jobs.get(running_id) if running_id else None
    queued = [job for job_id in worker.queued() if (job := jobs.get(job_id)) is not None]
    return QueueState(running=_queued_job(running) if running else None, queued=[_queued_job(job) for job in queued])


@router.post("/queue/order", tags=["jobs"], summary="Run these queued jobs next, in this order")
def reorder_queue(body: QueueOrder, jobs: JobsDep, worker: WorkerDep) -> QueueState:
    try:
        worker.reorder(body.job_ids)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None
    return queue_state(jobs, worker)


@router.post("/queue/clear", tags=["jobs"], summary="Cancel every queued job (the running one goes on)")
def clear_queue(worker: WorkerDep) -> QueueCleared:
    return QueueCleared(cancelled=worker.clear())


@router.get("/web/assets/{asset_id}/watermark", summary="Whether an image carries the invisible watermark")
async def watermark(asset_id: str, media: MediaDep, session: SessionDep) -> WatermarkAnswer:
    asset = session.get(Asset, asset_id)
    if asset is None:
        raise HTTPException(404, f"asset_id {asset_id!r}: no such asset")
    file = media.resolve(asset.url, "asset_id")
    if not file.is_file():
        raise HTTPException(404, f"asset_id {asset_id!r}: its file {asset.url} is gone")
    return await run_in_threadpool(_check_watermark, asset_id, file)


def _check_watermark(asset_id: str, file: Path) -> WatermarkAnswer:
    from flux2.watermark import verify

    with Image.open(file) as image:
        try:
            check = verify(image)
        except ValueError as err:  # too small to carry a mark
            return WatermarkAnswer(asset_id=asset_id, detected=False, bit_accuracy=None, method=None, detail=str(err))
    found = "found" if check.detected else "not found"
    detail = f"watermark {found} ({check.method}, {check.bit_accuracy:.0%} of bits match)"
    return WatermarkAnswer(asset_id=asset_id, detected=check.detected, bit_accuracy=check.bit_accuracy,
                           method=check.method, detail=detail)  # fmt: skip


def _queued_job(job: Job) -> QueuedJob:
    return QueuedJob.of(job).model_copy(update={"prompt": job.prompt})


def _choice(info: ModelInfo, served: bool) -> ModelChoice:
    return ModelChoice(name=info.name, description=info.description, served=served, fixed=sorted(info.fixed_params),
                       uses_cfg=info.uses_cfg, num_steps=info.num_steps, guidance=info.guidance, width=info.width,
                       height=info.height, licence=info.licence)  # fmt: skip
