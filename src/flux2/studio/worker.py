"""What runs the jobs: one queue and one lock for all model work, inference off the event loop.

Routes talk to a `Worker` (submit, cancel, recover, status, close) and read events from its `EventBus`; the
`LocalWorker` runs jobs one at a time in a thread of this process, through a `JobExecutor` (which every worker
shares: it runs one taken job and records its outcome). Its task runner takes data only (a job id, the
job's typed payload, a cancel event and a progress reporter) and hands back data (a TaskResult), which the worker
records. So another implementation (`flux2.studio.distributed`: a PostgreSQL queue with workers on other machines)
takes its place without touching the routes or the tasks: job state lives in the database (JobStore), and every
state change is a compare-and-set there.
"""

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from flux2.studio.events import EventBus, JobEvent, JobState
from flux2.studio.jobs_store import JobStore
from flux2.studio.payloads import JobPayload, read_payload
from flux2.studio.records import Asset, JobStatus
from flux2.studio.storage import MediaStore

log = logging.getLogger(__name__)


class JobCancelled(Exception):
    """Raised inside a task once its job is cancelled (tasks turn the pipeline's own cancellation into this)."""


class Reporter(Protocol):
    def __call__(self, percent: int, message: str, *, enhanced_prompt: str | None = None) -> None:
        """Progress (0-100) and a status line, with the upsampled prompt once known; raises JobCancelled once the
        job is cancelled."""
        ...


@dataclass(frozen=True)
class TaskContext:
    """What a task gets besides its job: a cancel event for the pipeline and a progress reporter."""

    cancel: threading.Event
    report: Reporter


@dataclass(frozen=True)
class TaskResult:
    """What a finished task hands back, as data: the asset to record (its files are published already), and what
    completing the job records besides. The worker removes the asset's files if the job cannot complete."""

    asset: Asset  # not yet stored
    event_type: str  # the `type` of the `complete` event: "image", "thumbnail", "inpaint" or "visualize"
    message: str = "Image ready"
    enhanced_prompt: str | None = None  # the upsampled prompt the model was given
    element_id: str | None = None  # an element whose picture becomes the asset
    shot_id: str | None = None  # a shot of the asset's project whose thumbnail becomes the asset


TaskRunner = Callable[[str, JobPayload, TaskContext], TaskResult]  # (job id, payload, context)


@dataclass(frozen=True)
class WorkerStatus:
    busy: bool
    queued: int
    running: str | None  # the running job's id


class Worker(Protocol):
    events: EventBus

    def submit(self, job_id: str) -> None: ...

    def cancel(self, job_id: str) -> str: ...

    def recover(self) -> list[str]: ...

    def status(self) -> WorkerStatus: ...

    def queued(self) -> list[str]: ...

    def reorder(self, job_ids: list[str]) -> list[str]: ...

    def clear(self) -> list[str]: ...

    def close(self) -> None: ...


class LocalWorker:
    """Runs jobs one at a time in a background thread of this process."""

    def __init__(self, store: JobStore, runner: TaskRunner, events: EventBus, media: MediaStore):
        self.store, self.runner, self.events, self.media = store, runner, events, media
        self._executor = JobExecutor(store, runner, media, self._publish)
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._running: tuple[str, threading.Event] | None = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="flux2-studio-worker", daemon=True)
        self._thread.start()

    def submit(self, job_id: str) -> None:
        if self._stopping.is_set():
            raise RuntimeError("the worker is shutting down")
        self._queue.put(job_id)

    def cancel(self, job_id: str) -> str:
        """ "cancelled" (it was queued), "cancelling" (it stops at its next step) or "not_found_or_already_done"."""
        outcome = self.store.cancel(job_id)
        if outcome == "cancelled":
            self._publish("cancelled", job_id)
        elif outcome == "cancelling":
            with self._lock:
                if self._running is not None and self._running[0] == job_id:
                    self._running[1].set()
        return outcome

    def recover(self) -> list[str]:
        """After a restart: re-queue what the database says was interrupted; the rest is marked as failed."""
        requeued = [job.id for job in self.store.recover()]
        for job_id in requeued:
            self.submit(job_id)
        return requeued

    def status(self) -> WorkerStatus:
        with self._lock:
            running = self._running[0] if self._running else None
        return WorkerStatus(busy=running is not None, queued=self._queue.qsize(), running=running)

    def queued(self) -> list[str]:
        """The ids waiting for the worker, next first (a job cancelled while queued is left out)."""
        pending = {job.id for job in self.store.pending()}
        with self._queue.mutex:
            return [job_id for job_id in self._queue.queue if job_id in pending]

    def reorder(self, job_ids: list[str]) -> list[str]:
        """Move `job_ids` (queued jobs, in the order given) ahead of the other queued jobs, which keep their order;
        returns the new order. An id that is not queued is a ValueError naming it. The order lives in this
        process: after a restart the queue is rebuilt oldest first."""
        pending = {job.id for job in self.store.pending()}
        with self._queue.mutex:  # the queue's own lock: the worker thread cannot take a job halfway through
            waiting = list(self._queue.queue)
            if missing := [job_id for job_id in job_ids if job_id not in waiting or job_id not in pending]:
                raise ValueError(f"job_ids: {', '.join(map(repr, missing))} not queued (running, done or unknown)")
            if len(set(job_ids)) != len(job_ids):
                raise ValueError("job_ids: each job may be named once")
            self._queue.queue.clear()
            self._queue.queue.extend([*job_ids, *(job_id for job_id in waiting if job_id not in job_ids)])
        return self.queued()

    def clear(self) -> list[str]:
        """Cancel every queued job (the running one goes on); returns the ids cancelled."""
        return [job_id for job_id in self.queued() if self.cancel(job_id) == "cancelled"]

    def close(self, timeout: float = 30.0) -> None:
        """Stop after the current step; an interrupted job goes back to the queue and runs at the next start."""
        self._stopping.set()
        with self._lock:
            if self._running is not None:
                self._running[1].set()
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread

    def _serve(self) -> None:
        while (job_id := self._queue.get()) is not None:
            if self._stopping.is_set():
                break
            try:
                if self.store.start(job_id):  # False: cancelled while queued, or already taken
                    self._run(job_id)
            except Exception:  # the database went away, say: this job is stuck, the next ones must not be
                log.exception("the worker could not run job %s", job_id)

    def _run(self, job_id: str) -> None:
        cancel = threading.Event()
        with self._lock:
            self._running = (job_id, cancel)
        try:
            self._executor.run(job_id, cancel, self._stopping)
        finally:
            with self._lock:
                self._running = None

    def _publish(self, name: str, job_id: str, **overrides) -> None:
        job = self.store.get(job_id)
        if job is not None:
            self.events.publish(JobEvent(name, JobState.of(job).model_copy(update=overrides)))


