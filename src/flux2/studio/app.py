"""The studio service: `create_app(settings)` builds the FastAPI app; its lifespan opens the database (migrated
to the newest schema), the media folder and the worker, and re-queues what a previous run left unfinished.

    uvicorn "flux2.studio.app:create_app" --factory      # or: flux2 serve
"""

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from flux2 import __version__
from flux2.registry import model_info
from flux2.studio.api import assets, edit, events, jobs, loras, metrics, openai_images, projects, storyboard, web
from flux2.studio.api.deps import Studio, token_matches
from flux2.studio.api.responses import Health
from flux2.studio.config import StudioSettings
from flux2.studio.db import is_postgres, make_engine, upgrade
from flux2.studio.events import EventBus
from flux2.studio.jobs_store import JobStore
from flux2.studio.segmentation import SegmentationClient
from flux2.studio.storage import MediaStore
from flux2.studio.tasks import PipelineHolder, Tasks
from flux2.studio.worker import LocalWorker

log = logging.getLogger(__name__)


def open_studio(settings: StudioSettings, pipeline=None) -> Studio:
    """The database (migrated in place), the media folder (its tmp/ swept of what no live job owns), the job
    store and an in-process worker."""
    model = model_info(settings.model)
    if pipeline is not None and pipeline.info.name != model.name:  # jobs are resolved for settings.model
        raise ValueError(f"the pipeline runs {pipeline.info.name}, but settings.model is {settings.model!r}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    upgrade(engine)
    media = MediaStore(settings.data_dir, settings.max_upload_bytes)
    segmentation = SegmentationClient(settings.segmentation_url, settings.segmentation_timeout_s)
    store = JobStore(engine)
    if is_postgres(settings.db_url):  # jobs run in `flux2 worker` processes, which own tmp/ while they run
        from flux2.studio.distributed.worker import QueueWorker

        worker = QueueWorker(settings, store, engine, EventBus(settings.sse_queue_size))
        return Studio(settings, model, engine, media, store, worker, segmentation)
    if swept := media.sweep_tmp(job.id for job in store.active()):  # before the worker starts writing there
        log.info("removed %d stale temporary file(s) or workspace(s): %s", len(swept), ", ".join(swept[:20]))
    tasks = Tasks(PipelineHolder(settings, pipeline), media, engine)
    worker = LocalWorker(store, tasks, EventBus(settings.sse_queue_size), media)
    return Studio(settings, model, engine, media, store, worker, segmentation)


def create_app(settings: StudioSettings | None = None, pipeline=None) -> FastAPI:
    """The app for `settings` (default: from FLUX2_STUDIO_* variables); `pipeline` skips loading a model."""
    settings = settings or StudioSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        studio = open_studio(settings, pipeline)
        studio.worker.events.bind(asyncio.get_running_loop())
        app.state.studio = studio
        if requeued := studio.worker.recover():
            log.warning("re-queued %d job(s) a previous run left unfinished: %s", len(requeued), ", ".join(requeued))
        try:
            yield
        finally:
            await asyncio.to_thread(studio.worker.close)
            studio.engine.dispose()

    app = FastAPI(title="flux2 studio", version=__version__, lifespan=lifespan)
    app.middleware("http")(_gatekeeper(settings))
    if settings.cors_origins:  # outermost: preflights are answered before the gatekeeper asks for a token
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])  # fmt: skip
    app.add_exception_handler(ValueError, _bad_request)
    for module in (jobs, projects, storyboard, assets, edit, loras, events, web, openai_images, metrics):
        app.include_router(module.router)
    app.include_router(assets.media_router)  # last: /projects/{path} would shadow the project routes

    @app.get("/health", tags=["service"], summary="The service answers")
    def health() -> Health:
        return Health(status="ok")

    return app


MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around an upload's bytes


def _gatekeeper(settings: StudioSettings):
    """Before any route runs: the API token (on every path, the docs included; as ?token= only for GETs, which
    browsers make for media and SSE without headers), and the upload size (refused before the body is read).
    Only the web page's own files pass without a token (GET `/` and `/web/<name>.html|js|css|svg`): they hold no
    data, and the page asks its user for the token when the API answers 401."""

    async def check(request: Request, call_next):
        public = request.method == "GET" and web.is_page_file(request.url.path)
        if settings.api_token and not public and not token_matches(request, settings.api_token):
            if request.url.path.startswith(openai_images.PREFIX + "/"):  # OpenAI clients read their own error shape
                return openai_images.unauthorized()
            return JSONResponse({"detail": "missing or wrong API token: send Authorization: Bearer <token>"}, 401)
        length = request.headers.get("content-length", "")
        if (
            request.url.path == "/upload"
            and length.isdigit()
            and int(length) > settings.max_upload_bytes + (MULTIPART_OVERHEAD)
        ):
            return JSONResponse({"detail": f"file: uploads are limited to {settings.max_upload_bytes} bytes"}, 413)
        return await call_next(request)

    return check


async def _bad_request(request: Request, err: ValueError) -> JSONResponse:
    """Our own checks raise ValueError with a message naming the field: a client error, never a traceback."""
    return JSONResponse({"detail": str(err)}, status_code=400)
