"""Alembic revisions shipped in the package: empty database → head on SQLite and PostgreSQL, equal to the ORM."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from sdl.repository import Store
from sdl.repository.schema import Base
from sdl.repository.store import alembic_config

EXPECTED_TABLES = {
    "campaigns", "materials", "experiments", "samples", "measurements", "bluesky_runs",
    "bluesky_documents", "model_versions", "events", "campaign_leases", "sdl_alembic_version",
    "campaign_controls", "approvals", "computed_values",
}


def test_empty_database_upgrades_to_head_matching_the_orm(database_url: str) -> None:
    store = Store.from_url(database_url)
    assert store.current_revision() is None
    store.upgrade()
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None and store.current_revision() == head
    store.upgrade()  # idempotent
    assert store.current_revision() == head
    with store.engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == EXPECTED_TABLES
        ctx = MigrationContext.configure(
            conn, opts={"version_table": "sdl_alembic_version", "compare_type": True,
                        "compare_server_default": True}
        )
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"ORM and migrations differ: {diff}"
    store.close()


def test_json_columns_are_jsonb_on_postgresql(fresh_postgres_url: str) -> None:
    store = Store.from_url(fresh_postgres_url, create=True)
    with store.engine.connect() as conn:
        types = {c["name"]: str(c["type"]) for c in sa.inspect(conn).get_columns("experiments")}
        assert types["params"] == "JSONB" and types["proposed_at"].startswith("TIMESTAMP")
    store.close()


def test_downgrade_to_base_then_upgrade_again(sqlite_url: str) -> None:
    from alembic import command

    store = Store.from_url(sqlite_url, create=True)
    with store.engine.connect() as conn:
        command.downgrade(alembic_config(conn), "base")
        conn.commit()
    with store.engine.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"sdl_alembic_version"}
    store.upgrade()
    assert store.get_campaign("x") is None
    store.close()


def test_migrations_are_found_without_an_ini_in_the_working_directory(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # type: ignore[arg-type]
    store = Store.from_url("sqlite:///relative/sdl.db", create=True)
    assert store.current_revision() is not None
    store.close()


def test_0001_database_with_data_upgrades_to_0002_and_back(database_url: str) -> None:
    """A repository made before leases existed keeps its campaigns through 0002 and its downgrade."""
    from alembic import command

    store = Store.from_url(database_url)
    store.upgrade("0001")
    assert store.current_revision() == "0001"
    with store.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO campaigns (name, description, config_snapshot, config_hash, state, created_at, updated_at) "
            "VALUES ('old', '', '{}', 'h', 'running', :t, :t)"), {"t": "2026-11-30 10:00:00"})
    store.upgrade("0002")
    assert store.current_revision() == "0002"
    campaign = store.get_campaign("old")
    assert campaign is not None
    token = store.acquire_lease(campaign.id, holder="test", host="h", pid=1)
    assert store.lease(campaign.id) is not None and token
    with store.engine.connect() as conn:
        command.downgrade(alembic_config(conn), "0001")
        conn.commit()
    assert store.current_revision() == "0001"
    with store.engine.connect() as conn:
        assert "campaign_leases" not in sa.inspect(conn).get_table_names()
    assert store.get_campaign("old") is not None
    store.close()
