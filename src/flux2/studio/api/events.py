"""GET /events: every job's progress, complete, error and cancelled events as Server-Sent Events."""

from fastapi import APIRouter
from sse_starlette.sse import EventSourceResponse

from flux2.studio.api.deps import EventsDep, SettingsDep

router = APIRouter(tags=["events"])
EVENT_STREAM = {200: {"description": "`event: progress|complete|error|cancelled`, `data:` a JobState as JSON",
                      "content": {"text/event-stream": {"schema": {"type": "string"}}}}}  # fmt: skip


@router.get("/events", summary="Job events (SSE): progress, complete, error, cancelled",
            response_class=EventSourceResponse, responses=EVENT_STREAM)  # fmt: skip
async def events(bus: EventsDep, settings: SettingsDep) -> EventSourceResponse:
    async def stream():
        async for event in bus.subscribe():
            yield {"event": event.name, "data": event.state.model_dump_json()}

    return EventSourceResponse(stream(), ping=settings.sse_keepalive_s)
