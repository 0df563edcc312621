"""Job and asset bookkeeping: the only code that changes Job rows.

Every change is one UPDATE guarded by the status it expects (compare and set), and returns whether it applied.
So two workers racing for a job, a cancel racing a completion, or a job re-run after a crash cannot both win:
whichever UPDATE lands second matches no row and gets False. Callers act on that answer (a worker whose `start`
returns False skips the job; one whose `complete_with_asset` returns None throws its output away).

Job lifecycle:

    pending ──start──▶ processing ──complete──▶ completed
       │                  │ ├──fail──────────▶ failed
       │                  │ └──mark_cancelled─▶ cancelled   (after cancel() set cancel_requested)
       ├──fail──▶ failed  └──recover (restart)─▶ pending | failed | cancelled
       └──cancel──▶ cancelled               └──sweep (its worker went silent)─▶ pending | failed | cancelled

Workers in other processes (flux2.studio.distributed) take a job with an `owner` name: `start` records a lease
(owner, heartbeat time) in `job_lease`, the owner renews it with `heartbeat`, and every later change made with
that owner also requires the lease to still be the owner's. So a worker that was presumed dead, whose job was
swept back to the queue and taken by another, can no longer change the job: its late writes match no row.
"""

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import Column, DateTime, Engine, String, Table, delete, exists, func, insert, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, col, select

from flux2.studio.payloads import JobPayload
from flux2.studio.records import ACTIVE, Asset, Element, Job, JobStatus, Shot, new_job_id, utcnow
from flux2.studio.storage import check_safe_id

# The answers of `JobStore.cancel`, as the cancel route returns them (spec §1.8).
CANCELLED = "cancelled"
CANCELLING = "cancelling"
NOT_FOUND_OR_DONE = "not_found_or_already_done"

REQUEUED_MESSAGE = "re-queued after a restart"
RESTART_FAILED_MESSAGE = "stopped by a server restart"
RESTART_CANCELLED_MESSAGE = "cancelled (the server restarted before the job stopped)"
SWEPT_MESSAGE = "re-queued: its worker stopped answering"
SWEPT_FAILED_MESSAGE = "its worker stopped answering, too often (the job may be what stops them)"
SWEPT_CANCELLED_MESSAGE = "cancelled (its worker stopped answering before the job stopped)"

