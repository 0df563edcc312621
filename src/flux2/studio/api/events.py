"""GET /events: every job's progress, complete, error and cancelled events as Server-Sent Events."""

import json

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from flux2.studio.api.deps import StudioDep

router = APIRouter(tags=["events"])


@router.get("/events", summary="Job events (SSE): progress, complete, error, cancelled")
async def events(studio: StudioDep) -> EventSourceResponse:
    async def stream():
        async for event in studio.worker.events.subscribe():
            yield {"event": event.name, "data": json.dumps(event.data)}

    return EventSourceResponse(stream(), ping=studio.settings.sse_keepalive_s)
