"""Alembic's environment for the coordinator's database: run on the connection Seshu hands over."""

from __future__ import annotations

from alembic import context

from seshu.federation.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
