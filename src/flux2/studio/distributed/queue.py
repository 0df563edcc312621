"""The job queue: a procrastinate app over the studio's own PostgreSQL database.

One task, `run_job(job_id, model)`, deferred onto the queue named after the job's model, so only workers that
hold that model take it. Procrastinate's tables live beside the studio's; `ensure_schema` creates them (and the
event sequence of `notify.py`) once, whichever process starts first.
"""

import procrastinate
import psycopg
from procrastinate.schema import SchemaManager
from sqlalchemy import Engine, text

from flux2.studio.db import libpq_url

TASK_NAME = "flux2.run_job"
QUEUE_PREFIX = "flux2."
# Held while creating the schema, so processes starting together create it once (an arbitrary advisory lock key).
SCHEMA_LOCK_KEY = 0x464C5832  # "FLX2"
EVENT_SEQUENCE = "flux2_event_seq"  # orders job events (notify.py)


def queue_for(model: str) -> str:
    """The queue of `model`'s jobs."""
    if not model:
        raise ValueError("model must be a registry name, got an empty string")
    return QUEUE_PREFIX + model


def make_app(database_url: str) -> procrastinate.App:
    """The queue app for `database_url` (not opened yet: `app.open()` for deferring, or run a worker)."""
    connector = procrastinate.PsycopgConnector(conninfo=libpq_url(database_url), min_size=1, max_size=4)
    return procrastinate.App(connector=connector)


def ensure_schema(database_url: str) -> None:
    """Procrastinate's schema and the event sequence, created if missing; safe to call at every start."""
    with psycopg.connect(libpq_url(database_url), autocommit=True) as connection, connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        if connection.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()[0] is None:
            connection.execute(SchemaManager.get_schema())
        connection.execute(f"CREATE SEQUENCE IF NOT EXISTS {EVENT_SEQUENCE}")


def defer(app: procrastinate.App, job_id: str, model: str, priority: int = 0) -> int:
    """Queue `job_id` for a worker of `model`; returns procrastinate's job id."""
    deferrer = app.configure_task(name=TASK_NAME, queue=queue_for(model), priority=priority)
    return deferrer.defer(job_id=job_id, model=model)


# Deliveries taken by workers whose procrastinate heartbeat went silent (or whose worker row is gone), locked so
# that of sweepers racing, one handles each.
STALLED_DELIVERIES = text(
    "SELECT j.id, j.args->>'job_id' AS job_id FROM procrastinate_jobs j "
    "LEFT JOIN procrastinate_workers w ON w.id = j.worker_id "
    "WHERE j.status = 'doing' AND j.task_name = :task "
    "AND (w.id IS NULL OR w.last_heartbeat < now() - make_interval(secs => :silent_s)) "
    "FOR UPDATE OF j SKIP LOCKED"
)
OTHER_DELIVERY = text(
    "SELECT 1 FROM procrastinate_jobs WHERE task_name = :task AND args->>'job_id' = :job_id "
    "AND status IN ('todo', 'doing') AND id <> :id"
)


def drop_stalled_deliveries(engine: Engine, silent_s: float) -> list[str]:
    """End (as aborted) the deliveries that silent workers had taken, and return the studio job ids that no other
    delivery carries any more. What becomes of those jobs is the studio sweep's call (JobStore.sweep): this only
    keeps procrastinate's table true, and catches a worker that died between taking a delivery and its job."""
    orphaned = []
    with engine.begin() as connection:
        for row in connection.execute(STALLED_DELIVERIES, {"task": TASK_NAME, "silent_s": silent_s}).all():
            connection.execute(text("SELECT procrastinate_finish_job_v1(:id, 'aborted', false)"), {"id": row.id})
            other = {"task": TASK_NAME, "job_id": row.job_id, "id": row.id}
            if connection.execute(OTHER_DELIVERY, other).first() is None:
                orphaned.append(row.job_id)
    return orphaned
