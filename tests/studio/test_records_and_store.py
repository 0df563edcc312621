"""The studio's data layer on real SQLite files: migrations, records, JobStore transitions, one asset per job."""

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError
from sqlalchemy import inspect, text, update
from sqlalchemy.exc import IntegrityError, StatementError
from sqlmodel import SQLModel, select

from flux2.registry import model_info
from flux2.request import GenerationRequest
from flux2.studio.config import StudioSettings
from flux2.studio.db import MIGRATIONS_DIR, alembic_config, make_engine, session_scope, upgrade
from flux2.studio.jobs_store import (
    CANCELLED,
    CANCELLING,
    NOT_FOUND_OR_DONE,
    REQUEUED_MESSAGE,
    RESTART_FAILED_MESSAGE,
    AssetStore,
    JobStore,
)
from flux2.studio.payloads import ImageJob, InpaintJob, read_payload
from flux2.studio.records import TERMINAL, Asset, Element, Job, JobStatus, Project

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()
NEXT = f"{int(HEAD) + 1:04d}"  # a test revision after our newest
TABLES = {"project", "scene", "shot", "element", "asset", "job"}
TINY = model_info("tiny")


@pytest.fixture
def url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'data' / 'studio.db'}"


@pytest.fixture
def engine(url):
    engine = make_engine(url)
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(engine) -> JobStore:
    return JobStore(engine)


@pytest.fixture
def assets(engine) -> AssetStore:
    return AssetStore(engine)


