"""The studio service on 127.0.0.1 for tests: the real app under uvicorn in a background thread, an SSE follower,
and small helpers (images to upload, waiting for a job). Everything goes over real HTTP; nothing is mocked."""

import functools
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import uvicorn
from PIL import Image

from flux2.studio.config import StudioSettings

TERMINAL = ("completed", "failed", "cancelled")
STATUS_FIELDS = ("status", "progress", "status_message", "error_message", "asset_id", "seed")


@functools.cache
def tiny_pipeline():
    """The tiny random-weight model, loaded once per test process and shared by every service the tests start
    (they run one after another, and each runs one job at a time)."""
    from flux2.pipeline import Flux2Pipeline

    return Flux2Pipeline("tiny", device="cpu")


def studio_settings(data_dir: Path, **overrides) -> StudioSettings:
    """Settings with every field given, so no FLUX2_STUDIO_* variable of the environment leaks in."""
    defaults = {name: info.get_default(call_default_factory=True) for name, info in StudioSettings.model_fields.items()}
    given = {**defaults, "data_dir": data_dir, "model": "tiny", "device": "cpu", "port": 0, "sse_keepalive_s": 0.5}
    return StudioSettings(**{**given, **overrides})


def no_traceback(response: httpx.Response) -> None:
    """An httpx response hook: no answer of the service may carry a stack trace."""
    if "text/event-stream" in response.headers.get("content-type", ""):
        return
    response.read()
    assert b"Traceback" not in response.content, f"{response.request.url}: {response.text[:500]}"


@dataclass
class RunningStudio:
    url: str
    app: object
    settings: StudioSettings
    client: httpx.Client

    @property
    def studio(self):
        """The service's parts (database engine, event bus...), for checks that HTTP cannot make."""
        return self.app.state.studio

    def client_for(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, event_hooks={"response": [no_traceback]}, **kwargs)

    def job_count(self) -> int:
        from sqlmodel import Session, func, select

        from flux2.studio.records import Job

        with Session(self.studio.engine) as session:
            return session.exec(select(func.count()).select_from(Job)).one()

    def events(self) -> "EventStream":
        return EventStream(self)


@contextmanager
def running_studio(settings: StudioSettings, pipeline=None) -> Iterator[RunningStudio]:
    """`create_app(settings, pipeline)` served by uvicorn on a free port of 127.0.0.1 until the block ends."""
    from flux2.studio.app import create_app

    app = create_app(settings, pipeline=pipeline if pipeline is not None else tiny_pipeline())
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="studio-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the studio service did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=30, event_hooks={"response": [no_traceback]}) as client:
        try:
            yield RunningStudio(url, app, settings, client)
        finally:
            server.should_exit = True
            thread.join(60)
    assert not thread.is_alive(), "the studio service did not shut down"


class EventStream:
    """Follows GET /events in a background thread and keeps every event; use as a context manager. It is
    subscribed (the service counts it as a client) when `__enter__` returns, so no event is missed."""

    def __init__(self, running: RunningStudio, params: dict | None = None, headers: dict | None = None):
        self.running, self.params, self.headers = running, params or {}, headers or {}
        self.events: list[tuple[str, dict]] = []
        self.comments = 0  # keep-alive pings seen
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="studio-sse", daemon=True)
        self.error: BaseException | None = None

    def __enter__(self) -> "EventStream":
        bus = self.running.studio.worker.events
        before = bus.client_count
        self._thread.start()
        deadline = time.monotonic() + 10
        while bus.client_count <= before:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the SSE stream did not connect: {self.error!r}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)  # keep-alives every sse_keepalive_s wake the reader up to see the stop flag

    def _follow(self) -> None:
        try:
            with httpx.Client(base_url=self.running.url, timeout=httpx.Timeout(10.0)) as client:
                with client.stream("GET", "/events", params=self.params, headers=self.headers) as response:
                    response.raise_for_status()
                    name, data = None, []
                    for line in response.iter_lines():
                        if self._stop.is_set():
                            return
                        if line.startswith(":"):
                            self.comments += 1
                        elif line.startswith("event:"):
                            name = line.removeprefix("event:").strip()
                        elif line.startswith("data:"):
                            data.append(line.removeprefix("data:").strip())
                        elif not line and name is not None:
                            with self._changed:
                                self.events.append((name, json.loads("\n".join(data))))
                                self._changed.notify_all()
                            name, data = None, []
        except BaseException as err:  # noqa: BLE001 - reported by wait_for
            self.error = err

    def of(self, job_id: str) -> list[tuple[str, dict]]:
        with self._changed:
            return [(name, data) for name, data in self.events if data.get("job_id") == job_id]

    def wait_for(self, predicate: Callable[[str, dict], bool], timeout: float = 30) -> tuple[str, dict]:
        """The first event (name, data) matching `predicate`, waiting up to `timeout` seconds for it."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for name, data in self.events[seen:]:
                    if predicate(name, data):
                        return name, data
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    names = [(n, d.get("job_id"), d.get("status_message")) for n, d in self.events[-10:]]
                    raise TimeoutError(f"no matching event within {timeout} s (last: {names}; error: {self.error!r})")
                self._changed.wait(min(left, 0.2))

    def wait_end(self, job_id: str, timeout: float = 30) -> tuple[str, dict]:
        """The job's final event: complete, error or cancelled."""
        return self.wait_for(lambda n, d: d.get("job_id") == job_id and n in ("complete", "error", "cancelled"),
                             timeout)  # fmt: skip


def wait_status(client: httpx.Client, job_id: str, done: Callable[[dict], bool], timeout: float = 30) -> dict:
    """Poll GET /status/{job_id} until `done(status)`; the last status otherwise raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/status/{job_id}")
        assert response.status_code == 200, response.text
        status = response.json()
        if done(status):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} after {timeout} s: {status}")
        time.sleep(0.02)


def wait_terminal(client: httpx.Client, job_id: str, timeout: float = 30) -> dict:
    return wait_status(client, job_id, lambda s: s["status"] in TERMINAL, timeout)


def image_bytes(width: int = 64, height: int = 64, color="gray", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format=fmt)
    return buffer.getvalue()


def mask_bytes(width: int = 64, height: int = 64) -> bytes:
    """A black-and-white mask as the studio front end paints it: white (regenerate) on the left half."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: httpx.Client, data: bytes, project_id: str | None = None, kind: str = "general",
           filename: str = "image.png") -> dict:  # fmt: skip
    form = {"type": kind, **({"project_id": project_id} if project_id else {})}
    response = client.post("/upload", files={"file": (filename, data, "application/octet-stream")}, data=form)
    assert response.status_code == 200, response.text
    return response.json()


def create_project(client: httpx.Client, name: str = "Project") -> str:
    response = client.post("/projects", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@dataclass
class Latencies:
    """GET /health timed from a background thread while something else happens."""

    client: httpx.Client
    interval_s: float = 0.02
    seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="studio-health", daemon=True)

    def __enter__(self) -> "Latencies":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _poll(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                response = self.client.get("/health")
                if response.status_code != 200:
                    self.failures.append(f"HTTP {response.status_code}")
            except httpx.HTTPError as err:
                self.failures.append(repr(err))
            self.seconds.append(time.perf_counter() - started)
            self._stop.wait(self.interval_s)
