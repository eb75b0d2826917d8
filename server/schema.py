"""The coordinator's operational tables (SQLAlchemy Core), the system of record.

Alembic migrations in server/migrations/versions create exactly these tables; a
test compares the migrated database with this metadata so the two never drift.
Times are epoch seconds (double precision) so SQLite and PostgreSQL agree and
the wire format (JobInfo, DeviceInfo) needs no conversion.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String(512), primary_key=True),
    sa.Column("node_id", sa.BigInteger, nullable=False, unique=True),
    sa.Column("description", sa.LargeBinary, nullable=False),
    sa.Column("media_type", sa.String(64), nullable=False),
    sa.Column("registered_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
    sa.Column("last_seen", sa.Double, nullable=True),
    sa.Column("online", sa.Boolean, nullable=False, server_default=sa.false()),
    # Ed25519 public key (32 bytes); NULL until an agent claims a device created another way
    # (an admin's PUT /things, or a database from before device keys).
    sa.Column("public_key", sa.LargeBinary, nullable=True),
    # Highest Register sequence number accepted with that key (replay protection).
    sa.Column("register_seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("enrollment_id", sa.String(32), nullable=True),
    sa.Column("revoked_at", sa.Double, nullable=True),
    sa.Column("revoked_reason", sa.Text, nullable=False, server_default=""),
    # What the device's agent said it runs in its last Hello ("" if it did not say).
    sa.Column("agent_version", sa.String(64), nullable=False, server_default=""),
    # Register looks a caller's key up before validating its description (admission pre-check).
    sa.Index("ix_devices_public_key", "public_key"),
)

enrollments = sa.Table(
    "enrollments",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    # sha256 of the token: it has 256 bits of entropy, so a slow hash would add nothing.
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("label", sa.String(200), nullable=False, server_default=""),
    sa.Column("uses_total", sa.Integer, nullable=False),
    sa.Column("uses_left", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=False),
    sa.Column("revoked_at", sa.Double, nullable=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("strategy", sa.String(300), nullable=False),
    sa.Column("spec_toml", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=True),
    sa.Column("finished_at", sa.Double, nullable=True),
    sa.Column("rounds_total", sa.Integer, nullable=False),
    sa.Column("rounds_done", sa.Integer, nullable=False, server_default="0"),
    sa.Column("strategy_state", sa.JSON, nullable=True),
)

rounds = sa.Table(
    "rounds",
    metadata,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
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
    sa.Column("artifact_sha", sa.String(64), sa.ForeignKey("artifacts.sha256"), nullable=True),
    # Why the round kept the model instead of aggregating one ("" when it aggregated).
    sa.Column("train_error", sa.Text, nullable=False, server_default=""),
    # Why the round has no evaluation metrics though it asked for some ("" otherwise).
    sa.Column("eval_error", sa.Text, nullable=False, server_default=""),
)

node_results = sa.Table(
    "node_results",
    metadata,
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
    sa.Index("ix_node_results_job_round", "job_id", "round"),
)

artifacts = sa.Table(
    "artifacts",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("encoding", sa.String(64), nullable=False),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
    sa.Column("round", sa.Integer, nullable=True),
    sa.Column("parent_sha", sa.String(64), nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("subject", sa.String(512), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

imported_documents = sa.Table(
    "imported_documents",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(512), nullable=False, unique=True),
    sa.Column("base_iri", sa.Text, nullable=False),
    sa.Column("media_type", sa.String(64), nullable=False),
    sa.Column("content", sa.LargeBinary, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("imported_at", sa.Double, nullable=False),
)