def revision_of(engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def make_asset(job_id: str | None, project_id: str | None = None, name: str = "a.jpg") -> Asset:
    url = f"/projects/{project_id}/generated/{name}" if project_id else f"/uploads/{name}"
    return Asset(
        project_id=project_id,
        job_id=job_id,
        type="image",
        path=url.lstrip("/"),
        url=url,
        filename=name,
        width=64,
        height=48,
        meta={"prompt": "a cat", "seed": 7},
    )


def image_job(prompt: str = "a cat", project_id: str = "p0", **request) -> ImageJob:
    """An image job's payload, its request resolved for the tiny model (so its seed is drawn)."""
    return ImageJob(project_id=project_id, request=GenerationRequest(prompt=prompt, **request).resolve(TINY))


def running_job(store: JobStore, **kw) -> Job:
    job = store.create(image_job(project_id=kw.pop("project_id", "p0"), width=64, **kw))
    assert store.start(job.id)
    return job


def status_of(store: JobStore, job_id: str) -> str:
    job = store.get(job_id)
    assert job is not None
    return job.status


# Settings.


def test_settings_defaults_environment_and_errors(monkeypatch, tmp_path):
    settings = StudioSettings()
    assert (settings.host, settings.port, settings.model) == ("127.0.0.1", 8000, "flux.2-klein-4b")
    assert settings.db_url == "sqlite:///studio-data/studio.db"
    assert StudioSettings(data_dir=tmp_path).db_url == f"sqlite:///{tmp_path}/studio.db"
    assert StudioSettings(database_url="postgresql://db/studio").db_url == "postgresql://db/studio"

    monkeypatch.setenv("FLUX2_STUDIO_PORT", "9001")
    monkeypatch.setenv("FLUX2_STUDIO_CORS_ORIGINS", "http://localhost:5173, http://127.0.0.1:5173")
    monkeypatch.setenv("FLUX2_STUDIO_API_TOKEN", "")
    settings = StudioSettings()
    assert settings.port == 9001 and settings.api_token is None
    assert settings.cors_origins == ["http://localhost:5173", "http://127.0.0.1:5173"]
    monkeypatch.setenv("FLUX2_STUDIO_CORS_ORIGINS", '["http://a.test"]')
    assert StudioSettings().cors_origins == ["http://a.test"]

    monkeypatch.setenv("FLUX2_STUDIO_PORT", "70000")
    with pytest.raises(ValidationError, match="port"):
        StudioSettings()
    with pytest.raises(ValidationError, match="max_upload_bytes"):
        StudioSettings(port=1, max_upload_bytes=0)
    with pytest.raises(ValidationError, match="segmentation_url"):
        StudioSettings(port=1, segmentation_url="file:///etc/passwd")


# Migrations.


def test_migrations_build_the_schema_from_empty(url):
    engine = make_engine(url)
    upgrade(engine)
    assert revision_of(engine) == HEAD
    assert TABLES <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        # The revisions and the records agree: autogenerate finds nothing to change in our tables.
        opts = {"compare_type": True, "include_object": lambda obj, name, type_, *_: type_ != "table" or name in TABLES}
        assert compare_metadata(MigrationContext.configure(connection, opts=opts), SQLModel.metadata) == []
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # back on after migrating
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    engine.dispose()


def test_upgrade_again_keeps_the_data(engine, store):
    with session_scope(engine) as session:
        session.add(Project(id="p1", name="Film"))
    payload = image_job(project_id="p1", num_steps=4)
    job = store.create(payload)
    upgrade(engine)
    upgrade(str(engine.url))
    assert revision_of(engine) == HEAD
    assert read_payload(store.get(job.id)) == payload
    with session_scope(engine) as session:
        assert session.get(Project, "p1").name == "Film"


def test_a_database_at_0001_is_upgraded_in_place(url):
    upgrade(url, "0001")
    engine = make_engine(url)
    assert revision_of(engine) == "0001"
    with engine.begin() as connection:  # rows as revision 0001 knew them, written without today's records
        connection.execute(
            text(
                "INSERT INTO project (id, name, created_at, updated_at, resolution_w, resolution_h, fps, seed) "
                "VALUES ('p1', 'Film', '2025-01-01 00:00:00', '2025-01-01 00:00:00', 768, 512, 25, 42)"
            )
        )
        connection.execute(
            text(
                "INSERT INTO element (id, project_id, name, trigger_word, type, description, created_at) "
                "VALUES ('e1', 'p1', 'Hero', '@Hero', 'character', '', '2025-01-01 00:00:00')"
            )
        )
    upgrade(engine)
    assert revision_of(engine) == HEAD
    with session_scope(engine) as session:
        element = session.get(Element, "e1")
        assert element.trigger_word == "@Hero"
        assert element.created_at == datetime(2025, 1, 1, tzinfo=UTC)
    engine.dispose()


def _migrations_with(tmp_path: Path, body: str) -> Path:
    """A copy of our migrations plus a revision `NEXT` after the head, whose upgrade() is `body`."""
    location = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, location, ignore=shutil.ignore_patterns("__pycache__"))
    revision = f'import sqlalchemy as sa\nfrom alembic import op\n\nrevision = "{NEXT}"\ndown_revision = "{HEAD}"\n\n'
    (location / "versions" / f"{NEXT}_test.py").write_text(revision + "\ndef upgrade():\n" + body)
    return location


def test_a_batch_rebuild_of_project_keeps_its_elements(tmp_path, engine, store, assets):
    """SQLite rebuilds a table to alter it; with foreign keys on, dropping the old `project` would cascade."""
    with session_scope(engine) as session:
        session.add(Project(id="p1", name="Film"))
        session.add(Element(id="e1", project_id="p1", name="Hero", trigger_word="@Hero", type="character"))
    assets.add_for_job(make_asset("job_1", "p1"))
    body = (
        '    with op.batch_alter_table("project", recreate="always") as batch:\n'
        '        batch.add_column(sa.Column("note", sa.String(), nullable=True))\n'
    )
    upgrade(engine, script_location=_migrations_with(tmp_path, body))
    assert revision_of(engine) == NEXT
    assert "note" in {column["name"] for column in inspect(engine).get_columns("project")}
    with session_scope(engine) as session:
        assert session.get(Element, "e1") is not None
    assert assets.for_job("job_1") is not None
    with pytest.raises(IntegrityError), session_scope(engine) as session:  # foreign keys are enforced again
        session.add(Element(project_id="nope", name="X", trigger_word="@X", type="object"))


def test_a_failing_revision_leaves_the_database_as_it_was(tmp_path, engine):
    body = (
        '    op.add_column("job", sa.Column("extra", sa.String(), nullable=True))\n'
        '    raise RuntimeError("the test revision broke")\n'
    )
    with pytest.raises(RuntimeError, match="test revision broke"):
        upgrade(engine, script_location=_migrations_with(tmp_path, body))
    assert revision_of(engine) == HEAD
    assert "extra" not in {column["name"] for column in inspect(engine).get_columns("job")}