# Who runs a processing job, and when it last said it still does (migration 0003).
JOB_LEASE = Table(
    "job_lease",
    SQLModel.metadata,
    Column("job_id", String(), primary_key=True),
    Column("worker", String(), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)


class JobStore:
    """Job rows, changed only by compare-and-set. Thread-safe: each call uses its own connection."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def create(self, payload: JobPayload, *, job_id: str | None = None) -> Job:
        """A new pending job running `payload`, with its seed recorded now: the job runs with that seed however
        often it is started. `job_id` lets a client name it (the inpaint route takes one); it must be unused and
        safe in a file name, since outputs are written under it."""
        job = Job(
            id=check_safe_id("job_id", job_id) if job_id is not None else new_job_id(),
            type=payload.job_type,
            project_id=payload.project_id,
            prompt=payload.request.prompt,
            params=payload.to_json(),
            seed=payload.request.seed,
            status=JobStatus.PENDING.value,
            status_message="Queued",
        )
        try:
            with Session(self._engine, expire_on_commit=False) as session:
                session.add(job)
                session.commit()
        except IntegrityError as error:
            raise ValueError(f"job_id {job.id!r} is already taken") from error
        return job

    def get(self, job_id: str) -> Job | None:
        with Session(self._engine, expire_on_commit=False) as session:
            return session.get(Job, job_id)

    def start(self, job_id: str, owner: str | None = None) -> bool:
        """pending → processing: a worker takes the job (with `owner`, under a lease in that name). False: someone
        else took it, or it was cancelled."""
        values = {"status": JobStatus.PROCESSING.value, "started_at": utcnow(), "attempts": col(Job.attempts) + 1,
                  "progress": 0, "status_message": "Starting"}  # fmt: skip
        with self._engine.begin() as connection:
            taken = update(Job).where(*_guard(job_id, [JobStatus.PENDING])).values(**values)
            if connection.execute(taken).rowcount != 1:
                return False
            if owner is not None:
                connection.execute(delete(JOB_LEASE).where(JOB_LEASE.c.job_id == job_id))
                lease = {"job_id": job_id, "worker": owner, "heartbeat_at": self._now()}
                connection.execute(insert(JOB_LEASE).values(**lease))
        return True

    def heartbeat(self, job_id: str, owner: str) -> bool | None:
        """The owner still runs the job: renew its lease. Returns whether a cancel was requested, or None when the
        lease is lost (the job ended, or was swept and taken by another worker): stop and write nothing."""
        held = (JOB_LEASE.c.job_id == job_id, JOB_LEASE.c.worker == owner)
        processing = exists().where(*_guard(job_id, [JobStatus.PROCESSING]))
        with self._engine.begin() as connection:
            renewed = update(JOB_LEASE).where(*held, processing).values(heartbeat_at=self._now())
            if connection.execute(renewed).rowcount != 1:
                return None
            return bool(connection.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar())

    def owner_of(self, job_id: str) -> str | None:
        """Whose lease the job was last taken under (None: never taken by a leased worker)."""
        with self._engine.connect() as connection:
            return connection.execute(select(JOB_LEASE.c.worker).where(JOB_LEASE.c.job_id == job_id)).scalar()

    def stalled(self, silent_s: float) -> list[tuple[str, str]]:
        """(job id, owner) of processing jobs whose lease was not renewed for `silent_s` seconds."""
        cutoff = self._now() - timedelta(seconds=silent_s)
        query = (
            select(JOB_LEASE.c.job_id, JOB_LEASE.c.worker)
            .join(Job, col(Job.id) == JOB_LEASE.c.job_id)
            .where(col(Job.status) == JobStatus.PROCESSING.value, JOB_LEASE.c.heartbeat_at < cutoff)
        )
        with self._engine.connect() as connection:
            return [(row.job_id, row.worker) for row in connection.execute(query)]

    def sweep(self, job_id: str, owner: str, max_attempts: int) -> JobStatus | None:
        """A stalled job (see `stalled`) leaves its silent owner: cancelled if a cancel was requested, back to
        pending if it started fewer than `max_attempts` times, else failed. Returns the new status, or None when
        the job had moved on meanwhile (another sweeper won, or the owner finished it)."""
        requeued = {"status": JobStatus.PENDING.value, "status_message": SWEPT_MESSAGE, "progress": 0,
                    "started_at": None}  # fmt: skip
        failed = {"status": JobStatus.FAILED.value, "status_message": SWEPT_FAILED_MESSAGE,
                  "error_message": SWEPT_FAILED_MESSAGE, "finished_at": utcnow()}  # fmt: skip
        cancelled = {"status": JobStatus.CANCELLED.value, "status_message": SWEPT_CANCELLED_MESSAGE,
                     "finished_at": utcnow()}  # fmt: skip
        outcomes = [
            (JobStatus.CANCELLED, [col(Job.cancel_requested).is_(True)], cancelled),
            (JobStatus.PENDING, [col(Job.attempts) < max_attempts], requeued),
            (JobStatus.FAILED, [], failed),
        ]
        with self._engine.begin() as connection:
            for status, where, values in outcomes:
                guard = _guard(job_id, [JobStatus.PROCESSING], _leased_to(job_id, owner), *where)
                if connection.execute(update(Job).where(*guard).values(**values)).rowcount == 1:
                    connection.execute(delete(JOB_LEASE).where(JOB_LEASE.c.job_id == job_id))
                    return status
        return None

    def progress(
        self, job_id: str, progress: int, message: str, enhanced_prompt: str | None = None, *, owner: str | None = None
    ) -> bool:
        """Progress (0-100) and a status line, while the job is processing; with `enhanced_prompt`, the upsampled
        prompt as soon as it is known."""
        if isinstance(progress, bool) or not isinstance(progress, int) or not 0 <= progress <= 100:
            raise ValueError(f"progress must be an integer in [0, 100], got {progress!r}")
        extra = {} if enhanced_prompt is None else {"enhanced_prompt": enhanced_prompt}
        where = _owned(job_id, owner)
        return self._set(job_id, [JobStatus.PROCESSING], *where, progress=progress, status_message=message, **extra)

    def complete(
        self,
        job_id: str,
        asset_id: str | None,
        output_url: str | None,
        thumbnail_url: str | None,
        message: str = "Image ready",
        enhanced_prompt: str | None = None,
    ) -> bool:
        """processing → completed. A cancel requested too late (the work had finished) loses: the job completes.
        `complete_with_asset` does this and the asset insert in one transaction."""
        values = _completed(asset_id, output_url, thumbnail_url, message, enhanced_prompt)
        return self._set(job_id, [JobStatus.PROCESSING], **values)

    def complete_with_asset(
        self,
        job_id: str,
        asset: Asset,
        message: str = "Image ready",
        *,
        enhanced_prompt: str | None = None,
        element_id: str | None = None,
        shot_id: str | None = None,
        owner: str | None = None,
    ) -> Asset | None:
        """Insert the job's asset, complete the job and make the asset the picture of `element_id`, or the
        thumbnail of the asset's project's shot `shot_id` (if given and still there), together or not at all.
        Returns the job's asset (the one already recorded for this job, if a crashed run got that far), or None
        when the job was no longer processing (nothing is written then: the caller removes its files)."""
        if asset.job_id != job_id:
            raise ValueError(f"asset.job_id must be the job's id {job_id!r}, got {asset.job_id!r}")
        with Session(self._engine, expire_on_commit=False) as session, session.begin():
            guard = _guard(job_id, [JobStatus.PROCESSING], *_owned(job_id, owner))
            values = _completed(asset.id, asset.url, asset.thumbnail_url, message, enhanced_prompt)
            if session.execute(update(Job).where(*guard).values(**values)).rowcount != 1:
                return None
            existing = session.exec(select(Asset).where(Asset.job_id == job_id)).first()
            if existing is not None:
                values = _completed(existing.id, existing.url, existing.thumbnail_url, message, enhanced_prompt)
                session.execute(update(Job).where(col(Job.id) == job_id).values(**values))
                asset = existing
            else:
                session.add(asset)
            if element_id is not None:
                session.execute(update(Element).where(col(Element.id) == element_id).values(image_path=asset.url))
            if shot_id is not None:
                shot = (col(Shot.project_id) == asset.project_id, col(Shot.id) == shot_id)
                session.execute(update(Shot).where(*shot).values(thumbnail_url=asset.url))
        return asset

    def fail(self, job_id: str, message: str, *, owner: str | None = None) -> bool:
        """pending | processing → failed, with `message` as the error_message."""
        return self._set(
            job_id,
            [JobStatus.PENDING, JobStatus.PROCESSING] if owner is None else [JobStatus.PROCESSING],
            *_owned(job_id, owner),
            status=JobStatus.FAILED.value,
            error_message=message,
            status_message="Failed",
            finished_at=utcnow(),
        )

    def cancel(self, job_id: str) -> str:
        """A user's cancel: a pending job is cancelled at once ("cancelled"); a processing one is flagged and stops
        at its next step check ("cancelling"); anything else answers "not_found_or_already_done"."""
        now = utcnow()
        with self._engine.begin() as connection:
            cancelled = update(Job).where(*_guard(job_id, [JobStatus.PENDING]))
            values = {"status": JobStatus.CANCELLED.value, "status_message": "Cancelled", "finished_at": now}
            if connection.execute(cancelled.values(**values)).rowcount == 1:
                return CANCELLED
            flagged = update(Job).where(*_guard(job_id, [JobStatus.PROCESSING]))
            if connection.execute(flagged.values(cancel_requested=True, status_message="Cancelling")).rowcount == 1:
                return CANCELLING
        return NOT_FOUND_OR_DONE

    def is_cancel_requested(self, job_id: str) -> bool:
        with Session(self._engine) as session:
            return bool(session.exec(select(Job.cancel_requested).where(Job.id == job_id)).first())

    def mark_cancelled(self, job_id: str, *, owner: str | None = None) -> bool:
        """processing → cancelled: the worker stopped the job."""
        return self._set(
            job_id,
            [JobStatus.PROCESSING],
            *_owned(job_id, owner),
            status=JobStatus.CANCELLED.value,
            status_message="Cancelled",
            finished_at=utcnow(),
        )

    def active(self, project_id: str | None = None) -> list[Job]:
        """Pending and processing jobs (of one project, if given), oldest first."""
        query = select(Job).where(col(Job.status).in_([s.value for s in ACTIVE]))
        if project_id is not None:
            query = query.where(Job.project_id == project_id)
        return self._list(query)

    def pending(self) -> list[Job]:
        """Pending jobs, oldest first: the queue."""
        return self._list(select(Job).where(Job.status == JobStatus.PENDING.value))

    def recover(self, max_attempts: int = 2) -> list[Job]:
        """After a crash or restart, give every job left active a clear state, and return the queue to rebuild
        (pending jobs, oldest first).

        A job whose cancel was requested is cancelled; a processing job goes back to pending if it started fewer
        than `max_attempts` times, else it fails (a job that keeps crashing the server is not retried forever).
        Assumes no worker is running: call it at startup, before the worker takes jobs.
        """
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"max_attempts must be a positive integer, got {max_attempts!r}")
        now = utcnow()
        active = col(Job.status).in_([s.value for s in ACTIVE])
        processing = col(Job.status) == JobStatus.PROCESSING.value
        with self._engine.begin() as connection:
            connection.execute(
                update(Job)
                .where(active, col(Job.cancel_requested).is_(True))
                .values(status=JobStatus.CANCELLED.value, status_message=RESTART_CANCELLED_MESSAGE, finished_at=now)
            )
            connection.execute(
                update(Job)
                .where(processing, col(Job.attempts) < max_attempts)
                .values(status=JobStatus.PENDING.value, status_message=REQUEUED_MESSAGE, progress=0, started_at=None)
            )
            connection.execute(
                update(Job)
                .where(processing)
                .values(
                    status=JobStatus.FAILED.value,
                    status_message=RESTART_FAILED_MESSAGE,
                    error_message=RESTART_FAILED_MESSAGE,
                    finished_at=now,
                )
            )
        return self.pending()

    def requeue(
        self, job_id: str, message: str = "re-queued: the server stopped while it ran", *, owner: str | None = None
    ) -> bool:
        """processing → pending, giving back the attempt: a graceful stop is not the job's fault."""
        return self._set(
            job_id,
            [JobStatus.PROCESSING],
            *_owned(job_id, owner),
            status=JobStatus.PENDING.value,
            status_message=message,
            progress=0,
            started_at=None,
            attempts=Job.attempts - 1,
        )

    def _now(self) -> Any:
        """The time leases are stamped and judged by: the database server's clock where it has one (PostgreSQL),
        so workers on machines whose clocks disagree still agree on who went silent."""
        return func.now() if self._engine.dialect.name == "postgresql" else utcnow()

    def _set(self, job_id: str, expected: Iterable[JobStatus], *where: Any, **values: Any) -> bool:
        statement = update(Job).where(*_guard(job_id, expected, *where)).values(**values)
        with self._engine.begin() as connection:
            return connection.execute(statement).rowcount == 1

    def _list(self, query: Any) -> list[Job]:
        with Session(self._engine, expire_on_commit=False) as session:
            return list(session.exec(query.order_by(col(Job.created_at), col(Job.id))).all())


class AssetStore:
    """Asset rows made by jobs: at most one per job."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add_for_job(self, asset: Asset) -> Asset:
        """Insert `asset`, or return the asset already recorded for its job (a job re-run after a crash)."""
        try:
            with Session(self._engine, expire_on_commit=False) as session:
                session.add(asset)
                session.commit()
            return asset
        except IntegrityError:
            existing = self.for_job(asset.job_id) if asset.job_id is not None else None
            if existing is None:
                raise  # not the job_id constraint: an unknown project_id, say
            return existing

    def get(self, asset_id: str) -> Asset | None:
        with Session(self._engine, expire_on_commit=False) as session:
            return session.get(Asset, asset_id)

    def for_job(self, job_id: str) -> Asset | None:
        with Session(self._engine, expire_on_commit=False) as session:
            return session.exec(select(Asset).where(Asset.job_id == job_id)).first()


def _guard(job_id: str, expected: Iterable[JobStatus], *where: Any) -> list[Any]:
    return [col(Job.id) == job_id, col(Job.status).in_([s.value for s in expected]), *where]


def _leased_to(job_id: str, owner: str) -> Any:
    return exists().where(JOB_LEASE.c.job_id == job_id, JOB_LEASE.c.worker == owner)


def _owned(job_id: str, owner: str | None) -> list[Any]:
    """The extra condition of a change made by `owner` (none for the in-process worker, which holds no lease)."""
    return [] if owner is None else [_leased_to(job_id, owner)]


def _completed(
    asset_id: str | None, output_url: str | None, thumbnail_url: str | None, message: str, enhanced_prompt: str | None
) -> dict[str, Any]:
    values = {
        "status": JobStatus.COMPLETED.value,
        "progress": 100,
        "status_message": message,
        "asset_id": asset_id,
        "output_url": output_url,
        "thumbnail_url": thumbnail_url,
        "finished_at": utcnow(),
    }
    return values if enhanced_prompt is None else {**values, "enhanced_prompt": enhanced_prompt}
