"""The stalled-job sweep: a job whose worker stopped renewing its lease (killed, frozen, cut off) goes back to
the queue, or fails after too many tries, or ends cancelled if a cancel was waiting.

Every API process and every worker sweeps now and then; `JobStore.sweep` is a compare-and-set on the job and its
lease, so of sweepers racing for one job exactly one wins, and only the winner queues it again. The silent
worker, should it come back, has lost its lease: its writes match no row and its output is thrown away.
"""

import logging
import threading
from collections.abc import Callable

from sqlalchemy import Engine

from flux2.studio.distributed.queue import drop_stalled_deliveries
from flux2.studio.jobs_store import JobStore
from flux2.studio.records import JobStatus
from flux2.studio.worker import Publish

log = logging.getLogger(__name__)

Redeliver = Callable[[str], None]  # queue a job again (by id)
EVENT_OF = {JobStatus.FAILED: "error", JobStatus.CANCELLED: "cancelled"}


def sweep_once(store: JobStore, silent_s: float, max_attempts: int, redeliver: Redeliver, publish: Publish,
               engine: Engine | None = None) -> list[str]:  # fmt: skip
    """One pass; returns the ids this sweeper moved. With the `engine` of a PostgreSQL database, the queue's
    deliveries to silent workers are ended too, and a pending job left without one is delivered again."""
    moved = _sweep_leases(store, silent_s, max_attempts, redeliver, publish)
    if engine is not None:
        for job_id in drop_stalled_deliveries(engine, silent_s):
            job = store.get(job_id)
            if job is not None and job.status == JobStatus.PENDING and job_id not in moved:
                redeliver(job_id)
    return moved


def _sweep_leases(store: JobStore, silent_s: float, max_attempts: int, redeliver: Redeliver,
                  publish: Publish) -> list[str]:  # fmt: skip
    moved = []
    for job_id, owner in store.stalled(silent_s):
        status = store.sweep(job_id, owner, max_attempts)
        if status is None:
            continue
        moved.append(job_id)
        log.warning("job %s: its worker %s went silent for over %s s; the job is now %s", job_id, owner, silent_s,
                    status.value)  # fmt: skip
        if status == JobStatus.PENDING:
            redeliver(job_id)
        elif status == JobStatus.FAILED:
            job = store.get(job_id)
            publish("error", job_id, message=job.error_message if job else None)
        else:
            publish(EVENT_OF[status], job_id)
    return moved


class Sweeper:
    """Runs `sweep_once` every `every_s` seconds in a background thread until closed."""

    def __init__(self, every_s: float, sweep: Callable[[], list[str]]) -> None:
        if every_s <= 0:
            raise ValueError(f"the sweep interval must be > 0 seconds, got {every_s}")
        self.every_s, self._sweep = every_s, sweep
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flux2-sweep", daemon=True)

    def start(self) -> "Sweeper":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self._sweep()
            except Exception:  # the database away for a moment: try again next time
                log.exception("the stalled-job sweep failed")