# Records.


def test_timestamps_are_utc_aware_and_naive_ones_are_refused(engine, store):
    job = store.create(image_job())
    assert store.get(job.id).created_at.tzinfo == UTC
    with pytest.raises(StatementError, match="timezone-aware"), session_scope(engine) as session:
        session.add(Project(name="naive", created_at=datetime(2025, 1, 1)))


def test_deleting_a_project_removes_its_elements_and_assets(engine, assets):
    with session_scope(engine) as session:
        session.add(Project(id="p1", name="Film"))
        session.add(Element(id="e1", project_id="p1", name="Hero", trigger_word="@Hero", type="character"))
    assets.add_for_job(make_asset("job_1", "p1"))
    with session_scope(engine) as session:
        session.delete(session.get(Project, "p1"))
    with session_scope(engine) as session:
        assert session.exec(select(Element)).all() == []
        assert session.exec(select(Asset)).all() == []


# JobStore transitions.


def test_create_and_get(store):
    request = GenerationRequest(prompt="a cat", mode="inpaint", image="/uploads/i.png", mask="/uploads/m.png", seed=5)
    payload = InpaintJob(project_id="p1", request=request.resolve(TINY))
    job = store.create(payload)
    assert job.id.startswith("job_")
    got = store.get(job.id)
    assert (got.status, got.type, got.project_id, got.seed, got.attempts) == ("pending", "inpaint", "p1", 5, 0)
    assert got.prompt == "a cat" and read_payload(got) == payload and read_payload(got).request.mask == "/uploads/m.png"
    assert store.get("job_missing") is None
    assert store.create(image_job(""), job_id="job_client1").id == "job_client1"
    with pytest.raises(ValueError, match="already taken"):
        store.create(image_job(""), job_id="job_client1")
    with pytest.raises(ValueError, match="job_id"):
        store.create(image_job(""), job_id="../../etc")


def test_start_progress_complete(store):
    job = store.create(image_job(project_id="p1", seed=1234))
    assert store.progress(job.id, 10, "too early") is False  # only while processing
    assert store.start(job.id)
    assert store.start(job.id) is False
    started = store.get(job.id)
    assert (started.status, started.attempts, started.started_at is not None) == ("processing", 1, True)
    assert store.progress(job.id, 50, "Step 2/4")
    assert (store.get(job.id).progress, store.get(job.id).status_message) == (50, "Step 2/4")
    for bad in (-1, 101, 50.5, True):
        with pytest.raises(ValueError, match="progress"):
            store.progress(job.id, bad, "")
    urls = ("/projects/p1/generated/x.jpg", "/projects/p1/thumbnails/x.jpg")
    assert store.complete(job.id, "asset1", *urls, enhanced_prompt="a fluffy cat")
    done = store.get(job.id)
    assert (done.status, done.progress, done.asset_id, done.seed) == ("completed", 100, "asset1", 1234)
    assert (done.enhanced_prompt, done.output_url) == ("a fluffy cat", "/projects/p1/generated/x.jpg")
    assert done.finished_at >= done.started_at >= done.created_at
    # Nothing moves a finished job.
    assert store.complete(job.id, "asset2", None, None) is False
    assert store.progress(job.id, 10, "late") is False
    assert store.fail(job.id, "late") is False
    assert store.mark_cancelled(job.id) is False
    assert store.start(job.id) is False
    assert store.cancel(job.id) == NOT_FOUND_OR_DONE
    assert store.get(job.id).asset_id == "asset1"


def test_fail_from_pending_and_from_processing(store):
    queued = store.create(image_job("a"))
    assert store.fail(queued.id, "reference not found")
    running = running_job(store)
    assert store.fail(running.id, "CUDA out of memory")
    for job_id, message in ((queued.id, "reference not found"), (running.id, "CUDA out of memory")):
        job = store.get(job_id)
        assert (job.status, job.error_message, job.finished_at is not None) == ("failed", message, True)
    assert store.complete(running.id, None, None, None) is False
    assert store.start(queued.id) is False


