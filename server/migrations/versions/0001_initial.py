"""Initial schema: devices, jobs, rounds, node results, artifacts, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(512), primary_key=True),
        sa.Column("node_id", sa.BigInteger, nullable=False, unique=True),
        sa.Column("credential_hash", sa.String(128), nullable=False),
        sa.Column("description", sa.LargeBinary, nullable=False),
        sa.Column("media_type", sa.String(64), nullable=False),
        sa.Column("registered_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("last_seen", sa.Double, nullable=True),
        sa.Column("online", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("strategy", sa.String(300), nullable=False),
        sa.Column("spec_toml", sa.Text, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double, nullable=True),
        sa.Column("finished_at", sa.Double, nullable=True),
        sa.Column("rounds_total", sa.Integer, nullable=False),
        sa.Column("rounds_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("strategy_state", sa.JSON, nullable=True),
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("encoding", sa.String(64), nullable=False),
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True
        ),
        sa.Column("round", sa.Integer, nullable=True),
        sa.Column("parent_sha", sa.String(64), nullable=True),
        sa.Column("created_at", sa.Double, nullable=False),
    )
    op.create_table(
        "rounds",
        sa.Column(
            "job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("round", sa.Integer, primary_key=True),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("finished_at", sa.Double, nullable=False),
        sa.Column("participants", sa.Integer, nullable=False),
        sa.Column("dropped", sa.Integer, nullable=False),
        sa.Column("train_metrics", sa.JSON, nullable=True),
        sa.Column("eval_metrics", sa.JSON, nullable=True),
        sa.Column("bytes_down", sa.BigInteger, nullable=False),
        sa.Column("bytes_up", sa.BigInteger, nullable=False),
        sa.Column("duration_s", sa.Double, nullable=False),
        sa.Column("train_duration_s", sa.Double, nullable=False),
        sa.Column("eval_duration_s", sa.Double, nullable=False),
        sa.Column(
            "artifact_sha", sa.String(64), sa.ForeignKey("artifacts.sha256"), nullable=True
        ),
    )
    op.create_table(
        "node_results",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("node_id", sa.BigInteger, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text, nullable=False, server_default=""),
        sa.Column("bytes_down", sa.BigInteger, nullable=False),
        sa.Column("bytes_up", sa.BigInteger, nullable=False),
        sa.Column("compute_s", sa.Double, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id", "round"], ["rounds.job_id", "rounds.round"], ondelete="CASCADE"
        ),
    )
    op.create_index("ix_node_results_job_round", "node_results", ["job_id", "round"])
    op.create_table(
        "outbox",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("subject", sa.String(512), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_index("ix_node_results_job_round", table_name="node_results")
    op.drop_table("node_results")
    op.drop_table("rounds")
    op.drop_table("artifacts")
    op.drop_index("ix_jobs_state", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("devices")
