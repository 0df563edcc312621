"""GET /metrics: what an operator watches: jobs waiting per model, jobs running, jobs ended by outcome, and the
latency percentiles of the latest jobs, as JSON or (`?format=prometheus`) in Prometheus' text format.

Read from the jobs table, so every API process answers the same, on SQLite and PostgreSQL alike.
"""

import math
from datetime import datetime
from typing import Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel
from sqlalchemy import func
from sqlmodel import Session, col, select

from flux2.studio.api.deps import SessionDep, SettingsDep
from flux2.studio.records import Job, JobStatus

router = APIRouter(tags=["service"])
LATENCY_WINDOW = 200  # the latest completed jobs the percentiles are taken over
PERCENTILES = (50, 95, 99)
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class Latency(BaseModel):
    """Seconds, over the latest `jobs` completed jobs: `total` from queued to done, `run` from started to done."""

    jobs: int
    total_p50: float | None
    total_p95: float | None
    total_p99: float | None
    run_p50: float | None
    run_p95: float | None
    run_p99: float | None


class Metrics(BaseModel):
    queued: dict[str, int]  # pending jobs per model
    running: dict[str, int]  # processing jobs per model
    ended: dict[str, int]  # completed, failed and cancelled jobs, all time
    latency: Latency


@router.get("/metrics", summary="Queue length per model, running jobs, outcomes, latency percentiles",
            response_model=Metrics,
            responses={200: {"content": {PROMETHEUS_TEXT: {"schema": {"type": "string"}}}}})  # fmt: skip
def metrics(session: SessionDep, settings: SettingsDep,
            format: Literal["json", "prometheus"] = Query("json")):  # fmt: skip
    """JSON by default; `?format=prometheus` for a Prometheus scrape."""
    now = read_metrics(session, settings.model)
    return PlainTextResponse(prometheus_text(now), media_type=PROMETHEUS_TEXT) if format == "prometheus" else now


def read_metrics(session: Session, default_model: str) -> Metrics:
    model = col(Job.params)["request"]["resolved_for"].as_string()
    rows = session.exec(select(Job.status, model, func.count()).group_by(Job.status, model)).all()
    by_status: dict[str, dict[str, int]] = {}
    for status, name, count in rows:
        per_model = by_status.setdefault(status, {})
        per_model[name or default_model] = per_model.get(name or default_model, 0) + count
    ended = {s.value: sum(by_status.get(s.value, {}).values()) for s in (JobStatus.COMPLETED, JobStatus.FAILED,
                                                                          JobStatus.CANCELLED)}  # fmt: skip
    return Metrics(queued=by_status.get(JobStatus.PENDING.value, {}),
                   running=by_status.get(JobStatus.PROCESSING.value, {}), ended=ended,
                   latency=latency(session))  # fmt: skip


def latency(session: Session, window: int = LATENCY_WINDOW) -> Latency:
    query = (
        select(Job.created_at, Job.started_at, Job.finished_at)
        .where(Job.status == JobStatus.COMPLETED.value, col(Job.finished_at).is_not(None))
        .order_by(col(Job.finished_at).desc())
        .limit(window)
    )
    rows = session.exec(query).all()
    total = sorted(_seconds(created, finished) for created, _, finished in rows)
    run = sorted(_seconds(started, finished) for _, started, finished in rows if started is not None)
    values = {f"{kind}_p{p}": percentile(data, p) for kind, data in (("total", total), ("run", run))
              for p in PERCENTILES}  # fmt: skip
    return Latency(jobs=len(rows), **values)


def percentile(sorted_values: list[float], p: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least p% of the values at or below it."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return round(sorted_values[rank - 1], 3)


def prometheus_text(now: Metrics) -> str:
    lines = [
        "# HELP flux2_jobs_queued Jobs waiting for a worker, per model.",
        "# TYPE flux2_jobs_queued gauge",
        *(f'flux2_jobs_queued{{model="{model}"}} {n}' for model, n in sorted(now.queued.items())),
        "# HELP flux2_jobs_running Jobs a worker runs now, per model.",
        "# TYPE flux2_jobs_running gauge",
        *(f'flux2_jobs_running{{model="{model}"}} {n}' for model, n in sorted(now.running.items())),
        "# HELP flux2_jobs_ended_total Jobs ended, per outcome.",
        "# TYPE flux2_jobs_ended_total counter",
        *(f'flux2_jobs_ended_total{{status="{status}"}} {n}' for status, n in now.ended.items()),
        f"# HELP flux2_job_latency_seconds Latency of the latest {now.latency.jobs} completed jobs.",
        "# TYPE flux2_job_latency_seconds gauge",
    ]
    for kind in ("total", "run"):
        for p in PERCENTILES:
            value = getattr(now.latency, f"{kind}_p{p}")
            if value is not None:
                lines.append(f'flux2_job_latency_seconds{{kind="{kind}",quantile="{p / 100}"}} {value}')
    return "\n".join(lines) + "\n"


def _seconds(start: datetime, end: datetime) -> float:
    return max(0.0, (end - start).total_seconds())
