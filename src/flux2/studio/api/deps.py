"""What routes receive, as named Annotated types: the service's parts live on app.state (set up by the app's
lifespan), a database session per request, and the API-token check."""

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy import Engine
from sqlmodel import Session

from flux2.studio.config import StudioSettings
from flux2.studio.jobs_store import AssetStore, JobStore
from flux2.studio.segmentation import SegmentationClient
from flux2.studio.storage import MediaStore
from flux2.studio.worker import Worker


@dataclass
class Studio:
    """Everything one running service holds."""

    settings: StudioSettings
    engine: Engine
    media: MediaStore
    jobs: JobStore
    assets: AssetStore
    worker: Worker
    segmentation: SegmentationClient


def get_studio(request: Request) -> Studio:
    return request.app.state.studio


def get_session(studio: Annotated[Studio, Depends(get_studio)]) -> Iterator[Session]:
    with Session(studio.engine, expire_on_commit=False) as session:
        yield session


def check_token(request: Request, studio: Annotated[Studio, Depends(get_studio)]) -> None:
    """With an API token set, every route needs `Authorization: Bearer <token>` (or ?token= for media and SSE,
    which browsers fetch without headers)."""
    token = studio.settings.api_token
    if not token:
        return
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or request.query_params.get(
        "token", ""
    )
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong API token: send Authorization: Bearer <token>")


StudioDep = Annotated[Studio, Depends(get_studio)]
SessionDep = Annotated[Session, Depends(get_session)]
