"""Storyboard: a project's scenes and shots, as the studio front end saves them.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "scene",
        sa.Column("project_id", sa.String(), nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("script_content", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("project_id", "id"),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"], name="fk_scene_project_id", ondelete="CASCADE"),
    )
    op.create_table(
        "shot",
        sa.Column("project_id", sa.String(), nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("scene_id", sa.String(), nullable=True),
        sa.Column("index", sa.Integer(), nullable=True),
        sa.Column("prompt", sa.String(), nullable=False),
        sa.Column("negative_prompt", sa.String(), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("num_frames", sa.Integer(), nullable=True),
        sa.Column("fps", sa.Integer(), nullable=True),
        sa.Column("cfg_scale", sa.Float(), nullable=True),
        sa.Column("enhance_prompt", sa.Boolean(), nullable=True),
        sa.Column("upscale", sa.Boolean(), nullable=True),
        sa.Column("pipeline_override", sa.String(), nullable=True),
        sa.Column("auto_continue", sa.Boolean(), nullable=True),
        sa.Column("track_index", sa.Integer(), nullable=True),
        sa.Column("start_frame", sa.Integer(), nullable=True),
        sa.Column("trim_in", sa.Integer(), nullable=True),
        sa.Column("trim_out", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(), nullable=True),
        sa.Column("dialogue", sa.String(), nullable=True),
        sa.Column("character", sa.String(), nullable=True),
        sa.Column("shot_type", sa.String(), nullable=True),
        sa.Column("timeline", sa.JSON(), nullable=False),
        sa.Column("matched_elements", sa.JSON(), nullable=True),
        sa.Column("last_job_id", sa.String(), nullable=True),
        sa.Column("thumbnail_url", sa.String(), nullable=True),
        sa.Column("video_url", sa.String(), nullable=True),
        sa.Column("enhanced_prompt_result", sa.String(), nullable=True),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("project_id", "id"),
        sa.ForeignKeyConstraint(["project_id"], ["project.id"], name="fk_shot_project_id", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(
            ["project_id", "scene_id"], ["scene.project_id", "scene.id"], name="fk_shot_scene", ondelete="CASCADE"
        ),  # fmt: skip
    )


def downgrade() -> None:
    op.drop_table("shot")
    op.drop_table("scene")
