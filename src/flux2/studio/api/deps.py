"""What routes receive, as named Annotated types: each part of the service (set up on app.state by the app's
lifespan) on its own, and a database session per request; and the API-token comparison the app's gatekeeper
uses."""

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlmodel import Session

from flux2.registry import ModelInfo
from flux2.studio.config import StudioSettings
from flux2.studio.events import EventBus
from flux2.studio.jobs_store import JobStore
from flux2.studio.segmentation import SegmentationClient
from flux2.studio.storage import MediaStore
from flux2.studio.worker import Worker


@dataclass
class Studio:
    """Everything one running service holds."""

    settings: StudioSettings
    model: ModelInfo  # the served model: requests are checked and resolved for it when they are queued
    engine: Engine
    media: MediaStore
    jobs: JobStore
    worker: Worker
    segmentation: SegmentationClient


def _studio(request: Request) -> Studio:
    return request.app.state.studio


def get_settings(request: Request) -> StudioSettings:
    return _studio(request).settings


def get_model(request: Request) -> ModelInfo:
    return _studio(request).model


def get_media(request: Request) -> MediaStore:
    return _studio(request).media


def get_jobs(request: Request) -> JobStore:
    return _studio(request).jobs


def get_worker(request: Request) -> Worker:
    return _studio(request).worker


def get_events(request: Request) -> EventBus:
    return _studio(request).worker.events


def get_segmentation(request: Request) -> SegmentationClient:
    return _studio(request).segmentation


def get_session(request: Request) -> Iterator[Session]:
    with Session(_studio(request).engine, expire_on_commit=False) as session:
        yield session


def token_matches(request: Request, token: str) -> bool:
    """`Authorization: Bearer <token>`, or `?token=` on a GET (media and SSE, which browsers fetch without
    headers)."""
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not given and request.method == "GET":
        given = request.query_params.get("token", "")
    return secrets.compare_digest(given.encode(), token.encode())


SettingsDep = Annotated[StudioSettings, Depends(get_settings)]
ModelDep = Annotated[ModelInfo, Depends(get_model)]
MediaDep = Annotated[MediaStore, Depends(get_media)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
WorkerDep = Annotated[Worker, Depends(get_worker)]
EventsDep = Annotated[EventBus, Depends(get_events)]
SegmentationDep = Annotated[SegmentationClient, Depends(get_segmentation)]
SessionDep = Annotated[Session, Depends(get_session)]
