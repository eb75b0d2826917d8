"""Index devices by public key: Register checks whether a caller's key is already a device's
before it spends time validating the description (an unknown caller is refused first).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_devices_public_key", "devices", ["public_key"])


def downgrade() -> None:
    op.drop_index("ix_devices_public_key", table_name="devices")
