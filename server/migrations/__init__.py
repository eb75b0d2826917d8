"""Alembic migrations of the coordinator's SQL schema, shipped inside the package.

The daemon runs them programmatically at start (tinyfleet.server.database.upgrade),
so users need no alembic.ini. A new revision goes in versions/ with the next id
and `down_revision` pointing at the previous one.
"""
