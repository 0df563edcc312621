"""The studio's database records (SQLModel tables): Project, Scene, Shot, Element, Asset, Job.

The fields keep the studio contract (spec §1.7) and add what it lacked: `Job.asset_id`, `Job.seed`, `Job.params`
(the job's typed payload, as JSON), queued/started/finished times, and the attempt count and cancel flag that
crash recovery needs.
Schema changes go through a migration in `migrations/versions/` (see `flux2.studio.db.upgrade`).

Only `flux2.studio.jobs_store.JobStore` changes Job rows. Timestamps are timezone-aware UTC.
"""

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKeyConstraint, UniqueConstraint
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, Relationship, SQLModel

ELEMENT_TYPES = ("character", "location", "object")
ASSET_TYPES = ("image", "video")


class JobStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = frozenset({JobStatus.PENDING, JobStatus.PROCESSING})
TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def new_job_id(prefix: str = "job") -> str:
    """`job_` and 12 hex digits: short enough to read in a log, and unlikely to collide (48 random bits)."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database: SQLite stores naive text, so it is stored as UTC and read
    back with the UTC zone attached. Naive datetimes are refused rather than guessed."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamps must be timezone-aware (UTC), got the naive datetime {value!r}")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Project(SQLModel, table=True):
    id: str = Field(default_factory=new_id, primary_key=True)
    name: str
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime, sa_column_kwargs={"onupdate": utcnow})
    resolution_w: int = 768
    resolution_h: int = 512
    fps: int = 25
    seed: int = 42
    script_content: str | None = None


class Scene(SQLModel, table=True):
    """A scene of a project's storyboard. Its id is the client's (a safe id string), unique within the project."""

    __table_args__ = (
        ForeignKeyConstraint(["project_id"], ["project.id"], name="fk_scene_project_id", ondelete="CASCADE"),
    )

    project_id: str = Field(primary_key=True)
    id: str = Field(primary_key=True)
    index: int = 0  # the scene's place in the script
    name: str = ""
    script_content: str | None = None  # the part of the script it covers

    project: Project | None = Relationship()  # as Element.project


class Shot(SQLModel, table=True):
    """A shot of a project, as the studio front end saves it (whole, with `PUT /projects/{id}`). Its id is the
    client's, unique within the project; `position` keeps the order of the project's flat list of shots, `index`
    the order within its scene. Fields the front end sends that have no column here are kept in `extra`, so a
    save and a load give back what was sent."""

    __table_args__ = (
        ForeignKeyConstraint(["project_id"], ["project.id"], name="fk_shot_project_id", ondelete="CASCADE"),
        # Both columns: a shot's scene is one of its own project's scenes.
        ForeignKeyConstraint(
            ["project_id", "scene_id"], ["scene.project_id", "scene.id"], name="fk_shot_scene", ondelete="CASCADE"
        ),  # fmt: skip
    )

    project_id: str = Field(primary_key=True)
    id: str = Field(primary_key=True)
    position: int = 0
    scene_id: str | None = None
    index: int | None = None
    prompt: str = ""
    negative_prompt: str | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    cfg_scale: float | None = None
    enhance_prompt: bool | None = None
    upscale: bool | None = None
    pipeline_override: str | None = None
    auto_continue: bool | None = None
    track_index: int | None = None
    start_frame: int | None = None
    trim_in: int | None = None
    trim_out: int | None = None
    action: str | None = None
    dialogue: str | None = None
    character: str | None = None
    shot_type: str | None = None
    timeline: list[Any] = Field(default_factory=list, sa_type=JSON)  # conditioning items [{type, path, ...}]
    matched_elements: Any = Field(default=None, sa_type=JSON, nullable=True)  # as the client sent it
    last_job_id: str | None = None
    thumbnail_url: str | None = None  # its storyboard picture: a thumbnail job writes it
    video_url: str | None = None
    enhanced_prompt_result: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # the client's other fields

    project: Project | None = Relationship()  # as Element.project


class Element(SQLModel, table=True):
    """A character, location or object of a project, referenced in prompts by its trigger word."""

    __table_args__ = (
        ForeignKeyConstraint(["project_id"], ["project.id"], name="fk_element_project_id", ondelete="CASCADE"),
    )

    id: str = Field(default_factory=new_id, primary_key=True)
    project_id: str = Field(index=True)
    name: str
    trigger_word: str  # e.g. "@Hero"; resolved within the element's project only
    type: str  # one of ELEMENT_TYPES
    description: str = ""
    image_path: str | None = None  # a web URL: /projects/{pid}/assets/elements/...
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)

    # Many-to-one, so that a session flushes a new project before its elements; deletes cascade in the database.
    project: Project | None = Relationship()


class Asset(SQLModel, table=True):
    """A media file the studio made or received. A job yields at most one asset (`job_id` is unique), so a job
    that runs twice after a crash cannot leave two."""

    __table_args__ = (
        ForeignKeyConstraint(["project_id"], ["project.id"], name="fk_asset_project_id", ondelete="CASCADE"),
        UniqueConstraint("job_id", name="uq_asset_job_id"),
    )

    id: str = Field(default_factory=new_id, primary_key=True)
    project_id: str | None = Field(default=None, index=True)
    job_id: str | None = None
    type: str  # one of ASSET_TYPES
    path: str  # relative to the data folder
    url: str  # web URL
    thumbnail_url: str | None = None
    filename: str
    width: int
    height: int
    duration: float | None = None  # seconds, for videos
    meta: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # prompt, seed, steps, guidance, references...
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)

    project: Project | None = Relationship()  # as Element.project


class Job(SQLModel, table=True):
    """A unit of model work. Its status moves pending → processing → completed | failed | cancelled (pending may
    also go straight to failed or cancelled), and only through `JobStore`."""

    id: str = Field(default_factory=new_job_id, primary_key=True)
    project_id: str | None = Field(default=None, index=True)  # not a foreign key: jobs outlive their project
    type: str  # one of flux2.studio.tasks.JOB_TYPES
    status: str = Field(default=JobStatus.PENDING.value, index=True)
    progress: int = 0  # 0-100
    status_message: str = ""
    error_message: str | None = None
    prompt: str = ""
    params: dict[str, Any] = Field(default_factory=dict, sa_type=JSON)  # its payload (flux2.studio.payloads)
    seed: int | None = None  # the seed it runs with, drawn when it was queued
    asset_id: str | None = None
    output_url: str | None = None
    thumbnail_url: str | None = None
    enhanced_prompt: str | None = None
    attempts: int = 0  # times a worker started it; bounds re-queueing after crashes
    cancel_requested: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)  # queued
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
