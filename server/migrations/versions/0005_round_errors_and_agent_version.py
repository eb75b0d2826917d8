"""Rounds say why they kept the model or have no evaluation (train_error, eval_error), and
devices remember the agent version their last Hello named.

Before this, an evaluate phase that failed was only logged, and a round whose aggregation
could not weigh its replies failed the job with a bare ZeroDivisionError.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("train_error", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("eval_error", sa.Text, nullable=False, server_default=""))
    with op.batch_alter_table("devices") as batch:
        batch.add_column(sa.Column("agent_version", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        batch.drop_column("agent_version")
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("eval_error")
        batch.drop_column("train_error")
