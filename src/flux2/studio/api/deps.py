"""What routes receive, as named Annotated types: the service's parts live on app.state (set up by the app's
lifespan) and a database session per request; and the API-token comparison the app's gatekeeper uses."""

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlmodel import Session

from flux2.studio.config import StudioSettings
from flux2.studio.jobs_store import JobStore
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
    worker: Worker
    segmentation: SegmentationClient


def get_studio(request: Request) -> Studio:
    return request.app.state.studio


def get_session(studio: Annotated[Studio, Depends(get_studio)]) -> Iterator[Session]:
    with Session(studio.engine, expire_on_commit=False) as session:
        yield session


def token_matches(request: Request, token: str) -> bool:
    """`Authorization: Bearer <token>`, or `?token=` on a GET (media and SSE, which browsers fetch without
    headers)."""
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not given and request.method == "GET":
        given = request.query_params.get("token", "")
    return secrets.compare_digest(given.encode(), token.encode())


StudioDep = Annotated[Studio, Depends(get_studio)]
SessionDep = Annotated[Session, Depends(get_session)]