Publish = Callable[..., None]  # (event name, job id, **fields of the event's JobState to override)


@dataclass
class JobExecutor:
    """Runs one job a worker has taken (`JobStore.start`) through the task runner, and records how it ended:
    completed with its asset, cancelled, failed, or (stopped by a shutdown) back in the queue. Shared by every
    worker, in this process or another; `owner` is the lease the job was taken under (None in-process)."""

    store: JobStore
    runner: TaskRunner
    media: MediaStore
    publish: Publish
    owner: str | None = None

    def run(self, job_id: str, cancel: threading.Event, stopping: threading.Event) -> None:
        if self.store.is_cancel_requested(job_id):  # cancelled between start() and now
            cancel.set()
        owner = self.owner
        try:
            payload = read_payload(self.store.get(job_id))
            self.publish("progress", job_id)
            result = self.runner(job_id, payload, TaskContext(cancel, self._reporter(job_id, cancel)))
            self._complete(job_id, result, cancel)
        except JobCancelled:
            if stopping.is_set() and not self.store.is_cancel_requested(job_id):
                if self.store.requeue(job_id, owner=owner):  # runs again at the next start
                    log.info("job %s interrupted by the shutdown: re-queued", job_id)
            elif self.store.mark_cancelled(job_id, owner=owner):
                self.publish("cancelled", job_id)
        except Exception as err:
            log.warning("job %s failed: %s", job_id, err, exc_info=log.isEnabledFor(logging.DEBUG))
            if self.store.fail(job_id, _one_line(err), owner=owner):
                self.publish("error", job_id, message=_one_line(err))

    def _complete(self, job_id: str, result: TaskResult, cancel: threading.Event) -> None:
        if cancel.is_set() or self.store.is_cancel_requested(job_id):  # cancelled during the last steps
            self._discard(job_id, result.asset)
            raise JobCancelled(job_id)
        recorded = {"enhanced_prompt": result.enhanced_prompt, "element_id": result.element_id,
                    "shot_id": result.shot_id, "owner": self.owner}  # fmt: skip
        done = self.store.complete_with_asset(job_id, result.asset, result.message, **recorded)
        if done is None:  # ended meanwhile by someone else: no asset is left behind
            self._discard(job_id, result.asset)
            return
        self.publish("complete", job_id, type=result.event_type)

    def _discard(self, job_id: str, asset: Asset) -> None:
        """Remove a run's files, unless they may be another run's: outputs are named after the job, so a run that
        lost the job (swept while it was only slow) leaves the files to the run that holds it now, or to the
        job's record once that run completed."""
        job = self.store.get(job_id)
        if job is not None and job.status == JobStatus.PROCESSING and self.store.owner_of(job_id) != self.owner:
            return
        kept = {job.output_url, job.thumbnail_url} if job is not None else set()
        for url in (asset.url, asset.thumbnail_url):
            if url and url not in kept:
                self.media.delete(url)

    def _reporter(self, job_id: str, cancel: threading.Event) -> Reporter:
        def report(percent: int, message: str, *, enhanced_prompt: str | None = None) -> None:
            if cancel.is_set():
                raise JobCancelled(job_id)
            if self.store.progress(job_id, percent, message, enhanced_prompt, owner=self.owner):
                self.publish("progress", job_id)

        return report


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
