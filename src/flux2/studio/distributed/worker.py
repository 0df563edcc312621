"""QueueWorker: the Worker of an API process when jobs run in `flux2 worker` processes (PostgreSQL).

`submit` defers the job onto its model's queue; `cancel` is JobStore's compare-and-set, then an event (a queued
job) or a cancel request to the worker running it; status and the queue are read from the database, so every
API process answers the same. Events of every job reach this process's EventBus through LISTEN, whichever
process sent them; this process also sweeps stalled jobs now and then.
"""

import logging

from sqlalchemy import Engine, text

from flux2.studio.config import StudioSettings
from flux2.studio.distributed import queue
from flux2.studio.distributed.notify import EVENTS_CHANNEL, EventPublisher, EventRelay, Listener, request_cancel
from flux2.studio.distributed.sweep import Sweeper, sweep_once
from flux2.studio.events import EventBus
from flux2.studio.jobs_store import CANCELLED, CANCELLING, JobStore
from flux2.studio.records import JobStatus
from flux2.studio.worker import WorkerStatus

log = logging.getLogger(__name__)

# Queued jobs in the order workers take them: procrastinate fetches by priority, then first deferred.
QUEUE_ORDER = text(
    "SELECT args->>'job_id' AS job_id FROM procrastinate_jobs WHERE status = 'todo' AND task_name = :task "
    "ORDER BY priority DESC, id ASC"
)
DELIVERED = text(
    "SELECT DISTINCT args->>'job_id' FROM procrastinate_jobs WHERE status IN ('todo', 'doing') AND task_name = :task"
)
SET_PRIORITY = text(
    "UPDATE procrastinate_jobs SET priority = :priority WHERE status = 'todo' AND task_name = :task "
    "AND args->>'job_id' = :job_id"
)


class QueueWorker:
    """Jobs queued in PostgreSQL for worker processes; see the module's docstring."""

    def __init__(self, settings: StudioSettings, store: JobStore, engine: Engine, events: EventBus) -> None:
        self.settings, self.store, self.engine, self.events = settings, store, engine, events
        queue.ensure_schema(settings.db_url)
        self.app = queue.make_app(settings.db_url).open()
        self.publish = EventPublisher(engine, store)
        self._listener = Listener(settings.db_url, (EVENTS_CHANNEL,), EventRelay(events, store)).start()
        self._sweeper = Sweeper(settings.heartbeat_s, self.sweep).start()

    def submit(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None:
            raise ValueError(f"job_id {job_id!r}: no such job")
        queue.defer(self.app, job_id, model_of(job.params, self.settings.model))

    def cancel(self, job_id: str) -> str:
        """ "cancelled" (it was queued), "cancelling" (its worker stops it at its next step) or
        "not_found_or_already_done"."""
        outcome = self.store.cancel(job_id)
        if outcome == CANCELLED:
            self.publish("cancelled", job_id)
        elif outcome == CANCELLING:
            request_cancel(self.engine, job_id)
        return outcome

    def recover(self) -> list[str]:
        """At startup: sweep, and queue again what the database holds as pending but no queue does (an API
        process that stopped between storing a job and deferring it). Running jobs are left to their workers."""
        self.sweep()
        with self.engine.connect() as connection:
            delivered = set(connection.execute(DELIVERED, {"task": queue.TASK_NAME}).scalars())
        lost = [job.id for job in self.store.pending() if job.id not in delivered]
        for job_id in lost:
            self.submit(job_id)
        return lost

    def sweep(self) -> list[str]:
        settings = self.settings
        return sweep_once(self.store, settings.stall_timeout_s, settings.max_attempts, self.submit, self.publish,
                          self.engine)  # fmt: skip

    def status(self) -> WorkerStatus:
        running = [job.id for job in self.store.active() if job.status == JobStatus.PROCESSING]
        queued = len(self.queued())
        return WorkerStatus(busy=bool(running), queued=queued, running=running[0] if running else None)

    def queued(self) -> list[str]:
        """Pending job ids in the order workers will take them (for each model's queue)."""
        pending = {job.id for job in self.store.pending()}
        with self.engine.connect() as connection:
            ordered = connection.execute(QUEUE_ORDER, {"task": queue.TASK_NAME}).scalars()
            return list(dict.fromkeys(job_id for job_id in ordered if job_id in pending))

    def reorder(self, job_ids: list[str]) -> list[str]:
        """Move `job_ids` (queued, in the order given) ahead of the other queued jobs; returns the new order."""
        waiting = self.queued()
        if missing := [job_id for job_id in job_ids if job_id not in waiting]:
            raise ValueError(f"job_ids: {', '.join(map(repr, missing))} not queued (running, done or unknown)")
        if len(set(job_ids)) != len(job_ids):
            raise ValueError("job_ids: each job may be named once")
        with self.engine.begin() as connection:
            top = connection.execute(text("SELECT COALESCE(MAX(priority), 0) FROM procrastinate_jobs "
                                          "WHERE status = 'todo'")).scalar_one()  # fmt: skip
            for rank, job_id in enumerate(job_ids):
                priority = top + len(job_ids) - rank
                connection.execute(SET_PRIORITY, {"priority": priority, "task": queue.TASK_NAME, "job_id": job_id})
        return self.queued()

    def clear(self) -> list[str]:
        """Cancel every queued job (running ones go on); returns the ids cancelled."""
        return [job_id for job_id in self.queued() if self.cancel(job_id) == CANCELLED]

    def close(self) -> None:
        self._sweeper.close()
        self._listener.close()
        self.app.close()


def model_of(params: dict, default: str) -> str:
    """The model a job's request was resolved for (its queue), from its stored payload."""
    request = params.get("request") or {}
    return request.get("resolved_for") or default