def test_cancel_a_pending_job_at_once(store):
    job = store.create(image_job("a"))
    assert store.cancel(job.id) == CANCELLED
    assert status_of(store, job.id) == "cancelled"
    assert store.start(job.id) is False  # the worker skips it
    assert store.complete(job.id, "a", None, None) is False
    assert store.cancel(job.id) == NOT_FOUND_OR_DONE
    assert store.cancel("job_unknown") == NOT_FOUND_OR_DONE


def test_cancel_a_running_job_flags_it_until_the_worker_stops(store):
    job = running_job(store)
    assert store.is_cancel_requested(job.id) is False
    assert store.cancel(job.id) == CANCELLING
    assert store.is_cancel_requested(job.id)
    assert status_of(store, job.id) == "processing"
    assert store.progress(job.id, 30, "stopping")  # still processing until the worker notices
    assert store.mark_cancelled(job.id)
    assert status_of(store, job.id) == "cancelled"
    assert store.complete(job.id, "a", None, None) is False  # complete() on a cancelled job does nothing
    assert store.fail(job.id, "x") is False
    assert store.mark_cancelled(job.id) is False
    assert store.get(job.id).asset_id is None


def test_two_workers_starting_the_same_job_one_wins(store):
    jobs = [store.create(image_job(f"job {i}")) for i in range(20)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for job in jobs:
            barrier = threading.Barrier(2)

            def start(job_id=job.id, barrier=barrier) -> bool:
                barrier.wait()
                return store.start(job_id)

            results = [future.result() for future in [pool.submit(start), pool.submit(start)]]
            assert sorted(results) == [False, True]
            assert store.get(job.id).attempts == 1


def test_many_threads_write_without_locking_errors(store):
    """SQLite has one writer at a time: the others wait (busy timeout) rather than fail."""

    def lifecycle(i: int) -> str:
        job = store.create(image_job(f"job {i}", "p1"))
        assert store.start(job.id)
        for percent in (25, 50, 75):
            assert store.progress(job.id, percent, f"{percent}%")
        assert store.complete(job.id, None, None, None)
        return job.id

    with ThreadPoolExecutor(max_workers=8) as pool:
        job_ids = list(pool.map(lifecycle, range(40)))
    assert {status_of(store, job_id) for job_id in job_ids} == {"completed"}


def test_concurrent_complete_and_cancel_agree(store):
    """Whatever the order, the job ends in exactly one terminal state."""
    for _ in range(10):
        job = running_job(store)
        with ThreadPoolExecutor(max_workers=2) as pool:
            completed = pool.submit(store.complete, job.id, "a", None, None)
            cancelled = pool.submit(store.mark_cancelled, job.id)
            assert completed.result() != cancelled.result()
        assert status_of(store, job.id) in TERMINAL


def test_active_and_pending_oldest_first(store):
    first = store.create(image_job("1", "p1"))
    second = store.create(image_job("2", "p2"))
    third = store.create(image_job("3", "p1"))
    done = store.create(image_job("4", "p1"))
    store.start(second.id)
    store.cancel(done.id)
    assert [job.id for job in store.active()] == [first.id, second.id, third.id]
    assert [job.id for job in store.active("p1")] == [first.id, third.id]
    assert [job.id for job in store.pending()] == [first.id, third.id]


def test_recover_after_a_crash(engine, store):
    retry = running_job(store)  # attempt 1: back to the queue
    queued = store.create(image_job("queued"))  # still queued
    exhausted = running_job(store)
    with engine.begin() as connection:  # as if it had crashed the server once already
        connection.execute(update(Job).where(Job.id == exhausted.id).values(attempts=2))
    stopping = running_job(store)
    store.cancel(stopping.id)  # the user asked; the restart finishes the cancel
    flagged = store.create(image_job("flagged"))
    with engine.begin() as connection:
        connection.execute(update(Job).where(Job.id == flagged.id).values(cancel_requested=True))
    finished = running_job(store)
    store.complete(finished.id, "a", None, None)

    requeued = store.recover(max_attempts=2)

    assert [job.id for job in requeued] == [retry.id, queued.id]
    again = store.get(retry.id)
    assert (again.status, again.status_message, again.progress, again.started_at) == (
        "pending",
        REQUEUED_MESSAGE,
        0,
        None,
    )
    failed = store.get(exhausted.id)
    assert (failed.status, failed.error_message) == ("failed", RESTART_FAILED_MESSAGE)
    assert status_of(store, stopping.id) == status_of(store, flagged.id) == "cancelled"
    assert status_of(store, finished.id) == "completed"
    # The re-queued job crashes the server a second time: it fails rather than loop forever.
    assert store.start(retry.id) and store.get(retry.id).attempts == 2
    assert [job.id for job in store.recover(max_attempts=2)] == [queued.id]
    assert status_of(store, retry.id) == JobStatus.FAILED
    with pytest.raises(ValueError, match="max_attempts"):
        store.recover(max_attempts=0)


# One asset per job.


def test_one_asset_per_job(engine, assets):
    first = assets.add_for_job(make_asset("job_1", name="first.jpg"))
    second = assets.add_for_job(make_asset("job_1", name="second.jpg"))  # the job ran again after a crash
    assert second.id == first.id and second.filename == "first.jpg"
    assert assets.for_job("job_1").id == first.id and assets.get(first.id).meta == {"prompt": "a cat", "seed": 7}
    with session_scope(engine) as session:
        assert len(session.exec(select(Asset)).all()) == 1
    with pytest.raises(IntegrityError):  # a different constraint (unknown project) is not swallowed
        assets.add_for_job(make_asset("job_2", project_id="no_such_project"))


def test_complete_with_asset_is_all_or_nothing(engine, store, assets):
    job = running_job(store, seed=9)
    asset = store.complete_with_asset(job.id, make_asset(job.id))
    assert asset is not None and assets.for_job(job.id).id == asset.id
    done = store.get(job.id)
    assert (done.status, done.asset_id, done.output_url, done.seed) == ("completed", asset.id, asset.url, 9)
    assert store.complete_with_asset(job.id, make_asset(job.id, name="again.jpg")) is None

    cancelled = running_job(store)
    store.cancel(cancelled.id)
    store.mark_cancelled(cancelled.id)
    assert store.complete_with_asset(cancelled.id, make_asset(cancelled.id)) is None
    assert assets.for_job(cancelled.id) is None  # no asset left behind

    rerun = running_job(store)  # an earlier run recorded its asset, then the server died
    earlier = assets.add_for_job(make_asset(rerun.id, name="earlier.jpg"))
    assert store.complete_with_asset(rerun.id, make_asset(rerun.id, name="later.jpg")).id == earlier.id
    assert store.get(rerun.id).asset_id == earlier.id
    with pytest.raises(ValueError, match="asset.job_id"):
        store.complete_with_asset(rerun.id, make_asset("job_other"))


def test_completing_a_job_can_make_its_asset_an_elements_picture(engine, store, assets):
    with session_scope(engine) as session:
        session.add(Project(id="p1", name="Film"))
        session.add(Element(id="e1", project_id="p1", name="Hero", trigger_word="@Hero", type="character"))
    job = running_job(store, project_id="p1")
    asset = store.complete_with_asset(job.id, make_asset(job.id, "p1"), enhanced_prompt="a cat, lit", element_id="e1")
    with session_scope(engine) as session:
        assert session.get(Element, "e1").image_path == asset.url
    assert store.get(job.id).enhanced_prompt == "a cat, lit"

    late = running_job(store, project_id="p1")  # cancelled before it could complete: the element keeps its picture
    store.cancel(late.id)
    store.mark_cancelled(late.id)
    assert store.complete_with_asset(late.id, make_asset(late.id, "p1", name="late.jpg"), element_id="e1") is None
    with session_scope(engine) as session:
        assert session.get(Element, "e1").image_path == asset.url
    gone = running_job(store, project_id="p1")  # an element deleted meanwhile: the job still completes
    assert store.complete_with_asset(gone.id, make_asset(gone.id, "p1", name="gone.jpg"), element_id="e_gone")
