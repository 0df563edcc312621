"""The GPU worker process (`flux2 worker`): holds one model's pipeline and runs the jobs of that model's queue,
one at a time, through the same task code and JobExecutor as the in-process worker.

While a job runs, a heartbeat thread renews its lease every `heartbeat_s` (and reads the job's cancel flag);
a LISTEN on the cancel channel stops a job at its next step at once. SIGTERM or Ctrl-C stops the running job at
its next step and puts it back in the queue; SIGKILL leaves it to the sweep of another process.
"""

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
from dataclasses import dataclass, field

import procrastinate

from flux2.studio.config import StudioSettings
from flux2.studio.db import make_engine, upgrade
from flux2.studio.distributed import queue
from flux2.studio.distributed.notify import CANCEL_CHANNEL, EventPublisher, Listener
from flux2.studio.distributed.sweep import Sweeper, sweep_once
from flux2.studio.distributed.worker import model_of
from flux2.studio.jobs_store import JobStore
from flux2.studio.records import JobStatus
from flux2.studio.storage import MediaStore
from flux2.studio.tasks import PipelineHolder, Tasks
from flux2.studio.worker import JobExecutor

log = logging.getLogger(__name__)


@dataclass
class Running:
    """The job this process runs now, and how to stop it."""

    job_id: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel_if(self, job_id: str) -> None:
        with self.lock:
            if self.job_id == job_id:
                self.cancel.set()


class GpuWorker:
    """One worker process's state: the store, the task code, its lease name, the job it runs."""

    def __init__(self, settings: StudioSettings, pipeline=None) -> None:
        self.settings = settings
        self.engine = make_engine(settings.db_url)
        upgrade(self.engine)
        queue.ensure_schema(settings.db_url)
        self.store = JobStore(self.engine)
        self.media = MediaStore(settings.data_dir, settings.max_upload_bytes)
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.publish = EventPublisher(self.engine, self.store)
        self.holder = PipelineHolder(settings, pipeline)
        tasks = Tasks(self.holder, self.media, self.engine)
        self.executor = JobExecutor(self.store, tasks, self.media, self.publish, owner=self.owner)
        self.running = Running()
        self.stopping = threading.Event()
        self.app = queue.make_app(settings.db_url)  # the worker loop's, opened on its event loop
        self.outbox = queue.make_app(settings.db_url).open()  # for deferring from any thread

    def run_job(self, job_id: str, model: str) -> None:
        """The body of the queue's task: take the job (compare-and-set; a job cancelled, finished or taken
        meanwhile is skipped) and run it while the lease is kept alive."""
        if model != self.settings.model:  # a queue is one model's; this guards a misrouted message
            raise ValueError(f"job {job_id} is for {model}, but this worker holds {self.settings.model}")
        if self.stopping.is_set() or not self.store.start(job_id, owner=self.owner):
            return
        with self.running.lock:
            self.running.job_id, self.running.cancel = job_id, threading.Event()
            cancel = self.running.cancel
            if self.stopping.is_set():  # a shutdown began while the job was being taken
                cancel.set()
        beat = threading.Thread(target=self._keep_lease, args=(job_id, cancel), daemon=True)
        beat.start()
        try:
            self.executor.run(job_id, cancel, self.stopping)
        finally:
            with self.running.lock:
                self.running.job_id = None
            cancel.set()  # also ends the heartbeat
            beat.join()
        job = self.store.get(job_id)
        if job is not None and job.status == JobStatus.PENDING:  # given back by a shutdown: queue it again
            self.redeliver(job_id)

    def redeliver(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is not None:
            queue.defer(self.outbox, job_id, model_of(job.params, self.settings.model))

    def sweep(self) -> list[str]:
        settings = self.settings
        return sweep_once(self.store, settings.stall_timeout_s, settings.max_attempts, self.redeliver, self.publish,
                          self.engine)  # fmt: skip

    def on_cancel(self, channel: str, job_id: str) -> None:
        self.running.cancel_if(job_id)

    def stop_job(self) -> None:
        """A shutdown: the running job stops at its next step and goes back to the queue."""
        self.stopping.set()
        with self.running.lock:
            self.running.cancel.set()

    def _keep_lease(self, job_id: str, cancel: threading.Event) -> None:
        while not cancel.wait(self.settings.heartbeat_s):
            try:
                answer = self.store.heartbeat(job_id, self.owner)
            except Exception:  # the database away for a moment: the next beat tries again
                log.exception("job %s: could not renew the lease", job_id)
                continue
            if answer is None or answer:  # lease lost (swept: stop writing), or a cancel was requested
                cancel.set()


def serve(settings: StudioSettings, pipeline=None) -> None:
    """Run a worker for `settings.model` until SIGTERM or SIGINT."""
    worker = GpuWorker(settings, pipeline)
    worker.holder.get(lambda percent, message: log.info("%s", message))  # loaded before the first job is taken
    app = worker.app
    app.task(name=queue.TASK_NAME, queue=queue.queue_for(settings.model))(worker.run_job)
    cancels = Listener(settings.db_url, (CANCEL_CHANNEL,), worker.on_cancel).start()
    sweeper = Sweeper(settings.stall_timeout_s / 2, worker.sweep).start()
    try:
        asyncio.run(_run_queue(worker, app))
    finally:
        sweeper.close()
        cancels.close()
        worker.outbox.close()
        worker.engine.dispose()


async def _run_queue(worker: GpuWorker, app: procrastinate.App) -> None:
    settings = worker.settings
    async with app.open_async():
        task = asyncio.create_task(
            app.run_worker_async(
                queues=[queue.queue_for(settings.model)], name=worker.owner, concurrency=1,
                install_signal_handlers=False, update_heartbeat_interval=settings.heartbeat_s,
                stalled_worker_timeout=settings.stall_timeout_s, delete_jobs="successful",
            )
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, _stopper(worker, task))
        with contextlib.suppress(asyncio.CancelledError):  # how a stop ends procrastinate's loop
            await task


def _stopper(worker: GpuWorker, task: asyncio.Task):
    def stop() -> None:
        log.warning("stopping: the running job (if any) goes back to the queue")
        worker.stop_job()
        task.cancel()  # procrastinate stops taking jobs and waits for the running one

    return stop
