"""Device keys instead of bearer credentials; enrollment tokens; device revocation.

Devices registered before this revision keep their rows but lose their credential
hash and have no key yet: their agents claim them at the next registration with
an enrollment token (or the admin token), which binds the key they present.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("credential_hash")
        batch.add_column(sa.Column("public_key", sa.LargeBinary, nullable=True))
        batch.add_column(sa.Column("register_seq", sa.BigInteger, nullable=False, server_default="0"))
        batch.add_column(sa.Column("enrollment_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("revoked_at", sa.Double, nullable=True))
        batch.add_column(sa.Column("revoked_reason", sa.Text, nullable=False, server_default=""))
    op.create_table(
        "enrollments",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("label", sa.String(200), nullable=False, server_default=""),
        sa.Column("uses_total", sa.Integer, nullable=False),
        sa.Column("uses_left", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double, nullable=False),
        sa.Column("revoked_at", sa.Double, nullable=True),
    )


def downgrade() -> None:
    """Back to credentials: no device has one any more (agents re-register with the admin token)."""
    op.drop_table("enrollments")
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("revoked_reason")
        batch.drop_column("revoked_at")
        batch.drop_column("enrollment_id")
        batch.drop_column("register_seq")
        batch.drop_column("public_key")
        batch.add_column(sa.Column("credential_hash", sa.String(128), nullable=False, server_default=""))
