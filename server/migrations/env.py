"""Alembic environment: always online, on the connection the daemon hands over.

`tinyfleet.server.database.upgrade` puts an open SQLAlchemy connection in
`config.attributes["connection"]`; there is no URL or ini file to read.
"""

from __future__ import annotations

from alembic import context

from tinyfleet.server.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through tinyfleet.server.database.upgrade(engine)")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
