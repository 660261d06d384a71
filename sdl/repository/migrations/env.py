"""Alembic environment of the knowledge repository, run programmatically by ``Store.upgrade()``.

No ``alembic.ini`` is needed: :func:`sdl.repository.store.alembic_config` builds the config in
code and hands over an open connection in ``config.attributes["connection"]``. Concurrent
upgrades are serialised (a PostgreSQL advisory lock; ``BEGIN IMMEDIATE`` on SQLite), so two
processes starting on an empty database do not both create the tables.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from sdl.repository.schema import Base

VERSION_TABLE = "sdl_alembic_version"
_ADVISORY_LOCK_ID = 7_351_002  # arbitrary, constant: "sdl schema upgrade"


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the revisions on the connection given by the caller, or on the configured URL."""
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url given to the sdl migration environment")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported; run `sdl db upgrade`")
run_migrations_online()
