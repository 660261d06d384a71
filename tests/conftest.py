"""Shared fixtures: isolated Prefect home, real SQLite and PostgreSQL databases.

PostgreSQL: tests marked ``postgres`` get a brand-new database on the server named by
``SDL_TEST_POSTGRES_URL`` (default: the CI server ``postgresql+psycopg://postgres@127.0.0.1:5432/test``),
created for the test session and dropped at its end. When the server cannot be reached the
tests *fail* under CI (``CI`` set) and are skipped with a visible reason elsewhere. Every database,
port and temporary folder is the test's own, so that ``make test`` can run the modules on two
pytest-xdist workers at once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from sdl.repository import Store

# Isolate Prefect before anything imports it: no ~/.prefect, no telemetry.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="sdl-test-prefect-"))
# Under pytest-xdist (`make test`) the workers inherit the controller's environment: each gets a
# Prefect home of its own, so that two ephemeral API servers never share one SQLite database.
# The embedding cache below stays shared on purpose (WAL, built for several processes).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if XDIST_WORKER:
    os.environ["PREFECT_HOME"] = os.path.join(os.environ["PREFECT_HOME"], XDIST_WORKER)
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The task-run recorder of the test servers: big batches and a 1 s flush, so that a test reading
# task runs right after a flow waits seconds, not minutes, and SQLite behind it is not "locked".
os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE", "200")
os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE", "200")
os.environ.setdefault("PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL", "1")
# One embedding cache for the session (the demo pool featurises once), never the user's ~/.cache.
os.environ.setdefault("SDL_EMBEDDING_CACHE", os.path.join(tempfile.mkdtemp(prefix="sdl-test-emb-"), "emb.sqlite"))

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules that hold a ``slow`` test first (in collection order otherwise).

    Only under pytest-xdist (``TEST_WORKERS=2 make test``: ``--dist loadfile``) where a worker takes the
    next module when it runs dry: the long ones then start early instead of ending the run alone.
    """
    if not items or not items[0].config.getoption("numprocesses", None):
        return  # one process (the default): the modules in their usual order
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow)


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """One Prefect test server per module (about 10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """URL of the PostgreSQL maintenance database; fails under CI when unreachable."""
    import sqlalchemy as sa

    url = os.environ.get("SDL_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "unreachable"
        message = f"PostgreSQL at {url} is unreachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return url


@contextlib.contextmanager
def _temporary_database(server_url: str) -> Iterator[str]:
    """Create an empty PostgreSQL database next to ``server_url``'s, yield its URL, then drop it."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    name = f"sdl_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test session (dropped afterwards)."""
    with _temporary_database(postgres_server_url) as url:
        yield url


@pytest.fixture
def fresh_postgres_url(postgres_server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one test (for tests that need an empty schema)."""
    with _temporary_database(postgres_server_url) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for one test."""
    return f"sqlite:///{tmp_path / 'sdl.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using this runs twice: on a fresh SQLite file and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sdl.db'}"
    return request.getfixturevalue("fresh_postgres_url")


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A migrated repository on ``database_url`` (SQLite and PostgreSQL), closed after the test."""
    from sdl.repository import Store  # after the environment above is set

    s = Store.from_url(database_url, create=True)
    yield s
    s.close()
