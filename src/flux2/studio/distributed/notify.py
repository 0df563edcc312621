"""Job events and cancel requests between processes, over PostgreSQL's LISTEN/NOTIFY.

Whoever changes a job (a worker: progress, complete, error; an API process: a queued job cancelled; a sweeper)
publishes the event on `EVENTS_CHANNEL`; every API process listens and feeds its own EventBus, so an SSE client
of any API process sees every job. Each event carries `seq`, drawn from one database sequence when it is sent,
so a reader can check the order of a job's events, and a listener drops an event older than one it already
passed on. A cancel request for a running job goes out on `CANCEL_CHANNEL` to the worker running it.
"""

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

import psycopg
from sqlalchemy import Engine, text

from flux2.studio.db import libpq_url
from flux2.studio.distributed.queue import EVENT_SEQUENCE
from flux2.studio.events import EventBus, JobEvent, JobState
from flux2.studio.jobs_store import JobStore

log = logging.getLogger(__name__)

EVENTS_CHANNEL = "flux2_job_events"
CANCEL_CHANNEL = "flux2_job_cancel"
# PostgreSQL refuses NOTIFY payloads of 8000 bytes or more; a bigger event (a long enhanced prompt) is sent as its
# job id only, and listeners read the job's state from the database.
MAX_PAYLOAD_BYTES = 7900
RECONNECT_S = 1.0
SEQ_MEMORY = 10_000  # jobs whose last event number a listener remembers


class SequencedState(JobState):
    """A job's state in an event that crossed processes: `seq` orders the events of a job."""

    seq: int


class EventPublisher:
    """Sends job events to every API process (the Publish of a JobExecutor)."""

    def __init__(self, engine: Engine, store: JobStore) -> None:
        self.engine, self.store = engine, store

    def __call__(self, name: str, job_id: str, **overrides) -> None:
        job = self.store.get(job_id)
        if job is None:
            return
        with self.engine.begin() as connection:
            seq = connection.execute(text(f"SELECT nextval('{EVENT_SEQUENCE}')")).scalar_one()
            state = JobState.of(job).model_copy(update=overrides)
            payload = json.dumps({"name": name, "seq": seq, "state": json.loads(state.model_dump_json())})
            if len(payload.encode()) > MAX_PAYLOAD_BYTES:
                payload = json.dumps({"name": name, "seq": seq, "job_id": job_id, "overrides": overrides})
            connection.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": EVENTS_CHANNEL,
                                                                               "payload": payload})  # fmt: skip


def request_cancel(engine: Engine, job_id: str) -> None:
    """Tell the worker running `job_id` to stop it at its next step (it also sees the flag at its heartbeat)."""
    with engine.begin() as connection:
        connection.execute(text("SELECT pg_notify(:channel, :job_id)"), {"channel": CANCEL_CHANNEL, "job_id": job_id})


class Listener:
    """A background thread LISTENing on `channels`, calling `handle(channel, payload)` for each notification;
    it reconnects when the connection drops (notifications sent meanwhile are lost: the database state is not)."""

    def __init__(self, database_url: str, channels: tuple[str, ...], handle: Callable[[str, str], None]) -> None:
        self.url, self.channels, self.handle = libpq_url(database_url), channels, handle
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flux2-listen", daemon=True)

    def start(self, timeout: float = 30.0) -> "Listener":
        """Start, and return once listening (so nothing sent after this returns is missed)."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"could not LISTEN on {', '.join(self.channels)} within {timeout} s")
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as connection:
                    for channel in self.channels:
                        connection.execute(f"LISTEN {channel}")
                    self._ready.set()
                    while not self._stop.is_set():
                        for note in connection.notifies(timeout=0.5):
                            self._dispatch(note.channel, note.payload)
            except Exception as err:  # the server restarting, the network: listen again (the state is in the tables)
                log.warning("lost the LISTEN connection (%s); reconnecting", err)
                self._stop.wait(RECONNECT_S)

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            self.handle(channel, payload)
        except Exception:  # one bad notification must not stop the listener
            log.exception("could not handle a notification on %s", channel)


class EventRelay:
    """Passes job events from `EVENTS_CHANNEL` into this process's EventBus, in order per job."""

    def __init__(self, bus: EventBus, store: JobStore) -> None:
        self.bus, self.store = bus, store
        self._last_seq: OrderedDict[str, int] = OrderedDict()

    def __call__(self, channel: str, payload: str) -> None:
        message = json.loads(payload)
        state = self._state(message)
        if state is None or not self._in_order(state.job_id, state.seq):
            return
        self.bus.publish(JobEvent(message["name"], state))

    def _state(self, message: dict) -> SequencedState | None:
        if "state" in message:
            return SequencedState.model_validate({**message["state"], "seq": message["seq"]})
        job = self.store.get(message["job_id"])
        if job is None:
            return None
        state = JobState.of(job).model_copy(update=message.get("overrides", {}))
        return SequencedState.model_validate({**state.model_dump(), "seq": message["seq"]})

    def _in_order(self, job_id: str, seq: int) -> bool:
        if self._last_seq.get(job_id, -1) >= seq:
            return False
        self._last_seq[job_id] = seq
        self._last_seq.move_to_end(job_id)
        while len(self._last_seq) > SEQ_MEMORY:
            self._last_seq.popitem(last=False)
        return True
