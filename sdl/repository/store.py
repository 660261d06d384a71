"""``Store``: the one door to the knowledge repository.

Why it looks like this:

* Sessions are short: every public method opens a session, does one thing in one committed
  transaction and closes it, so a ``kill -9`` at any moment leaves the database in a state that a
  restarted campaign can read back (issue 5's crash-safe resume).
* Every experiment or campaign state change is that one transaction *plus* one row in the
  append-only ``events`` table, and is checked against :data:`TRANSITIONS`.
* ``propose_experiment`` is idempotent on its key: a repeated key returns the existing row.
* Queries return frozen dataclasses or plain dicts, never live ORM objects, so callers cannot
  lazily load from a closed session or mutate rows behind the store's back.
* SQLite connections get WAL mode, foreign keys and a busy timeout, and take the write lock at
  ``BEGIN`` (``BEGIN IMMEDIATE``), so concurrent writers wait instead of failing on a lock
  upgrade. PostgreSQL goes through the same code from a ``postgresql+psycopg://`` URL.
* One runner per campaign: :meth:`Store.acquire_lease` is a compare-and-set on the
  ``campaign_leases`` row, kept alive by :class:`CampaignLease`'s heartbeat thread.
* A campaign name means one configuration: rerunning it with another one raises
  :class:`CampaignConfigChanged` unless the caller says ``amend=True``.
* Materials are one row per crystal across campaigns: pymatgen's ``StructureMatcher`` decides,
  within the bucket of the same reduced formula (parsed structures cached per ``Store``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sdl.exceptions import IllegalTransition, RepositoryError
from sdl.repository.schema import (
    CAMPAIGN_STATES,
    EXPERIMENT_STATES,
    FAILURE_KINDS,
    BlueskyDocument,
    BlueskyRun,
    Campaign,
    Event,
    Experiment,
    Lease,
    Material,
    Measurement,
    ModelVersion,
    Sample,
    utcnow,
)

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = [
    "Store",
    "CampaignLocked",
    "CampaignConfigChanged",
    "CampaignLease",
    "ResultRefused",
    "hold_lease",
    "config_differences",
    "ABSENT",
    "LeaseRecord",
    "MaterialMeasurementRecord",
    "TRANSITIONS",
    "PROVENANCE_KEYS",
    "SAMPLE_STATES",
    "CampaignRecord",
    "MaterialRecord",
    "ExperimentRecord",
    "SampleRecord",
    "MeasurementRecord",
    "RunRecord",
    "DocumentRecord",
    "ModelVersionRecord",
    "EventRecord",
    "ObservationRecord",
    "BestRecord",
    "HandOutcome",
    "HandResult",
    "alembic_config",
    "to_jsonable",
]

logger = logging.getLogger(__name__)

TRANSITIONS: dict[str, frozenset[str]] = {
    "proposed": frozenset({"running", "abandoned"}),
    "running": frozenset({"completed", "failed", "abandoned"}),
    "completed": frozenset(),
    "failed": frozenset(),
    "abandoned": frozenset(),
}
"""The experiment state machine: the only allowed ``from → to`` changes."""

PROVENANCE_KEYS = (
    "model_version_id",
    "model_version",
    "acquisition_value",
    "predicted_mean",
    "predicted_std",
    "batch_id",
)
"""Provenance keys stored in their own columns; any other key goes to ``provenance_extra``."""

SAMPLE_STATES = ("created", "synthesized", "measured", "lost")

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


MATERIAL_LOCK_NAMESPACE = "sdl.material:"
"""Prefix of the PostgreSQL advisory-lock key that serialises new materials of one formula."""


# --------------------------------------------------------------------------- errors


class CampaignLocked(RepositoryError):
    """Another live process runs this campaign (or took over this runner's lease).

    ``str(err)`` is one line naming the campaign, the holder, its host and pid and since when.

    Args:
        message: The one-line explanation.
        campaign: The campaign's name.
        holder: What holds the lease now (e.g. ``sdl run``), None if nobody does.
        host: The holder's host name.
        pid: The holder's process id.
        since: When the holder took the lease (UTC).
    """

    def __init__(
        self,
        message: str,
        *,
        campaign: str,
        holder: str | None = None,
        host: str | None = None,
        pid: int | None = None,
        since: dt.datetime | None = None,
    ) -> None:
        super().__init__(message)
        self.campaign = campaign
        self.holder = holder
        self.host = host
        self.pid = pid
        self.since = since


class CampaignConfigChanged(RepositoryError):
    """A campaign name was reused with another configuration and the caller did not ask to amend it.

    Args:
        message: The one-line explanation, listing the changed fields.
        campaign: The campaign's name.
        differences: ``(dotted path, old, new)`` per changed leaf, from :func:`config_differences`.
    """

    def __init__(self, message: str, *, campaign: str, differences: Sequence[tuple[str, object, object]]) -> None:
        super().__init__(message)
        self.campaign = campaign
        self.differences = list(differences)


class ResultRefused(RepositoryError):
    """A told result would overwrite a completed experiment (without ``amend``) or contradict an
    ended one (failed, abandoned): refused, nothing written."""


# --------------------------------------------------------------------------- config differences


class _Absent:
    """The value of a key one side of a comparison does not have (prints as ``<absent>``)."""

    _instance: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<absent>"

    __str__ = __repr__


ABSENT: Final = _Absent()
"""Stands for a missing key in :func:`config_differences` (JSON: the string ``"<absent>"``)."""

MAX_DIFFERENCES_SHOWN = 6
MAX_VALUE_CHARS = 40


def _is_sequence(value: object) -> bool:
    return isinstance(value, (list, tuple))


def _collect_differences(old: object, new: object, path: str, out: list[tuple[str, object, object]]) -> None:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append((sub, ABSENT, new[key]))
            elif key not in new:
                out.append((sub, old[key], ABSENT))
            else:
                _collect_differences(old[key], new[key], sub, out)
    elif _is_sequence(old) and _is_sequence(new):
        assert isinstance(old, (list, tuple)) and isinstance(new, (list, tuple))
        for i in range(max(len(old), len(new))):
            sub = f"{path}[{i}]"
            if i >= len(old):
                out.append((sub, ABSENT, new[i]))
            elif i >= len(new):
                out.append((sub, old[i], ABSENT))
            else:
                _collect_differences(old[i], new[i], sub, out)
    elif old != new or isinstance(old, bool) != isinstance(new, bool):
        out.append((path or "<root>", old, new))


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, object, object]]:
    """Every changed leaf between two config snapshots, as ``(dotted path, old, new)``.

    Nested mappings give dotted paths (``budget.experiments``), lists are compared by index
    (``instruments[1].name``), a key only one side has is shown with :data:`ABSENT` on the other.
    Paths come sorted, so the same two configs always give the same list.
    """
    out: list[tuple[str, object, object]] = []
    _collect_differences(old, new, "", out)
    return out


def _show(value: object) -> str:
    if value is ABSENT:
        return "<absent>"
    text = json.dumps(to_jsonable(value), ensure_ascii=False, separators=(", ", ": "))
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _config_changed_message(
    name: str, differences: Sequence[tuple[str, object, object]], old_hash: str, new_hash: str
) -> str:
    if differences:
        shown = [f"{path} {_show(a)} → {_show(b)}" for path, a, b in differences[:MAX_DIFFERENCES_SHOWN]]
        if len(differences) > MAX_DIFFERENCES_SHOWN:
            shown.append(f"and {len(differences) - MAX_DIFFERENCES_SHOWN} more")
        what = ": " + ", ".join(shown)
    else:  # the snapshots agree but the hashes do not (e.g. a new hashing rule)
        what = f" (config hash {old_hash[:12]} → {new_hash[:12]})"
    return (
        f"campaign {name!r} already exists with a different configuration{what}; "
        "rerun with --amend to change it, or give the campaign a new name"
    )


# --------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True)
class CampaignRecord:
    """A campaign row."""

    id: int
    name: str
    description: str
    config_snapshot: dict[str, Any]
    config_hash: str
    code_version: str | None
    seed: int | None
    budget: int | None
    state: str
    created_at: dt.datetime
    updated_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class MaterialRecord:
    """A material row (``structure`` is pymatgen JSON, ``cif`` CIF text, either may be None)."""

    id: int
    canonical_key: str
    formula: str | None
    structure: dict[str, Any] | None
    cif: str | None
    params: dict[str, Any] | None
    source_id: str | None
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class ExperimentRecord:
    """An experiment row with its proposal provenance."""

    id: int
    campaign_id: int
    material_id: int | None
    candidate_key: str
    params: dict[str, Any]
    state: str
    idempotency_key: str
    model_version_id: int | None
    model_version: str | None
    acquisition_value: float | None
    predicted_mean: float | None
    predicted_std: float | None
    batch_id: str | None
    provenance_extra: dict[str, Any] | None
    instruments: list[str] | None
    failure_kind: str | None
    failure_reason: str | None
    proposed_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """A sample row."""

    id: int
    experiment_id: int
    instrument: str
    sample_uid: str
    state: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class MeasurementRecord:
    """A measurement row, plus the campaign and candidate it belongs to (for cross-campaign use)."""

    id: int
    experiment_id: int
    sample_id: int | None
    property: str
    value: float
    unit: str | None
    uncertainty: float | None
    instrument: str | None
    timestamp: dt.datetime
    quality: str
    run_uid: str | None
    event_uid: str | None
    campaign_id: int
    candidate_key: str


@dataclasses.dataclass(frozen=True)
class MaterialMeasurementRecord:
    """One measurement of a material, from whichever campaign made it (for cross-campaign use)."""

    measurement_id: int
    material_id: int
    campaign_id: int
    campaign: str
    experiment_id: int
    sample_id: int | None
    sample_uid: str | None
    property: str
    value: float
    unit: str | None
    uncertainty: float | None
    quality: str
    instrument: str | None
    timestamp: dt.datetime
    run_uid: str | None


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """Who runs a campaign now: the lease row (``heartbeat_at`` is the last sign of life)."""

    campaign_id: int
    token: str
    holder: str
    host: str
    pid: int
    acquired_at: dt.datetime
    heartbeat_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A Bluesky run row."""

    uid: str
    experiment_id: int | None
    plan_name: str | None
    exit_status: str | None
    reason: str | None
    start_time: dt.datetime
    stop_time: dt.datetime | None


@dataclasses.dataclass(frozen=True)
class DocumentRecord:
    """A stored Bluesky document."""

    id: int
    run_uid: str | None
    name: str
    sequence: int
    doc_uid: str | None
    document: dict[str, Any]
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class ModelVersionRecord:
    """A model version row."""

    id: int
    campaign_id: int
    model: str
    version: int
    n_train: int
    metrics: dict[str, Any]
    info: dict[str, Any]
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class EventRecord:
    """An event-log row."""

    id: int
    ts: dt.datetime
    campaign_id: int | None
    experiment_id: int | None
    kind: str
    level: str
    message: str
    payload: dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class ObservationRecord:
    """What the engine learns from: one completed experiment and the mean of its ok values."""

    experiment_id: int
    candidate_key: str
    params: dict[str, Any]
    value: float
    n_measurements: int


@dataclasses.dataclass(frozen=True)
class HandResult:
    """One result a person tells (``sdl tell``): a value, or the reason the synthesis failed.

    ``origin`` says where it came from (``results.csv line 3``) so that an error can name it.
    With several objectives ``values`` holds one value per property told (``value`` is then None).
    """

    experiment_id: int
    value: float | None = None
    failed: str | None = None
    origin: str = ""
    values: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def told(self, property: str) -> dict[str, float]:  # noqa: A002 - the domain's word
        """Property -> value told (``value`` is ``property``'s); empty for a failure."""
        if self.values:
            return dict(self.values)
        return {} if self.value is None else {property: self.value}


@dataclasses.dataclass(frozen=True)
class HandOutcome:
    """What :meth:`Store.record_hand_results` did to one experiment (``amended``: the old values).

    ``value`` and ``amended`` are of the campaign's first property; ``values`` and ``superseded``
    of every property told (several objectives), empty otherwise.
    """

    experiment_id: int
    candidate_key: str
    state: str
    value: float | None
    failed: str | None
    amended: list[float]
    values: Mapping[str, float] = dataclasses.field(default_factory=dict)
    superseded: Mapping[str, list[float]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class BestRecord:
    """The best completed experiment of a campaign for one property and goal."""

    experiment_id: int
    candidate_key: str
    params: dict[str, Any]
    value: float
    utility: float


def _record(cls: type, row: Any, **extra: Any) -> Any:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in extra]
    return cls(**{n: getattr(row, n) for n in names}, **extra)


# --------------------------------------------------------------------------- JSON


def to_jsonable(value: Any) -> Any:
    """Plain JSON data from documents and configs (numpy scalars/arrays, tuples, datetimes, paths).

    Non-finite floats become ``None``: PostgreSQL's JSONB has no NaN and both backends must
    store the same thing.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    if callable(tolist):
        return to_jsonable(tolist())
    return str(value)


def _json_dumps(value: Any) -> str:
    return json.dumps(to_jsonable(value), allow_nan=False, separators=(",", ":"))


# --------------------------------------------------------------------------- engine


def _configure_sqlite(engine: sa.Engine) -> None:
    """WAL, foreign keys and a busy timeout on every connection; the write lock taken at BEGIN."""

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy's BEGIN below be the only one
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def _make_engine(url: str) -> sa.Engine:
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise RepositoryError(f"invalid database URL {url!r}: {exc}") from exc
    if parsed.drivername in ("postgresql", "postgres"):  # psycopg 3 is the driver we ship, not psycopg2
        parsed = parsed.set(drivername="postgresql+psycopg")
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "future": True}
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (SQLAlchemyError, ImportError) as exc:
        raise RepositoryError(f"cannot open database {parsed.render_as_string(hide_password=True)}: {exc}") from exc
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def alembic_config(connection: sa.Connection | None = None, url: str | None = None) -> Any:
    """An Alembic ``Config`` for the packaged migrations (no ``alembic.ini`` needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


# --------------------------------------------------------------------------- leases


def _process_gone(host: str, pid: int) -> bool:
    """Whether ``pid`` ran on this very host and no longer exists (POSIX only; elsewhere: never)."""
    if os.name != "posix" or pid <= 0 or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by someone else
        return False
    return False


def _rowcount(result: object) -> int:
    """Rows an UPDATE or DELETE changed (what the compare-and-set statements check)."""
    return int(result.rowcount or 0) if isinstance(result, sa.CursorResult) else 0


def _iso_z(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- materials


def _advisory_key(formula: str) -> int:
    """A signed 64-bit PostgreSQL advisory-lock key for one formula's new materials."""
    digest = hashlib.sha256((MATERIAL_LOCK_NAMESPACE + formula).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _reduced_formula(formula: str) -> str:
    """``O3SrTi`` → ``SrTiO3`` (pymatgen's reduced formula); an unparsable one as given."""
    from pymatgen.core import Composition

    try:
        return str(Composition(formula).reduced_formula)
    except (ValueError, KeyError) as exc:
        logger.debug("formula %r not parsed (%s): compared as given", formula, exc)
        return formula


def _parse_structure(material_id: int, structure: Mapping[str, Any] | None, cif: str | None) -> Structure | None:
    """A stored material's crystal, from its pymatgen JSON or else its CIF; None if unreadable."""
    from pymatgen.core import Structure

    try:
        if structure is not None:
            return Structure.from_dict(dict(structure))
        if cif:
            return Structure.from_str(cif, fmt="cif")
    except Exception as exc:  # noqa: BLE001 - whatever pymatgen raises, the row simply cannot match
        logger.warning("material %d: stored structure unreadable, never matched: %s", material_id, exc)
    return None


# --------------------------------------------------------------------------- Store


class Store:
    """Transactions, the experiment state machine, idempotency and the loop's queries.

    Args:
        engine: A SQLAlchemy engine made by :meth:`from_url` (SQLite or PostgreSQL).
    """

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # formula → {material id: parsed structure (None: unreadable)}; rows are never edited,
        # so a parsed structure stays right; new rows are found by their ids.
        self._buckets: dict[str, dict[int, Structure | None]] = {}
        self._buckets_lock = threading.Lock()
        self._local = threading.local()  # the session of a unit_of_work, per thread

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def from_url(cls, url: str, *, create: bool = False) -> Store:
        """Open the repository at ``url``; with ``create=True`` also migrate it to head.

        Args:
            url: ``sqlite:///path.db`` or ``postgresql+psycopg://user@host:port/db``.
            create: Run :meth:`upgrade` (idempotent) before returning.
        """
        store = cls(_make_engine(url))
        if create:
            store.upgrade()
        return store

    @property
    def url(self) -> str:
        """The database URL with any password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def upgrade(self, revision: str = "head") -> None:
        """Apply the packaged Alembic revisions up to ``revision``."""
        from alembic import command

        for attempt in range(3):
            try:
                with self.engine.connect() as conn:
                    command.upgrade(alembic_config(conn), revision)
                    conn.commit()
                return
            except SQLAlchemyError as exc:
                # Another process migrating the same empty database first: its tables are there now,
                # and the next attempt finds them recorded (seen on SQLite under load).
                if attempt < 2 and "already exists" in str(exc):
                    logger.info("migration of %s raced another process; reading its result", self.url)
                    continue
                raise RepositoryError(f"migration of {self.url} failed: {exc}") from exc

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at (None for an empty database)."""
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"version_table": "sdl_alembic_version"})
            return ctx.get_current_revision()

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def unit_of_work(self, what: str = "unit of work") -> Iterator[None]:
        """Several writes of one step in one transaction: every Store call of this thread inside joins it.

        Why: a Bluesky run's documents, run row and measurements belong together, and one commit
        instead of one per call is most of their cost. All or nothing: an error rolls every write
        back. Meant for plain writes; a call that catches an ``IntegrityError`` to retry
        (``upsert_material``, ``add_sample``) cannot recover inside it. Nested units join the outer one.
        """
        if getattr(self._local, "session", None) is not None:
            yield
            return
        with self._tx(what) as session:
            self._local.session = session
            try:
                yield
            finally:
                self._local.session = None

    @contextmanager
    def _tx(self, what: str) -> Iterator[Session]:
        """One session, one transaction, committed on success; database errors → RepositoryError.

        Inside :meth:`unit_of_work` the unit's session is used and committed with the unit.
        """
        joined: Session | None = getattr(self._local, "session", None)
        try:
            if joined is not None:
                yield joined
                return
            with self._sessions() as session, session.begin():
                yield session
        except (RepositoryError, ValueError, KeyError):
            raise
        except SQLAlchemyError as exc:
            raise RepositoryError(f"{what} failed on {self.url}: {exc.__class__.__name__}: {exc}") from exc

    @staticmethod
    def _event(
        session: Session,
        kind: str,
        message: str,
        *,
        campaign_id: int | None = None,
        experiment_id: int | None = None,
        level: str = "info",
        payload: Mapping[str, Any] | None = None,
        ts: dt.datetime | None = None,
    ) -> Event:
        row = Event(
            ts=ts or utcnow(),
            campaign_id=campaign_id,
            experiment_id=experiment_id,
            kind=kind,
            level=level,
            message=message,
            payload=to_jsonable(dict(payload)) if payload is not None else None,
        )
        session.add(row)
        return row

    # ----------------------------------------------------------------- campaigns

    def get_or_create_campaign(
        self,
        name: str,
        *,
        snapshot: Mapping[str, Any],
        config_hash: str,
        seed: int | None,
        budget: int | None,
        description: str = "",
        code_version: str | None = None,
        amend: bool = False,
    ) -> CampaignRecord:
        """The campaign called ``name``, created on first use.

        A name means one configuration: a rerun whose ``config_hash`` differs raises
        :class:`CampaignConfigChanged` (listing what changed), so a typo in the YAML cannot
        silently mix two experiments' data; ``amend=True`` takes the new snapshot and hash in the
        same transaction and logs ``campaign.amended``. Seed, budget or code version changes
        under an unchanged hash are taken and logged as ``campaign.config_changed``.

        Args:
            amend: Accept a changed configuration for an existing campaign.

        Raises:
            CampaignConfigChanged: The stored hash differs and ``amend`` is False.
        """
        if not name:
            raise RepositoryError("campaign name must not be empty")
        snap = to_jsonable(dict(snapshot))
        for attempt in range(2):
            try:
                with self._tx("get_or_create_campaign") as s:
                    row = s.scalars(sa.select(Campaign).where(Campaign.name == name).with_for_update()).one_or_none()
                    if row is None:
                        now = utcnow()
                        row = Campaign(
                            name=name,
                            description=description,
                            config_snapshot=snap,
                            config_hash=config_hash,
                            code_version=code_version,
                            seed=seed,
                            budget=budget,
                            state="running",
                            created_at=now,
                            updated_at=now,
                        )
                        s.add(row)
                        s.flush()
                        self._event(
                            s,
                            "campaign.created",
                            f"campaign {name!r} created",
                            campaign_id=row.id,
                            payload={"config_hash": config_hash, "seed": seed, "budget": budget},
                        )
                    else:
                        self._update_campaign(
                            s, row, snap, config_hash, seed, budget, description, code_version, amend=amend
                        )
                    s.flush()
                    record: CampaignRecord = _record(CampaignRecord, row)
                    return record
            except RepositoryError as exc:
                if attempt == 0 and isinstance(exc.__cause__, IntegrityError):
                    continue  # another process created it between our select and insert
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _update_campaign(
        self,
        s: Session,
        row: Campaign,
        snap: dict[str, Any],
        config_hash: str,
        seed: int | None,
        budget: int | None,
        description: str,
        code_version: str | None,
        *,
        amend: bool,
    ) -> None:
        """An existing campaign meets a (maybe) new config: refuse, amend, or take the small changes."""
        touched = False
        if row.config_hash != config_hash:
            differences = config_differences(row.config_snapshot, snap)
            if not amend:
                raise CampaignConfigChanged(
                    _config_changed_message(row.name, differences, row.config_hash, config_hash),
                    campaign=row.name,
                    differences=differences,
                )
            old_snapshot = row.config_snapshot
            row.config_snapshot = snap
            row.config_hash = config_hash
            listing = ", ".join(path for path, _, _ in differences) or "config hash"
            self._event(
                s,
                "campaign.amended",
                f"campaign {row.name!r} amended: {listing}",
                campaign_id=row.id,
                level="warning",
                payload={"old": old_snapshot, "new": snap, "differences": [list(d) for d in differences]},
            )
            logger.warning("campaign %r amended: %s", row.name, listing)
            touched = True
        changed = {
            k: {"old": getattr(row, k), "new": v}
            for k, v in (("seed", seed), ("budget", budget), ("code_version", code_version))
            if getattr(row, k) != v
        }
        if changed:
            row.seed = seed
            row.budget = budget
            row.code_version = code_version
            self._event(
                s,
                "campaign.config_changed",
                f"campaign {row.name!r} re-run with changed {', '.join(sorted(changed))}",
                campaign_id=row.id,
                level="warning",
                payload=changed,
            )
            logger.warning("campaign %r re-run with changed %s", row.name, ", ".join(sorted(changed)))
            touched = True
        if touched:
            row.description = description or row.description
            row.updated_at = utcnow()

    def get_campaign(self, campaign: int | str) -> CampaignRecord | None:
        """A campaign by id or name, or None."""
        with self._tx("get_campaign") as s:
            clause = Campaign.id == campaign if isinstance(campaign, int) else Campaign.name == campaign
            row = s.scalars(sa.select(Campaign).where(clause)).one_or_none()
            return None if row is None else _record(CampaignRecord, row)

    def campaigns(self) -> list[CampaignRecord]:
        """All campaigns, by id."""
        with self._tx("campaigns") as s:
            return [_record(CampaignRecord, r) for r in s.scalars(sa.select(Campaign).order_by(Campaign.id))]

    def set_campaign_state(self, campaign_id: int, state: str, *, reason: str = "") -> None:
        """Mark a campaign running, completed, stopped or failed (one event row)."""
        if state not in CAMPAIGN_STATES:
            raise RepositoryError(f"campaign state {state!r} is not one of {CAMPAIGN_STATES}")
        with self._tx("set_campaign_state") as s:
            row = s.get(Campaign, campaign_id, with_for_update=True)
            if row is None:
                raise RepositoryError(f"no campaign with id={campaign_id}")
            old = row.state
            row.state = state
            row.updated_at = utcnow()
            self._event(
                s,
                f"campaign.{state}",
                f"campaign {row.name!r} {old} → {state}" + (f": {reason}" if reason else ""),
                campaign_id=campaign_id,
                payload={"from": old, "to": state, "reason": reason},
            )

    # ----------------------------------------------------------------- campaign leases

    @staticmethod
    def _db_now(s: Session) -> dt.datetime:
        """The database server's clock on PostgreSQL (one clock for every host), else this host's."""
        if s.get_bind().dialect.name == "postgresql":
            now = s.scalar(sa.select(sa.func.now()))
            if isinstance(now, dt.datetime) and now.tzinfo is not None:
                return now.astimezone(dt.UTC)
        return utcnow()

    @staticmethod
    def _campaign_name(s: Session, campaign_id: int) -> str:
        name = s.scalar(sa.select(Campaign.name).where(Campaign.id == campaign_id))
        if name is None:
            raise RepositoryError(f"no campaign with id={campaign_id}")
        return name

    def acquire_lease(
        self,
        campaign_id: int,
        *,
        holder: str,
        host: str,
        pid: int,
        stale_after_s: float = 30.0,
        token: str | None = None,
    ) -> str:
        """Become the one runner of a campaign; returns the lease token to renew and release with.

        One transaction: the lease row is read under a row lock, then changed by a compare-and-set
        ``UPDATE ... WHERE token = <the token just read>`` (or inserted when there is none; the
        primary key makes a racing insert fail). The lease may be taken when nobody holds it, when
        the caller presents its own ``token``, when its heartbeat is older than ``stale_after_s``
        (the database server's clock on PostgreSQL), or at once when the holder ran on this host
        and its pid no longer exists. Taking over logs ``campaign.lease_taken_over``.

        Args:
            campaign_id: The campaign to run.
            holder: What runs it, in words (``sdl run``); shown to whoever is refused.
            host: The runner's host name (``socket.gethostname()``).
            pid: The runner's process id.
            stale_after_s: A heartbeat older than this means the holder is dead.
            token: A token this runner already holds, to take the lease again (e.g. after a reconnect).

        Raises:
            CampaignLocked: Another live holder has the lease.
        """
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s={stale_after_s} must be positive")
        mine = token or secrets.token_hex(16)
        for attempt in range(3):
            try:
                with self._tx("acquire_lease") as s:
                    name = self._campaign_name(s, campaign_id)
                    now = self._db_now(s)
                    row = s.scalars(
                        sa.select(Lease).where(Lease.campaign_id == campaign_id).with_for_update()
                    ).one_or_none()
                    if row is None:
                        s.add(
                            Lease(
                                campaign_id=campaign_id,
                                token=mine,
                                holder=holder,
                                host=host,
                                pid=pid,
                                acquired_at=now,
                                heartbeat_at=now,
                            )
                        )
                        s.flush()
                        logger.info("campaign %r: lease taken by %s on %s (pid %d)", name, holder, host, pid)
                        return mine
                    old = _record(LeaseRecord, row)
                    reason = self._takeover_reason(old, mine, now, stale_after_s)
                    if reason is None:
                        raise self._locked(name, old, stale_after_s)
                    result = s.execute(
                        sa.update(Lease)
                        .where(Lease.campaign_id == campaign_id, Lease.token == old.token)
                        .values(
                            token=mine,
                            holder=holder,
                            host=host,
                            pid=pid,
                            heartbeat_at=now,
                            acquired_at=old.acquired_at if old.token == mine else now,
                        )
                        .execution_options(synchronize_session=False)
                    )
                    if _rowcount(result) != 1:
                        continue  # changed under us (cannot happen under the row lock): read again
                    if old.token != mine:
                        previous = {k: v for k, v in dataclasses.asdict(old).items() if k != "token"}
                        self._event(
                            s,
                            "campaign.lease_taken_over",
                            f"campaign {name!r}: lease of {old.holder} on {old.host} (pid {old.pid}) "
                            f"taken over by {holder} on {host} (pid {pid}): {reason}",
                            campaign_id=campaign_id,
                            level="warning",
                            payload={
                                "old": previous,
                                "new": {"holder": holder, "host": host, "pid": pid},
                                "reason": reason,
                            },
                        )
                        logger.warning(
                            "campaign %r: lease of %s on %s (pid %d) taken over: %s",
                            name,
                            old.holder,
                            old.host,
                            old.pid,
                            reason,
                        )
                    return mine
            except RepositoryError as exc:
                if attempt < 2 and isinstance(exc.__cause__, IntegrityError):
                    continue  # another runner inserted the lease row first: read it
                raise
        raise RepositoryError(f"campaign {campaign_id}: the lease kept changing while it was being taken")

    @staticmethod
    def _takeover_reason(old: LeaseRecord, mine: str, now: dt.datetime, stale_after_s: float) -> str | None:
        """Why ``old`` may be replaced (its token is ours, it is stale, its process is gone), or None."""
        if old.token == mine:
            return "same token"
        age = (now - old.heartbeat_at).total_seconds()
        if age > stale_after_s:
            return f"no heartbeat for {age:.0f} s (stale after {stale_after_s:g} s)"
        if _process_gone(old.host, old.pid):
            return f"pid {old.pid} no longer exists on {old.host}"
        return None

    @staticmethod
    def _locked(name: str, lease: LeaseRecord, stale_after_s: float) -> CampaignLocked:
        return CampaignLocked(
            f"campaign {name!r} is being run by {lease.holder} on host {lease.host} (pid {lease.pid}) "
            f"since {_iso_z(lease.acquired_at)}; stop it first, or wait {stale_after_s:g} s if that process is dead",
            campaign=name,
            holder=lease.holder,
            host=lease.host,
            pid=lease.pid,
            since=lease.acquired_at,
        )

    def renew_lease(self, campaign_id: int, token: str) -> None:
        """Heartbeat: the lease held by ``token`` is alive now.

        Raises:
            CampaignLocked: The lease is no longer ``token``'s (taken over, maybe released since):
                the caller must stop running the campaign.
        """
        with self._tx("renew_lease") as s:
            result = s.execute(
                sa.update(Lease)
                .where(Lease.campaign_id == campaign_id, Lease.token == token)
                .values(heartbeat_at=self._db_now(s))
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result) == 1:
                return
            name = self._campaign_name(s, campaign_id)
            row = s.get(Lease, campaign_id)
            if row is None:
                raise CampaignLocked(
                    f"campaign {name!r}: this runner's lease is gone (another process took it over and "
                    "released it); stop here, then rerun",
                    campaign=name,
                )
            raise CampaignLocked(
                f"campaign {name!r}: this runner's lease was taken over by {row.holder} on host {row.host} "
                f"(pid {row.pid}) at {_iso_z(row.acquired_at)}; stop here, only one process may run it",
                campaign=name,
                holder=row.holder,
                host=row.host,
                pid=row.pid,
                since=row.acquired_at,
            )

    def release_lease(self, campaign_id: int, token: str) -> None:
        """Give the lease up; does nothing when ``token`` does not hold it (any more)."""
        with self._tx("release_lease") as s:
            result = s.execute(
                sa.delete(Lease)
                .where(Lease.campaign_id == campaign_id, Lease.token == token)
                .execution_options(synchronize_session=False)
            )
            if _rowcount(result):
                logger.info("campaign %d: lease released", campaign_id)

    def lease(self, campaign_id: int) -> LeaseRecord | None:
        """The campaign's current lease (maybe stale), or None when nobody holds it."""
        with self._tx("lease") as s:
            row = s.get(Lease, campaign_id)
            return None if row is None else _record(LeaseRecord, row)

    # ----------------------------------------------------------------- materials

    def upsert_material(
        self,
        key: str,
        *,
        formula: str | None = None,
        structure: Mapping[str, Any] | str | None = None,
        params: Mapping[str, Any] | None = None,
        source_id: str | None = None,
    ) -> int:
        """The id of the material with canonical ``key``; created, or missing fields filled in.

        Args:
            key: From :func:`sdl.materials.canonical_key`.
            structure: pymatgen ``Structure.as_dict()`` JSON, or CIF text (a ``str``).
        """
        if not key:
            raise RepositoryError("material canonical key must not be empty")
        fields: dict[str, Any] = {"formula": formula, "params": to_jsonable(params) if params is not None else None}
        fields["source_id"] = source_id
        if isinstance(structure, str):
            fields["cif"] = structure
        elif structure is not None:
            fields["structure"] = to_jsonable(structure)
        for attempt in range(2):
            try:
                with self._tx("upsert_material") as s:
                    row = s.scalars(sa.select(Material).where(Material.canonical_key == key)).one_or_none()
                    if row is None:
                        row = Material(canonical_key=key, created_at=utcnow(), **fields)
                        s.add(row)
                    else:
                        for name, value in fields.items():
                            if value is not None and getattr(row, name) is None:
                                setattr(row, name, value)
                    s.flush()
                    return row.id
            except RepositoryError as exc:
                if attempt == 0 and isinstance(exc.__cause__, IntegrityError):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def get_material(self, material: int | str) -> MaterialRecord | None:
        """A material by id or canonical key, or None."""
        with self._tx("get_material") as s:
            clause = Material.id == material if isinstance(material, int) else Material.canonical_key == material
            row = s.scalars(sa.select(Material).where(clause)).one_or_none()
            return None if row is None else _record(MaterialRecord, row)

    def materials(self, formula: str | None = None) -> list[MaterialRecord]:
        """All materials (of one reduced formula, given in any order of elements), by id."""
        query = sa.select(Material)
        if formula is not None:
            query = query.where(Material.formula == _reduced_formula(formula))
        with self._tx("materials") as s:
            return [_record(MaterialRecord, r) for r in s.scalars(query.order_by(Material.id))]

    def material_for_params(self, params: Mapping[str, Any]) -> int:
        """The material of a process recipe: one row per :func:`sdl.materials.canonical_params` key,
        so float noise (``0.1 + 0.2`` vs ``0.3``) and key order make no second row."""
        from sdl.materials import canonical_key

        try:
            key = canonical_key(params=params)
        except ValueError as exc:
            raise RepositoryError(f"no material for these parameters: {exc}") from exc
        return self.upsert_material(key, params=json.loads(key.removeprefix("params:")))

    def material_of_cif(self, cif: str, *, formula: str, source_id: str | None = None) -> int | None:
        """The stored crystal whose CIF text is exactly ``cif``, or None: no parse, no matcher.

        Why: one text is one crystal, so a candidate met before (a resumed campaign, another
        campaign on the same candidate file) needs neither pymatgen's CIF parser nor the matcher,
        which cost ~10 ms per candidate together. Only the rows of the reduced ``formula`` are
        read (an index): a formula that is not the crystal's finds nothing, and the caller then
        matches the structure (:meth:`material_for_structure`, which stores the text it is given).

        Args:
            cif: The candidate's CIF text, as its file gives it.
            formula: Its formula (any order of elements).
            source_id: Filled into the row if it lacks one, as a match does.
        """
        query = (sa.select(Material.id, Material.source_id)
                 .where(Material.formula == _reduced_formula(formula), Material.cif == cif)
                 .order_by(Material.id).limit(1))
        with self._tx("material_of_cif") as s:
            found = s.execute(query).first()
            if found is None:
                return None
            if source_id is not None and found.source_id is None:
                self._fill_material(s, found.id, source_id=source_id, cif=None)
            return int(found.id)

    def material_for_structure(
        self,
        structure: Structure,
        *,
        source_id: str | None = None,
        cif: str | None = None,
    ) -> int:
        """The material of a crystal: an existing row if pymatgen's ``StructureMatcher`` says so, else a new one.

        Only the rows of the same reduced formula are compared (their parsed structures are cached
        in this ``Store``), first without a write lock; a new row is then inserted under a
        per-formula lock (a PostgreSQL advisory lock, SQLite's write lock) after comparing
        with any row that appeared meanwhile, so two processes never make two rows of one crystal.
        The row is named by :func:`sdl.materials.canonical_key`; two crystals that the matcher
        tells apart but that share a key get ``~2``, ``~3``… suffixes.

        Args:
            structure: The crystal (any cell, origin or site order).
            source_id: Where it comes from (e.g. ``mp-5229``); filled into an existing row lacking one.
            cif: Its CIF text, kept as given.
        """
        from sdl.materials import same_structure

        formula = structure.composition.reduced_formula
        with self._tx("material_for_structure lookup") as s:
            bucket = self._bucket(s, formula)
        compared = set(bucket)
        # The same crystal again (a resumed or repeated candidate) is found by plain equality
        # (lattice and sites within float noise): sound, and far cheaper than the matcher.
        matched = next((mid for mid, other in bucket.items() if other is not None and other == structure), None)
        if matched is None:
            matched = next((mid for mid, other in bucket.items()
                            if other is not None and same_structure(structure, other)), None)
        if matched is not None:
            if source_id is not None or cif is not None:
                with self._tx("material_for_structure fill") as s:
                    self._fill_material(s, matched, source_id=source_id, cif=cif)
            return matched
        for attempt in range(2):
            try:
                with self._tx("material_for_structure") as s:
                    if s.get_bind().dialect.name == "postgresql":
                        s.execute(sa.select(sa.func.pg_advisory_xact_lock(_advisory_key(formula))))
                    found = None
                    locked_bucket = self._bucket(s, formula)
                    for mid, other in locked_bucket.items():
                        if mid not in compared:
                            compared.add(mid)
                            if other is not None and same_structure(structure, other):
                                found = mid
                                break
                    if found is not None:
                        self._fill_material(s, found, source_id=source_id, cif=cif)
                        return found
                    key = self._structure_key(structure)
                    # A key names its formula, so no row of an empty formula can hold it (a racing
                    # or hand-made row that does makes the insert fail and the retry look).
                    row = Material(
                        canonical_key=key if attempt == 0 and not locked_bucket else self._free_key(s, key),
                        formula=formula,
                        structure=to_jsonable(structure.as_dict()),
                        cif=cif,
                        source_id=source_id,
                        created_at=utcnow(),
                    )
                    s.add(row)
                    s.flush()
                    new_id = row.id
            except RepositoryError as exc:
                if attempt == 0 and isinstance(exc.__cause__, IntegrityError):
                    continue  # a racing insert of the same key: read the bucket again
                raise
            with self._buckets_lock:  # committed: later calls compare with it without parsing
                self._buckets.setdefault(formula, {})[new_id] = structure.copy()
            logger.debug("material %d: new crystal %s (%s)", new_id, formula, row.canonical_key)
            return new_id
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _structure_key(structure: Structure) -> str:
        from sdl.materials import canonical_key

        try:
            return canonical_key(structure=structure)
        except ValueError as exc:
            raise RepositoryError(f"no material for this structure: {exc}") from exc

    @staticmethod
    def _free_key(s: Session, key: str) -> str:
        """``key``, or ``key~N`` when the matcher told this crystal apart from the key's owner(s)."""
        taken = set(
            s.scalars(
                sa.select(Material.canonical_key).where(
                    sa.or_(Material.canonical_key == key, Material.canonical_key.startswith(key + "~"))
                )
            )
        )
        n = 1
        candidate = key
        while candidate in taken:
            n += 1
            candidate = f"{key}~{n}"
        return candidate

    def _bucket(self, s: Session, formula: str) -> dict[int, Structure | None]:
        """The parsed structures of ``formula``'s materials, by id: new rows parsed, the rest cached."""
        ids = list(s.scalars(sa.select(Material.id).where(Material.formula == formula).order_by(Material.id)))
        with self._buckets_lock:
            cached = dict(self._buckets.get(formula, {}))
        missing = [i for i in ids if i not in cached]
        if missing:
            for mid, structure, cif in s.execute(
                sa.select(Material.id, Material.structure, Material.cif).where(Material.id.in_(missing))
            ):
                cached[mid] = _parse_structure(mid, structure, cif)
            with self._buckets_lock:
                self._buckets.setdefault(formula, {}).update({i: cached[i] for i in missing if i in cached})
        return {i: cached[i] for i in ids if i in cached}

    @staticmethod
    def _fill_material(s: Session, material_id: int, *, source_id: str | None, cif: str | None) -> None:
        """Fill a matched material's missing ``source_id`` / ``cif`` (never overwrite what it has)."""
        for column, value in ((Material.source_id, source_id), (Material.cif, cif)):
            if value is not None:
                s.execute(
                    sa.update(Material)
                    .where(Material.id == material_id, column.is_(None))
                    .values({column: value})
                    .execution_options(synchronize_session=False)
                )

    def material_measurements(
        self,
        material_id: int,
        property: str | None = None,  # noqa: A002 - the domain's word
        *,
        quality: str | None = "ok",
    ) -> list[MaterialMeasurementRecord]:
        """Every measurement of one material across all campaigns, oldest first.

        Args:
            material_id: From :meth:`material_for_structure` or :meth:`material_for_params`.
            property: Only this property (None: all).
            quality: Only this quality flag (None: any).
        """
        query = (
            sa.select(Measurement, Experiment.campaign_id, Campaign.name, Sample.sample_uid)
            .join(Experiment, Experiment.id == Measurement.experiment_id)
            .join(Campaign, Campaign.id == Experiment.campaign_id)
            .outerjoin(Sample, Sample.id == Measurement.sample_id)
            .where(Experiment.material_id == material_id)
        )
        if property is not None:
            query = query.where(Measurement.property == property)
        if quality is not None:
            query = query.where(Measurement.quality == quality)
        with self._tx("material_measurements") as s:
            return [
                MaterialMeasurementRecord(
                    measurement_id=m.id,
                    material_id=material_id,
                    campaign_id=cid,
                    campaign=cname,
                    experiment_id=m.experiment_id,
                    sample_id=m.sample_id,
                    sample_uid=suid,
                    property=m.property,
                    value=m.value,
                    unit=m.unit,
                    uncertainty=m.uncertainty,
                    quality=m.quality,
                    instrument=m.instrument,
                    timestamp=m.timestamp,
                    run_uid=m.run_uid,
                )
                for m, cid, cname, suid in s.execute(query.order_by(Measurement.timestamp, Measurement.id))
            ]

    # ----------------------------------------------------------------- experiments

    def propose_experiment(
        self,
        campaign_id: int,
        *,
        idempotency_key: str,
        candidate_key: str,
        params: Mapping[str, Any],
        material_id: int | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a proposed experiment; a repeated ``idempotency_key`` returns the existing id.

        Args:
            provenance: ``model_version_id``, ``model_version``, ``acquisition_value``,
                ``predicted_mean``, ``predicted_std``, ``batch_id``; other keys are kept in
                ``provenance_extra``.

        Raises:
            RepositoryError: The key exists for another campaign or another candidate.
        """
        if not idempotency_key:
            raise RepositoryError("idempotency_key must not be empty")
        prov = dict(provenance or {})
        columns = {k: prov.pop(k, None) for k in PROVENANCE_KEYS}
        for k in ("acquisition_value", "predicted_mean", "predicted_std"):
            if columns[k] is not None:
                columns[k] = float(columns[k])
                if not math.isfinite(columns[k]):
                    columns[k] = None
        # No look-up first: the insert itself tells a repeated key (IntegrityError, handled below).
        try:
            with self._tx("propose_experiment") as s:
                row = Experiment(
                    campaign_id=campaign_id,
                    material_id=material_id,
                    candidate_key=candidate_key,
                    params=to_jsonable(dict(params)),
                    state="proposed",
                    idempotency_key=idempotency_key,
                    provenance_extra=to_jsonable(prov) if prov else None,
                    proposed_at=utcnow(),
                    **columns,
                )
                s.add(row)
                s.flush()
                self._event(
                    s,
                    "experiment.proposed",
                    f"experiment {row.id} proposed: {candidate_key}",
                    campaign_id=campaign_id,
                    experiment_id=row.id,
                    payload={"idempotency_key": idempotency_key, "batch_id": columns["batch_id"]},
                )
                return row.id
        except RepositoryError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            existing = self._experiment_by_key(idempotency_key)
            if existing is None:  # the integrity error was something else (e.g. unknown campaign)
                raise
            return self._check_repeat(existing, campaign_id, candidate_key)

    def _experiment_by_key(self, idempotency_key: str) -> ExperimentRecord | None:
        with self._tx("experiment lookup") as s:
            row = s.scalars(sa.select(Experiment).where(Experiment.idempotency_key == idempotency_key)).one_or_none()
            return None if row is None else _record(ExperimentRecord, row)

    @staticmethod
    def _check_repeat(existing: ExperimentRecord, campaign_id: int, candidate_key: str) -> int:
        if existing.campaign_id != campaign_id or existing.candidate_key != candidate_key:
            raise RepositoryError(
                f"idempotency_key={existing.idempotency_key!r} already names experiment {existing.id} "
                f"(campaign {existing.campaign_id}, candidate {existing.candidate_key!r}), "
                f"not campaign {campaign_id} candidate {candidate_key!r}"
            )
        return existing.id

    def _transition(
        self,
        experiment_id: int,
        to: str,
        message: str,
        *,
        payload: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        with self._tx(f"experiment {experiment_id} → {to}") as s:
            row = s.get(Experiment, experiment_id, with_for_update=True)
            if row is None:
                raise RepositoryError(f"no experiment with id={experiment_id}")
            self._move(s, row, to, message, payload=payload, **changes)

    def _move(
        self,
        s: Session,
        row: Experiment,
        to: str,
        message: str,
        *,
        payload: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        """One checked state change of a locked row, with its event, inside the caller's transaction."""
        if to not in TRANSITIONS[row.state]:
            raise IllegalTransition(
                f"experiment {row.id}: {row.state} → {to} is not allowed "
                f"(from {row.state}: {sorted(TRANSITIONS[row.state]) or 'none'})"
            )
        old = row.state
        row.state = to
        for name, value in changes.items():
            setattr(row, name, value)
        self._event(
            s,
            f"experiment.{to}",
            f"experiment {row.id} {old} → {to}" + (f": {message}" if message else ""),
            campaign_id=row.campaign_id,
            experiment_id=row.id,
            level="warning" if to in ("failed", "abandoned") else "info",
            payload={"from": old, "to": to, **(payload or {})},
        )

    def start_experiment(self, experiment_id: int, *, instruments: Sequence[str]) -> None:
        """proposed → running, on these instruments."""
        self._transition(
            experiment_id,
            "running",
            "",
            payload={"instruments": list(instruments)},
            instruments=list(instruments),
            started_at=utcnow(),
        )

    def complete_experiment(self, experiment_id: int) -> None:
        """running → completed."""
        self._transition(experiment_id, "completed", "", finished_at=utcnow())

    def fail_experiment(self, experiment_id: int, *, reason: str, kind: str) -> None:
        """running → failed, for an ``instrument`` or a ``material`` reason."""
        if kind not in FAILURE_KINDS:
            raise RepositoryError(f"failure kind {kind!r} is not one of {FAILURE_KINDS}")
        self._transition(
            experiment_id,
            "failed",
            f"{kind}: {reason}",
            payload={"kind": kind, "reason": reason},
            failure_kind=kind,
            failure_reason=reason,
            finished_at=utcnow(),
        )

    def abandon_experiment(self, experiment_id: int, *, reason: str) -> None:
        """proposed|running → abandoned (e.g. caught mid-run by a crash and not reconcilable)."""
        self._transition(
            experiment_id,
            "abandoned",
            reason,
            payload={"reason": reason},
            failure_reason=reason,
            finished_at=utcnow(),
        )

    def get_experiment(self, experiment_id: int) -> ExperimentRecord | None:
        """One experiment by id, or None."""
        with self._tx("get_experiment") as s:
            row = s.get(Experiment, experiment_id)
            return None if row is None else _record(ExperimentRecord, row)

    def experiments(self, campaign_id: int, states: Iterable[str] | None = None) -> list[ExperimentRecord]:
        """Experiments of a campaign (optionally only in ``states``), in proposal order."""
        query = sa.select(Experiment).where(Experiment.campaign_id == campaign_id)
        if states is not None:
            wanted = list(states)
            unknown = set(wanted) - set(EXPERIMENT_STATES)
            if unknown:
                raise RepositoryError(f"unknown experiment state(s) {sorted(unknown)}; known: {EXPERIMENT_STATES}")
            query = query.where(Experiment.state.in_(wanted))
        with self._tx("experiments") as s:
            return [_record(ExperimentRecord, r) for r in s.scalars(query.order_by(Experiment.id))]

    def pending_experiments(self, campaign_id: int) -> list[ExperimentRecord]:
        """Experiments proposed or running: what the engine must treat as pending."""
        return self.experiments(campaign_id, states=("proposed", "running"))

    def record_hand_results(
        self,
        campaign_id: int,
        results: Sequence[HandResult],
        *,
        by: str,
        property: str,  # noqa: A002 - the domain's word
        unit: str | None = None,
        amend: bool = False,
        source: str | None = None,
    ) -> list[HandOutcome]:
        """Complete (or fail) experiments with results a person measured: all or nothing.

        One transaction for the whole list, so a CSV with one bad row writes nothing. Each result
        takes its experiment ``proposed → running → completed`` (or ``failed``, a material failure)
        with a measurement whose instrument is ``hands:<by>``, the same rows an instrument leaves.
        A completed experiment is never overwritten: with ``amend`` its ``ok`` values of
        ``property`` are flagged ``superseded`` (kept on record) and the new one is added, with an
        ``experiment.amended`` event naming both.

        Args:
            source: Only experiments whose ``provenance_extra["source"]`` is this (``hands``: while
                ``sdl run`` holds the campaign, a person may tell only what was asked by hand).

        Raises:
            RepositoryError: One line naming ``result.origin`` and the experiment: unknown, told
                twice, already completed (without ``amend``), failed or abandoned, not of
                ``source``, or a value that is not a finite number.
        """
        hand = f"hands:{by}"
        outcomes: list[HandOutcome] = []
        with self._tx("record_hand_results") as s:
            name = self._campaign_name(s, campaign_id)
            seen: dict[int, str] = {}
            for result in results:
                where = f"{result.origin}: " if result.origin else ""
                eid = result.experiment_id
                if eid in seen:
                    raise RepositoryError(f"{where}experiment {eid} is told twice (also at {seen[eid]})")
                seen[eid] = result.origin or "?"
                if (result.value is None) == (result.failed is None):
                    raise RepositoryError(f"{where}experiment {eid}: give either a value or a failure reason")
                if result.values:
                    raise RepositoryError(f"{where}experiment {eid}: values of several properties are told by "
                                          "record_hand_results_bulk")
                row = s.get(Experiment, eid, with_for_update=True)
                if row is None or row.campaign_id != campaign_id:
                    raise RepositoryError(f"{where}campaign {name!r} has no experiment {eid}")
                if source is not None and (row.provenance_extra or {}).get("source") != source:
                    raise RepositoryError(f"{where}experiment {eid} is not one of the campaign's {source!r} "
                                          f"experiments, and another process runs the campaign now")
                outcomes.append(self._tell_one(s, row, result, where, hand=hand, by=by, property=property,
                                               unit=unit, amend=amend))
        return outcomes

    def _tell_one(
        self,
        s: Session,
        row: Experiment,
        result: HandResult,
        where: str,
        *,
        hand: str,
        by: str,
        property: str,  # noqa: A002
        unit: str | None,
        amend: bool,
    ) -> HandOutcome:
        now = utcnow()
        eid = row.id
        measurement = None
        if result.value is not None:
            try:
                measurement = self._measurement_row(
                    eid, {"property": property, "value": result.value, "unit": unit, "instrument": hand,
                          "timestamp": now}
                )
            except RepositoryError as exc:
                raise RepositoryError(f"{where}{exc}") from exc
        if row.state == "completed":
            old = list(
                s.scalars(
                    sa.select(Measurement).where(
                        Measurement.experiment_id == eid, Measurement.property == property, Measurement.quality == "ok"
                    )
                )
            )
            shown = ", ".join(f"{m.value:g}" for m in old) or "no value"
            if measurement is None:
                raise ResultRefused(f"{where}experiment {eid} is already completed ({property} {shown}): "
                                    "it cannot be marked failed")
            if not amend:
                raise ResultRefused(
                    f"{where}experiment {eid} is already completed ({property} {shown}); rerun with --amend "
                    "to replace its value (the old one stays on record)"
                )
            for m in old:
                m.quality = "superseded"
            self._link_samples(s, [measurement])
            s.add(measurement)
            self._event(
                s, "experiment.amended", f"experiment {eid}: {property} {shown} → {measurement.value:g} (by {by})",
                campaign_id=row.campaign_id, experiment_id=eid, level="warning",
                payload={"old": [m.value for m in old], "new": measurement.value, "by": by,
                         "origin": result.origin},
            )
            return HandOutcome(eid, row.candidate_key, "completed", measurement.value, None, [m.value for m in old])
        if row.state in ("failed", "abandoned"):
            raise ResultRefused(f"{where}experiment {eid} is {row.state} ({row.failure_reason or 'no reason'}): "
                                "it cannot be told a result")
        if row.state == "proposed":
            self._move(s, row, "running", f"carried out by {hand}", payload={"instruments": [hand]},
                       instruments=[hand], started_at=now)
        if measurement is None:
            reason = str(result.failed)
            self._move(s, row, "failed", f"material: {reason}", payload={"kind": "material", "reason": reason},
                       failure_kind="material", failure_reason=reason, finished_at=now)
        else:
            self._link_samples(s, [measurement])
            s.add(measurement)
            self._move(s, row, "completed", f"told by {by}", finished_at=now)
        value = None if measurement is None else measurement.value
        self._event(
            s, "experiment.told", f"experiment {eid} told by {by}: " + (
                f"{property} = {value:g}" if value is not None else f"failed ({result.failed})"),
            campaign_id=row.campaign_id, experiment_id=eid,
            payload={"by": by, "value": value, "failed": result.failed, "origin": result.origin},
        )
        return HandOutcome(eid, row.candidate_key, row.state, value, result.failed, [])

    # ----------------------------------------------------------------- samples, measurements

    def add_sample(self, experiment_id: int, *, instrument: str, sample_uid: str, state: str = "synthesized") -> int:
        """Record a sample; the same ``(instrument, sample_uid)`` again returns the existing id."""
        if state not in SAMPLE_STATES:
            raise RepositoryError(f"sample state {state!r} is not one of {SAMPLE_STATES}")
        for attempt in range(2):
            try:
                with self._tx("add_sample") as s:
                    row = s.scalars(
                        sa.select(Sample).where(Sample.instrument == instrument, Sample.sample_uid == sample_uid)
                    ).one_or_none()
                    if row is not None:
                        if row.experiment_id != experiment_id:
                            raise RepositoryError(
                                f"sample {sample_uid!r} of {instrument!r} belongs to experiment "
                                f"{row.experiment_id}, not {experiment_id}"
                            )
                        return row.id
                    row = Sample(
                        experiment_id=experiment_id,
                        instrument=instrument,
                        sample_uid=sample_uid,
                        state=state,
                        created_at=utcnow(),
                    )
                    s.add(row)
                    s.flush()
                    return row.id
            except RepositoryError as exc:
                if attempt == 0 and isinstance(exc.__cause__, IntegrityError):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def set_sample_state(self, sample_id: int, state: str) -> None:
        """Change a sample's state (e.g. ``measured``, ``lost``)."""
        if state not in SAMPLE_STATES:
            raise RepositoryError(f"sample state {state!r} is not one of {SAMPLE_STATES}")
        with self._tx("set_sample_state") as s:
            row = s.get(Sample, sample_id, with_for_update=True)
            if row is None:
                raise RepositoryError(f"no sample with id={sample_id}")
            row.state = state

    def samples(self, experiment_id: int) -> list[SampleRecord]:
        """Samples of an experiment."""
        with self._tx("samples") as s:
            rows = s.scalars(sa.select(Sample).where(Sample.experiment_id == experiment_id).order_by(Sample.id))
            return [_record(SampleRecord, r) for r in rows]

    @staticmethod
    def _measurement_row(experiment_id: int, m: Mapping[str, Any]) -> Measurement:
        """A validated, unsaved row; a missing ``sample_id`` is filled by :meth:`_link_samples`."""
        prop, number, unc, quality = _checked_measurement(experiment_id, m)
        return Measurement(
            experiment_id=experiment_id,
            sample_id=m.get("sample_id"),
            property=prop,
            value=number,
            unit=m.get("unit"),
            uncertainty=unc,
            instrument=m.get("instrument"),
            timestamp=m.get("timestamp") or utcnow(),
            quality=quality,
            run_uid=m.get("run_uid"),
            event_uid=m.get("event_uid"),
        )

    def add_measurement(
        self,
        experiment_id: int,
        *,
        property: str,  # noqa: A002 - the domain's word
        value: float,
        unit: str | None = None,
        uncertainty: float | None = None,
        instrument: str | None = None,
        quality: str = "ok",
        run_uid: str | None = None,
        sample_id: int | None = None,
        timestamp: dt.datetime | None = None,
        event_uid: str | None = None,
    ) -> int:
        """Store one measurement; non-numeric or non-finite values raise RepositoryError.

        Without ``sample_id`` it is linked to the experiment's latest sample, if there is one,
        so a synthesized sample's measurements all point to its ``samples`` row.
        """
        row = self._measurement_row(experiment_id, locals())
        with self._tx("add_measurement") as s:
            self._link_samples(s, [row])
            s.add(row)
            s.flush()
            return row.id

    @staticmethod
    def _link_samples(s: Session, rows: Sequence[Measurement]) -> None:
        """Give each row without a sample its experiment's latest sample (in the writing transaction)."""
        latest: dict[int, int | None] = {}
        for row in rows:
            if row.sample_id is not None:
                continue
            if row.experiment_id not in latest:
                latest[row.experiment_id] = s.scalar(
                    sa.select(sa.func.max(Sample.id)).where(Sample.experiment_id == row.experiment_id)
                )
            row.sample_id = latest[row.experiment_id]

    def invalidate_run_measurements(self, run_uid: str, *, reason: str) -> int:
        """Flag every measurement of a run ``invalid`` (the run did not succeed); returns how many."""
        with self._tx("invalidate_run_measurements") as s:
            result = s.execute(
                sa.update(Measurement)
                .where(Measurement.run_uid == run_uid, Measurement.quality != "invalid")
                .values(quality="invalid")
            )
            n = _rowcount(result)
            run = s.get(BlueskyRun, run_uid)
            experiment_id = run.experiment_id if run else None
            campaign_id = s.get(Experiment, experiment_id).campaign_id if experiment_id else None  # type: ignore[union-attr]
            self._event(
                s,
                "measurements.invalidated",
                f"{n} measurement(s) of run {run_uid} flagged invalid: {reason}",
                campaign_id=campaign_id,
                experiment_id=experiment_id,
                level="warning",
                payload={"run_uid": run_uid, "count": n, "reason": reason},
            )
            return n

    def measurements(
        self, *, experiment_id: int | None = None, campaign_id: int | None = None
    ) -> list[MeasurementRecord]:
        """Measurements of one experiment or campaign, in insertion order."""
        query = self._measurement_query()
        if experiment_id is not None:
            query = query.where(Measurement.experiment_id == experiment_id)
        if campaign_id is not None:
            query = query.where(Experiment.campaign_id == campaign_id)
        return self._measurement_records(query.order_by(Measurement.id))

    def measurements_of(self, property: str, *, quality: str | None = "ok") -> list[MeasurementRecord]:  # noqa: A002
        """All measurements of ``property`` across campaigns (only ``quality`` ones; None = any)."""
        query = self._measurement_query().where(Measurement.property == property)
        if quality is not None:
            query = query.where(Measurement.quality == quality)
        return self._measurement_records(query.order_by(Measurement.id))

    @staticmethod
    def _measurement_query() -> sa.Select[Measurement, int, str]:
        return sa.select(Measurement, Experiment.campaign_id, Experiment.candidate_key).join(
            Experiment, Experiment.id == Measurement.experiment_id
        )

    def _measurement_records(self, query: sa.Select[Measurement, int, str]) -> list[MeasurementRecord]:
        with self._tx("measurements") as s:
            return [
                _record(MeasurementRecord, m, campaign_id=cid, candidate_key=ckey) for m, cid, ckey in s.execute(query)
            ]

    # ----------------------------------------------------------------- Bluesky

    def record_run_start(
        self,
        uid: str,
        *,
        experiment_id: int | None,
        plan_name: str | None,
        start_time: dt.datetime | None = None,
        campaign_id: int | None = None,
    ) -> None:
        """Record a run's start (idempotent on ``uid``), with one event row.

        Args:
            campaign_id: The experiment's campaign when the caller knows it (the writer caches it
                per experiment): one query fewer; None looks it up (and checks the experiment exists).
        """
        with self._tx("record_run_start") as s:
            # Core statements on the table: this path writes a run row twice and never needs it as
            # an object, and the ORM's identity lookups and unit of work were most of its cost.
            if s.scalar(sa.select(_RUNS.c.uid).where(_RUNS.c.uid == uid)) is not None:
                return
            if experiment_id is not None and campaign_id is None:
                campaign_id = self._campaign_of(s, experiment_id)
                if campaign_id is None:
                    raise RepositoryError(f"run {uid}: no experiment with id={experiment_id}")
            s.execute(sa.insert(_RUNS).values(uid=uid, experiment_id=experiment_id, plan_name=plan_name,
                                              start_time=start_time or utcnow()))
            self._event(
                s,
                "run.start",
                f"run {uid} ({plan_name}) started",
                campaign_id=campaign_id,
                experiment_id=experiment_id,
                payload={"run_uid": uid, "plan_name": plan_name},
            )

    @staticmethod
    def _campaign_of(s: Session, experiment_id: int) -> int | None:
        """An experiment's campaign id (None: no such experiment): one column, not the whole row.

        Why: a run's start and stop name their campaign in their event rows, four times per
        experiment; loading the experiment's whole row for it (JSON columns decoded, an ORM
        object) took about twice as long as reading the one column.
        """
        campaign_id = s.scalar(sa.select(Experiment.campaign_id).where(Experiment.id == experiment_id))
        return None if campaign_id is None else int(campaign_id)

    def record_run_stop(
        self,
        uid: str,
        *,
        exit_status: str,
        reason: str | None = None,
        stop_time: dt.datetime | None = None,
        campaign_id: int | None = None,
    ) -> None:
        """Record a run's stop (exit status ``success``, ``fail`` or ``abort``), with one event row.

        Args:
            campaign_id: The run's campaign when the caller knows it (one query fewer).
        """
        with self._tx("record_run_stop") as s:
            stopped = s.execute(
                sa.update(_RUNS).where(_RUNS.c.uid == uid)
                .values(exit_status=exit_status, reason=reason or None, stop_time=stop_time or utcnow())
                .returning(_RUNS.c.experiment_id)
            ).first()
            if stopped is None:
                raise RepositoryError(f"stop of unknown run {uid}")
            experiment_id = stopped.experiment_id
            if campaign_id is None and experiment_id:
                campaign_id = self._campaign_of(s, experiment_id)
            self._event(
                s,
                "run.stop",
                f"run {uid} stopped: {exit_status}" + (f" ({reason})" if reason else ""),
                campaign_id=campaign_id,
                experiment_id=experiment_id,
                level="info" if exit_status == "success" else "warning",
                payload={"run_uid": uid, "exit_status": exit_status, "reason": reason},
            )

    def record_document(
        self,
        run_uid: str | None,
        name: str,
        doc: Mapping[str, Any],
        *,
        measurements: Sequence[tuple[int, Mapping[str, Any]]] = (),
    ) -> int:
        """Store one Bluesky document (and the measurements derived from it) in one transaction.

        Idempotent on the document's own uid (``uid`` or ``datum_id``): storing it again returns
        the existing row id.

        Args:
            run_uid: The run's start uid (None when it cannot be known, e.g. an orphan datum).
            name: Document name (``start``, ``descriptor``, ``event``, ``stop``, ...).
            doc: The document.
            measurements: ``(experiment_id, fields)`` pairs for :meth:`add_measurement`.
        """
        return self.record_documents([(run_uid, name, doc, measurements)])[0]

    def record_documents(
        self,
        items: Sequence[tuple[str | None, str, Mapping[str, Any], Sequence[tuple[int, Mapping[str, Any]]]]],
    ) -> list[int]:
        """Store documents in arrival order (each as :meth:`record_document`) in one transaction.

        Why a batch: a run's documents written together need two lookups in all (known uids,
        each run's last sequence number), not two per document. Returns the row ids, in order.
        """
        prepared = []
        for run_uid, name, doc, measurements in items:
            doc_uid = doc.get("uid") if isinstance(doc.get("uid"), str) else doc.get("datum_id")
            prepared.append((run_uid, name, doc, doc_uid if isinstance(doc_uid, str) else None,
                             [self._measurement_row(eid, m) for eid, m in measurements]))
        if not prepared:
            return []
        with self._tx("record_document") as s:
            uids = sorted({p[3] for p in prepared if p[3] is not None})
            known: dict[str, int] = {}
            if uids:
                found = s.execute(
                    sa.select(BlueskyDocument.doc_uid, BlueskyDocument.id).where(BlueskyDocument.doc_uid.in_(uids))
                )
                known.update((str(uid), int(row_id)) for uid, row_id in found)
            # Every read before the first add: a query after an add would flush the session first.
            last = self._last_sequences(s, {p[0] for p in prepared})
            self._link_samples(s, [m for p in prepared for m in p[4]])
            # New rows go in as one multi-row INSERT … RETURNING (Core, not one ORM object and
            # one statement each: that was most of a run's write cost); a document seen twice in
            # the batch is stored once and both positions get its id.
            now = utcnow()
            values: list[dict[str, Any]] = []
            slots: list[tuple[bool, int]] = []  # per item: (new?, its row id or its index in values)
            new_at: dict[str, int] = {}
            for run_uid, name, doc, doc_uid, _ in prepared:
                if doc_uid is not None and doc_uid in known:
                    slots.append((False, known[doc_uid]))
                elif doc_uid is not None and doc_uid in new_at:
                    slots.append((True, new_at[doc_uid]))
                else:
                    last[run_uid] += 1
                    if doc_uid is not None:
                        new_at[doc_uid] = len(values)
                    slots.append((True, len(values)))
                    values.append({"run_uid": run_uid, "name": name, "sequence": last[run_uid], "doc_uid": doc_uid,
                                   "document": dict(doc), "created_at": now})
            ids: list[int] = []
            if values:
                ids = [int(i) for i in s.scalars(
                    sa.insert(BlueskyDocument).returning(BlueskyDocument.id, sort_by_parameter_order=True),
                    values)]
            measurement_rows = [m for p in prepared for m in p[4]]
            if measurement_rows:
                s.add_all(measurement_rows)
                s.flush()  # a refused measurement (duplicate event and property) fails this call
            return [ids[i] if new else i for new, i in slots]

    @staticmethod
    def _last_sequences(s: Session, run_uids: set[str | None]) -> dict[str | None, int]:
        """Each run's last document sequence number (0: none yet), in one query for all named runs."""
        last: dict[str | None, int] = dict.fromkeys(run_uids, 0)
        named = sorted(uid for uid in run_uids if uid is not None)
        if named:
            last.update(
                (str(uid), int(seq or 0))
                for uid, seq in s.execute(
                    sa.select(BlueskyDocument.run_uid, sa.func.max(BlueskyDocument.sequence))
                    .where(BlueskyDocument.run_uid.in_(named))
                    .group_by(BlueskyDocument.run_uid)
                )
            )
        if None in run_uids:
            last[None] = s.scalar(
                sa.select(sa.func.max(BlueskyDocument.sequence)).where(BlueskyDocument.run_uid.is_(None))
            ) or 0
        return last

    def runs(self, experiment_id: int | None = None) -> list[RunRecord]:
        """Bluesky runs (of one experiment), by start time."""
        query = sa.select(BlueskyRun)
        if experiment_id is not None:
            query = query.where(BlueskyRun.experiment_id == experiment_id)
        with self._tx("runs") as s:
            return [_record(RunRecord, r) for r in s.scalars(query.order_by(BlueskyRun.start_time, BlueskyRun.uid))]

    def documents(self, run_uid: str) -> list[DocumentRecord]:
        """The stored documents of a run, in arrival order."""
        with self._tx("documents") as s:
            rows = s.scalars(
                sa.select(BlueskyDocument).where(BlueskyDocument.run_uid == run_uid).order_by(BlueskyDocument.sequence)
            )
            return [_record(DocumentRecord, r) for r in rows]

    # ----------------------------------------------------------------- models, events

    def add_model_version(
        self,
        campaign_id: int,
        *,
        model: str,
        n_train: int,
        metrics: Mapping[str, Any],
        info: Mapping[str, Any] | None = None,
    ) -> int:
        """Record a trained model; its version is the next integer for (campaign, model)."""
        for attempt in range(3):
            try:
                with self._tx("add_model_version") as s:
                    last = s.scalar(
                        sa.select(sa.func.max(ModelVersion.version)).where(
                            ModelVersion.campaign_id == campaign_id, ModelVersion.model == model
                        )
                    )
                    row = ModelVersion(
                        campaign_id=campaign_id,
                        model=model,
                        version=(last or 0) + 1,
                        n_train=int(n_train),
                        metrics=to_jsonable(dict(metrics)),
                        info=to_jsonable(dict(info or {})),
                        created_at=utcnow(),
                    )
                    s.add(row)
                    s.flush()
                    self._event(
                        s,
                        "model.trained",
                        f"model {model} v{row.version} trained on {n_train} point(s)",
                        campaign_id=campaign_id,
                        payload={"model_version_id": row.id, "metrics": row.metrics},
                    )
                    return row.id
            except RepositoryError as exc:
                if attempt < 2 and isinstance(exc.__cause__, IntegrityError):
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def model_versions(self, campaign_id: int) -> list[ModelVersionRecord]:
        """Model versions of a campaign, oldest first."""
        with self._tx("model_versions") as s:
            rows = s.scalars(
                sa.select(ModelVersion).where(ModelVersion.campaign_id == campaign_id).order_by(ModelVersion.id)
            )
            return [_record(ModelVersionRecord, r) for r in rows]

    def log_event(
        self,
        kind: str,
        message: str,
        *,
        campaign_id: int | None = None,
        experiment_id: int | None = None,
        level: str = "info",
        payload: Mapping[str, Any] | None = None,
    ) -> int:
        """Append one row to the event log (there is no way to change or delete it)."""
        if level not in ("debug", "info", "warning", "error", "critical"):
            raise RepositoryError(f"event level {level!r} is not one of debug, info, warning, error, critical")
        with self._tx("log_event") as s:
            row = self._event(
                s, kind, message, campaign_id=campaign_id, experiment_id=experiment_id, level=level, payload=payload
            )
            s.flush()
            return row.id

    def events(
        self,
        campaign_id: int | None = None,
        kind: str | None = None,
        *,
        experiment_id: int | None = None,
    ) -> list[EventRecord]:
        """Events, oldest first, optionally of one campaign / experiment / kind (``kind`` may end in ``*``)."""
        query = sa.select(Event)
        if campaign_id is not None:
            query = query.where(Event.campaign_id == campaign_id)
        if experiment_id is not None:
            query = query.where(Event.experiment_id == experiment_id)
        if kind is not None:
            query = query.where(Event.kind.like(kind[:-1] + "%") if kind.endswith("*") else Event.kind == kind)
        with self._tx("events") as s:
            return [_record(EventRecord, r) for r in s.scalars(query.order_by(Event.id))]

    # ----------------------------------------------------------------- what the loop asks

    def measured_units(self, campaign_id: int) -> dict[str, set[str | None]]:
        """Property -> the units its ``ok`` measurements in one campaign carry (warm-start checks)."""
        query = (
            sa.select(Measurement.property, Measurement.unit)
            .join(Experiment, Experiment.id == Measurement.experiment_id)
            .where(Experiment.campaign_id == campaign_id, Measurement.quality == "ok")
            .distinct()
        )
        out: dict[str, set[str | None]] = {}
        with self._tx("measured_units") as s:
            for prop, unit in s.execute(query):
                out.setdefault(prop, set()).add(unit)
        return out

    def observations(self, campaign_id: int, property: str) -> list[ObservationRecord]:  # noqa: A002
        """Completed experiments with ``ok`` measurements of ``property`` (mean per experiment)."""
        query = (
            sa.select(
                Experiment.id,
                Experiment.candidate_key,
                Experiment.params,
                sa.func.avg(Measurement.value),
                sa.func.count(Measurement.id),
            )
            .join(Measurement, Measurement.experiment_id == Experiment.id)
            .where(
                Experiment.campaign_id == campaign_id,
                Experiment.state == "completed",
                Measurement.property == property,
                Measurement.quality == "ok",
            )
            .group_by(Experiment.id, Experiment.candidate_key, Experiment.params)
            .order_by(Experiment.id)
        )
        with self._tx("observations") as s:
            return [
                ObservationRecord(experiment_id=i, candidate_key=k, params=p, value=float(v), n_measurements=int(n))
                for i, k, p, v, n in s.execute(query)
            ]

    def record_computed_values(
        self, campaign_id: int, rows: Sequence[tuple[str, str, float, float]], *, property: str,  # noqa: A002
        model_version: str | None = None,
    ) -> int:
        """Keep ``(candidate key, source, value, cost)`` of cheap computed sources; returns how many were new.

        A value already kept for a (candidate, source) stays as it is (a resumed campaign computes
        nothing twice); a non-finite value is kept as NULL: the source has none for that candidate.
        """
        from sdl.repository.schema import ComputedValue

        with self._tx("record_computed_values") as s:
            known = {(k, src) for k, src in s.execute(sa.select(ComputedValue.candidate_key, ComputedValue.source)
                                                      .where(ComputedValue.campaign_id == campaign_id))}
            n = 0
            for key, source, value, cost in rows:
                if (key, source) in known:
                    continue
                known.add((key, source))
                s.add(ComputedValue(campaign_id=campaign_id, candidate_key=key, source=source, property=property,
                                    value=float(value) if math.isfinite(value) else None, cost=float(cost),
                                    model_version=model_version))
                n += 1
            return n

    def computed_values(self, campaign_id: int) -> list[tuple[str, str, float]]:
        """``(candidate key, source, value)`` of every kept computed value, oldest first (NaN: none)."""
        from sdl.repository.schema import ComputedValue

        query = (sa.select(ComputedValue.candidate_key, ComputedValue.source, ComputedValue.value)
                 .where(ComputedValue.campaign_id == campaign_id).order_by(ComputedValue.id))
        with self._tx("computed_values") as s:
            return [(k, src, math.nan if v is None else float(v)) for k, src, v in s.execute(query)]

    def best_so_far(
        self,
        campaign_id: int,
        property: str,  # noqa: A002
        goal: str,
        target_range: Sequence[float] | None = None,
    ) -> BestRecord | None:
        """The completed experiment whose mean ok value is best for ``goal`` (ties: the earliest)."""
        from sdl.engine.objectives import Objective

        try:
            objective = Objective(goal=goal, target_range=target_range)  # type: ignore[arg-type]
        except (ValueError, TypeError) as exc:
            raise RepositoryError(f"objective goal {goal!r}, target_range {target_range!r}: {exc}") from exc
        best: BestRecord | None = None
        for obs in self.observations(campaign_id, property):
            utility = objective.scalar_utility(obs.value)
            if best is None or utility > best.utility:
                best = BestRecord(obs.experiment_id, obs.candidate_key, obs.params, obs.value, utility)
        return best

    @staticmethod
    def _objective_of(snapshot: object) -> tuple[str | None, str, Sequence[float] | None]:
        objective = snapshot.get("objective") or snapshot.get("objectives") if isinstance(snapshot, Mapping) else None
        if isinstance(objective, list) and objective:  # several objectives: the first (what sdl run's best shows)
            objective = objective[0]
        if not isinstance(objective, Mapping):
            return None, "maximize", None
        return objective.get("property"), objective.get("goal", "maximize"), objective.get("target_range")

    def campaign_summaries(self) -> list[dict[str, Any]]:
        """One dict per campaign for ``sdl status``: counts per state, best value, measurement count."""
        with self._tx("campaign_summaries") as s:
            counts: dict[int, dict[str, int]] = {}
            for cid, state, n in s.execute(
                sa.select(Experiment.campaign_id, Experiment.state, sa.func.count()).group_by(
                    Experiment.campaign_id, Experiment.state
                )
            ):
                counts.setdefault(cid, {})[state] = int(n)
            n_meas = dict(
                s.execute(
                    sa.select(Experiment.campaign_id, sa.func.count(Measurement.id))
                    .join(Measurement, Measurement.experiment_id == Experiment.id)
                    .group_by(Experiment.campaign_id)
                ).all()
            )
            campaigns = [_record(CampaignRecord, r) for r in s.scalars(sa.select(Campaign).order_by(Campaign.id))]
        summaries = []
        for c in campaigns:
            prop, goal, target = self._objective_of(c.config_snapshot)
            best = None
            if prop is not None:
                try:
                    best = self.best_so_far(c.id, prop, goal, target)
                except RepositoryError as exc:
                    logger.warning("campaign %r: cannot compute best value: %s", c.name, exc)
            summaries.append(
                {
                    "id": c.id,
                    "name": c.name,
                    "state": c.state,
                    "budget": c.budget,
                    "counts": {state: counts.get(c.id, {}).get(state, 0) for state in EXPERIMENT_STATES},
                    "objective": prop,
                    "goal": goal,
                    "best_value": best.value if best else None,
                    "best_candidate": best.candidate_key if best else None,
                    "n_measurements": int(n_meas.get(c.id, 0)),
                    "created_at": c.created_at,
                    "updated_at": c.updated_at,
                }
            )
        return summaries

    def export_rows(self, campaign_name: str, objective_property: str | None = None) -> list[dict[str, Any]]:
        """One flat dict per experiment of a campaign, for ``sdl export``.

        Columns: ``experiment_id, campaign, state, candidate_key, material_id, formula, sample_uid``
        (the experiment's samples, comma-separated; None without one), ``param.<name>…``,
        ``<property>`` (mean of the ok measurements, None when there are none), ``<property>_n``
        and the provenance and timestamps. Raises RepositoryError for an unknown campaign.
        """
        campaign = self.get_campaign(campaign_name)
        if campaign is None:
            known = ", ".join(c.name for c in self.campaigns()) or "none"
            raise RepositoryError(f"no campaign named {campaign_name!r} (known: {known})")
        prop = objective_property or self._objective_of(campaign.config_snapshot)[0]
        values: dict[int, tuple[float, int]] = {}
        if prop is not None:
            with self._tx("export_rows") as s:
                for eid, mean, n in s.execute(
                    sa.select(Measurement.experiment_id, sa.func.avg(Measurement.value), sa.func.count())
                    .join(Experiment, Experiment.id == Measurement.experiment_id)
                    .where(
                        Experiment.campaign_id == campaign.id,
                        Measurement.property == prop,
                        Measurement.quality == "ok",
                    )
                    .group_by(Measurement.experiment_id)
                ):
                    values[eid] = (float(mean), int(n))
        experiments = self.experiments(campaign.id)
        formulas: dict[int, str | None] = {}
        sample_uids: dict[int, list[str]] = {}
        with self._tx("export_rows materials") as s:
            material_ids = {e.material_id for e in experiments if e.material_id is not None}
            if material_ids:
                formulas = dict(
                    s.execute(sa.select(Material.id, Material.formula).where(Material.id.in_(material_ids))).all()
                )
            for eid, uid in s.execute(
                sa.select(Sample.experiment_id, Sample.sample_uid)
                .join(Experiment, Experiment.id == Sample.experiment_id)
                .where(Experiment.campaign_id == campaign.id)
                .order_by(Sample.id)
            ):
                sample_uids.setdefault(eid, []).append(uid)
        param_names: list[str] = []
        for e in experiments:
            for k in e.params:
                if k not in param_names:
                    param_names.append(k)
        rows = []
        for e in experiments:
            row: dict[str, Any] = {
                "experiment_id": e.id,
                "campaign": campaign.name,
                "state": e.state,
                "candidate_key": e.candidate_key,
                "material_id": e.material_id,
                "formula": formulas.get(e.material_id) if e.material_id is not None else None,
                "sample_uid": ",".join(sample_uids[e.id]) if e.id in sample_uids else None,
            }
            for k in param_names:
                v = e.params.get(k)
                row[f"param.{k}"] = json.dumps(v) if isinstance(v, (dict, list)) else v
            if prop is not None:
                mean_n = values.get(e.id)
                row[prop] = mean_n[0] if mean_n else None
                row[f"{prop}_n"] = mean_n[1] if mean_n else 0
            row.update(
                {
                    "model_version": e.model_version,
                    "model_version_id": e.model_version_id,
                    "acquisition_value": e.acquisition_value,
                    "predicted_mean": e.predicted_mean,
                    "predicted_std": e.predicted_std,
                    "batch_id": e.batch_id,
                    "instruments": ",".join(e.instruments or []),
                    "failure_kind": e.failure_kind,
                    "failure_reason": e.failure_reason,
                    "proposed_at": e.proposed_at,
                    "started_at": e.started_at,
                    "finished_at": e.finished_at,
                }
            )
            rows.append(row)
        return rows

    # ----------------------------------------------------------------- bulk ingest

    def add_measurements_bulk(
        self,
        rows: Sequence[tuple[int, Mapping[str, Any]]],
        *,
        campaign_id: int | None = None,
        source: str | None = None,
    ) -> int:
        """Store many measurements in one transaction, all or nothing; returns how many.

        Why a separate path: one transaction and a handful of statements per *batch* (an event
        page, an imported file) instead of per value, so bulk data arrives at thousands of rows
        per second while every experiment state change keeps its own transaction. Experiments,
        runs and latest samples are looked up once per batch; rows go in as one executemany.

        Args:
            rows: ``(experiment_id, fields)`` pairs, fields as for :meth:`add_measurement`; an
                optional ``origin`` field (``results.csv line 7``) names the row in errors.
            campaign_id: Every row's experiment must belong to this campaign.
            source: Recorded with one ``measurements.bulk`` event per campaign touched.

        Raises:
            RepositoryError: One line naming the first bad row (its ``origin``, else ``row N``):
                not a number, unknown experiment or run, another campaign's experiment, or an
                ``(event_uid, property)`` stored twice. Nothing is written.
        """
        values = self._bulk_values(rows)
        if not values:
            return 0
        with self._tx("add_measurements_bulk") as s:
            campaigns = self._insert_measurements(s, values, campaign_id=campaign_id)
            if source is not None:
                for cid, count in sorted(campaigns.items()):
                    self._event(s, "measurements.bulk", f"{count} measurement(s) stored from {source}",
                                campaign_id=cid, payload={"count": count, "source": source})
        return len(values)

    def record_event_page(
        self,
        run_uid: str | None,
        doc: Mapping[str, Any],
        *,
        measurements: Sequence[tuple[int, Mapping[str, Any]]] = (),
    ) -> int:
        """Store one ``event_page`` document and its derived measurements in one transaction.

        The page is the unit Bluesky hands over for a bulk stream, so it is the unit of
        atomicity too: the document row and every measurement of the page, or nothing.
        Returns the document's row id.
        """
        values = self._bulk_values(measurements)
        with self._tx("record_event_page") as s:
            last = s.scalar(
                sa.select(sa.func.max(BlueskyDocument.sequence)).where(
                    BlueskyDocument.run_uid.is_(None) if run_uid is None else BlueskyDocument.run_uid == run_uid
                )
            )
            row = BlueskyDocument(run_uid=run_uid, name="event_page", sequence=(last or 0) + 1, doc_uid=None,
                                  document=to_jsonable(dict(doc)), created_at=utcnow())
            s.add(row)
            s.flush()
            if values:
                self._insert_measurements(s, values, campaign_id=None)
            return row.id

    def record_hand_results_bulk(
        self,
        campaign_id: int,
        results: Sequence[HandResult],
        *,
        by: str,
        property: str,  # noqa: A002 - the domain's word
        unit: str | None = None,
        amend: bool = False,
        source: str | None = None,
        others: Mapping[str, str | None] | None = None,
    ) -> list[HandOutcome]:
        """:meth:`record_hand_results` for a whole file: same rules, errors and rows, fewer statements.

        Still one transaction for the whole list (a bad row writes nothing) and still one
        checked transition plus one event row per state change; what changes is that the
        experiments, their latest samples and the values an amendment supersedes are read in a
        few ``IN`` queries, and the measurements go in as one executemany.

        Args:
            others: Several objectives: every other property an experiment is completed with, and
                its unit. A result that completes an experiment must then tell ``property`` and each
                of these (:attr:`HandResult.values`), in the transaction of the state change; an
                amendment may tell some of them, and supersedes the old values of those only.

        Raises:
            RepositoryError: As :meth:`record_hand_results`; also a property the campaign does not
                measure, or one missing from a result that completes an experiment.
        """
        hand = f"hands:{by}"
        now = utcnow()
        units: dict[str, str | None] = {property: unit, **{p: u for p, u in (others or {}).items() if p != property}}
        outcomes: list[HandOutcome] = []
        with self._tx("record_hand_results_bulk") as s:
            name = self._campaign_name(s, campaign_id)
            ids = sorted({r.experiment_id for r in results})
            experiments: dict[int, Experiment] = {}
            superseded: dict[int, list[Measurement]] = {}
            for chunk in _chunks(ids):
                for exp in s.scalars(sa.select(Experiment).where(Experiment.id.in_(chunk)).with_for_update()):
                    experiments[exp.id] = exp
            done = [i for i, e in experiments.items() if e.state == "completed" and e.campaign_id == campaign_id]
            for chunk in _chunks(done):
                for m in s.scalars(
                    sa.select(Measurement)
                    .where(Measurement.experiment_id.in_(chunk), Measurement.property.in_(list(units)),
                           Measurement.quality == "ok")
                    .order_by(Measurement.id)
                ):
                    superseded.setdefault(m.experiment_id, []).append(m)
            samples = self._latest_samples(s, ids)
            seen: dict[int, str] = {}
            values: list[dict[str, Any]] = []
            for result in results:
                where = f"{result.origin}: " if result.origin else ""
                eid = result.experiment_id
                if eid in seen:
                    raise RepositoryError(f"{where}experiment {eid} is told twice (also at {seen[eid]})")
                seen[eid] = result.origin or "?"
                told = result.told(property)
                if bool(told) == (result.failed is not None):
                    raise RepositoryError(f"{where}experiment {eid}: give either a value or a failure reason")
                row = experiments.get(eid)
                if row is None or row.campaign_id != campaign_id:
                    raise RepositoryError(f"{where}campaign {name!r} has no experiment {eid}")
                if source is not None and (row.provenance_extra or {}).get("source") != source:
                    raise RepositoryError(f"{where}experiment {eid} is not one of the campaign's {source!r} "
                                          f"experiments, and another process runs the campaign now")
                unknown = [p for p in told if p not in units]
                if unknown:
                    raise RepositoryError(f"{where}experiment {eid}: campaign {name!r} does not measure "
                                          f"{', '.join(unknown)} (its properties: {', '.join(units)})")
                missing = [p for p in units if p not in told]
                if told and missing and row.state != "completed":
                    raise RepositoryError(f"{where}experiment {eid}: no value of {', '.join(missing)} (campaign "
                                          f"{name!r} completes an experiment with {', '.join(units)})")
                rows: dict[str, dict[str, Any]] = {}
                for prop, number in told.items():
                    try:
                        rows[prop] = _measurement_values(
                            eid, {"property": prop, "value": number, "unit": units[prop], "instrument": hand,
                                  "timestamp": now}, now)
                    except RepositoryError as exc:
                        raise RepositoryError(f"{where}{exc}") from exc
                    rows[prop]["sample_id"] = samples.get(eid)
                outcomes.append(self._tell_bulk_one(s, row, result, rows, superseded.get(eid, []), where,
                                                    hand=hand, by=by, property=property, amend=amend, now=now,
                                                    several=len(units) > 1))
                values.extend(rows.values())
            if values:
                self._insert_rows(s, values)
        return outcomes

    def _tell_bulk_one(
        self,
        s: Session,
        row: Experiment,
        result: HandResult,
        rows: Mapping[str, dict[str, Any]],
        old: list[Measurement],
        where: str,
        *,
        hand: str,
        by: str,
        property: str,  # noqa: A002
        amend: bool,
        now: dt.datetime,
        several: bool,
    ) -> HandOutcome:
        """One result of :meth:`record_hand_results_bulk`: the checks and rows of ``_tell_one``.

        ``rows``: the measurement rows told, per property; ``old``: the experiment's ``ok`` values
        of the campaign's properties; ``several``: the campaign completes experiments with more than
        one property (events and outcomes then name each).
        """
        eid = row.id
        told = {p: float(r["value"]) for p, r in rows.items()}
        if row.state == "completed":
            props = list(dict.fromkeys([property, *(m.property for m in old)])) if several else [property]
            shown = "; ".join(f"{p} " + (", ".join(f"{m.value:g}" for m in old if m.property == p) or "no value")
                              for p in props)
            if not rows:
                raise ResultRefused(f"{where}experiment {eid} is already completed ({shown}): "
                                    "it cannot be marked failed")
            if not amend:
                raise ResultRefused(
                    f"{where}experiment {eid} is already completed ({shown}); rerun with --amend "
                    "to replace its value (the old one stays on record)"
                )
            replaced = {p: [m for m in old if m.property == p] for p in told}
            for ms in replaced.values():
                for m in ms:
                    m.quality = "superseded"
            before = {p: [m.value for m in ms] for p, ms in replaced.items()}
            change = ", ".join(f"{p} {', '.join(f'{v:g}' for v in before[p]) or 'no value'} → {v:g}"
                               for p, v in told.items())
            payload: dict[str, Any] = (
                {"old": before, "new": told} if several
                else {"old": before[property], "new": told[property]})
            self._event(
                s, "experiment.amended", f"experiment {eid}: {change} (by {by})",
                campaign_id=row.campaign_id, experiment_id=eid, level="warning",
                payload={**payload, "by": by, "origin": result.origin},
            )
            return HandOutcome(eid, row.candidate_key, "completed", told.get(property), None,
                               before.get(property, []), told if several else {}, before if several else {})
        if row.state in ("failed", "abandoned"):
            raise ResultRefused(f"{where}experiment {eid} is {row.state} ({row.failure_reason or 'no reason'}): "
                                "it cannot be told a result")
        if row.state == "proposed":
            self._move(s, row, "running", f"carried out by {hand}", payload={"instruments": [hand]},
                       instruments=[hand], started_at=now)
        if not rows:
            reason = str(result.failed)
            self._move(s, row, "failed", f"material: {reason}", payload={"kind": "material", "reason": reason},
                       failure_kind="material", failure_reason=reason, finished_at=now)
        else:
            self._move(s, row, "completed", f"told by {by}", finished_at=now)
        first = told.get(property)
        self._event(
            s, "experiment.told", f"experiment {eid} told by {by}: " + (
                ", ".join(f"{p} = {v:g}" for p, v in told.items()) if told else f"failed ({result.failed})"),
            campaign_id=row.campaign_id, experiment_id=eid,
            payload={"by": by, "value": first, "failed": result.failed, "origin": result.origin,
                     **({"values": told} if several else {})},
        )
        return HandOutcome(eid, row.candidate_key, row.state, first, result.failed, [], told if several else {})

    def _bulk_values(self, rows: Sequence[tuple[int, Mapping[str, Any]]]) -> list[dict[str, Any]]:
        """Validated column values of every row, each with its ``origin``; the first bad row raises."""
        values: list[dict[str, Any]] = []
        now = utcnow()
        for i, (eid, fields) in enumerate(rows):
            origin = str(fields.get("origin") or f"row {i + 1}")
            if isinstance(eid, bool) or not isinstance(eid, int):
                raise RepositoryError(f"{origin}: experiment {eid!r} is not an experiment id")
            try:
                value = _measurement_values(eid, fields, now)
            except RepositoryError as exc:
                raise RepositoryError(f"{origin}: {exc}") from exc
            value["origin"] = origin
            values.append(value)
        return values

    def _insert_measurements(
        self, s: Session, values: list[dict[str, Any]], *, campaign_id: int | None
    ) -> dict[int, int]:
        """Check a validated batch against the database, then insert it; returns rows per campaign."""
        ids = sorted({v["experiment_id"] for v in values})
        campaign_of: dict[int, int] = {}
        for chunk in _chunks(ids):
            found = s.execute(sa.select(Experiment.id, Experiment.campaign_id).where(Experiment.id.in_(chunk)))
            campaign_of.update(dict(found.all()))
        runs = sorted({v["run_uid"] for v in values if v["run_uid"] is not None})
        known_runs: set[str] = set()
        for run_chunk in _chunks(runs):
            known_runs.update(s.scalars(sa.select(BlueskyRun.uid).where(BlueskyRun.uid.in_(run_chunk))))
        wanted_samples = sorted({v["sample_id"] for v in values if v["sample_id"] is not None})
        sample_of: dict[int, int] = {}
        for sample_chunk in _chunks(wanted_samples):
            found_samples = s.execute(sa.select(Sample.id, Sample.experiment_id).where(Sample.id.in_(sample_chunk)))
            sample_of.update(dict(found_samples.all()))
        stored: set[tuple[str | None, str]] = set()
        event_uids = sorted({v["event_uid"] for v in values if v["event_uid"] is not None})
        for uid_chunk in _chunks(event_uids):
            for event_uid, prop in s.execute(sa.select(Measurement.event_uid, Measurement.property)
                                             .where(Measurement.event_uid.in_(uid_chunk))):
                stored.add((event_uid, prop))
        name = self._campaign_name(s, campaign_id) if campaign_id is not None else None
        counts: dict[int, int] = {}
        for v in values:
            origin, eid = v["origin"], v["experiment_id"]
            cid = campaign_of.get(eid)
            if cid is None:
                raise RepositoryError(f"{origin}: no experiment with id={eid}")
            if campaign_id is not None and cid != campaign_id:
                raise RepositoryError(f"{origin}: campaign {name!r} has no experiment {eid}")
            if v["sample_id"] is not None and sample_of.get(v["sample_id"]) != eid:
                raise RepositoryError(f"{origin}: experiment {eid} has no sample with id={v['sample_id']}")
            if v["run_uid"] is not None and v["run_uid"] not in known_runs:
                raise RepositoryError(f"{origin}: no Bluesky run {v['run_uid']!r}")
            if v["event_uid"] is not None:
                key = (v["event_uid"], v["property"])
                if key in stored:
                    raise RepositoryError(f"{origin}: {v['property']!r} of event {v['event_uid']} is already stored")
                stored.add(key)
            counts[cid] = counts.get(cid, 0) + 1
        samples = self._latest_samples(s, [eid for eid in ids if eid in campaign_of])
        for v in values:
            if v["sample_id"] is None:
                v["sample_id"] = samples.get(v["experiment_id"])
        self._insert_rows(s, values)
        return counts

    @staticmethod
    def _insert_rows(s: Session, values: Sequence[Mapping[str, Any]]) -> None:
        """Insert checked measurement rows in the session's transaction: COPY on PostgreSQL, else executemany.

        psycopg's executemany still sends one statement per row; ``COPY ... FROM STDIN`` streams
        the batch, which keeps PostgreSQL within reach of SQLite's in-process executemany.
        """
        raw = s.connection().connection.driver_connection
        if s.get_bind().dialect.name != "postgresql" or not _is_psycopg(raw):
            s.execute(sa.insert(_MEASUREMENTS), [{k: v[k] for k in _MEASUREMENT_COLUMNS} for v in values])
            return
        import psycopg

        assert isinstance(raw, psycopg.Connection)
        columns = ", ".join(_MEASUREMENT_COLUMNS)
        try:
            with raw.cursor() as cursor, cursor.copy(f"COPY measurements ({columns}) FROM STDIN") as copy:
                for v in values:
                    copy.write_row(tuple(v[k] for k in _MEASUREMENT_COLUMNS))
        except psycopg.Error as exc:
            raise RepositoryError(f"bulk insert of {len(values)} measurement(s) failed: "
                                  f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc

    @staticmethod
    def _latest_samples(s: Session, experiment_ids: Sequence[int]) -> dict[int, int]:
        """Each experiment's latest sample id (what :meth:`_link_samples` finds), in one query per chunk."""
        latest: dict[int, int] = {}
        for chunk in _chunks(sorted(set(experiment_ids))):
            found = s.execute(sa.select(Sample.experiment_id, sa.func.max(Sample.id))
                              .where(Sample.experiment_id.in_(chunk)).group_by(Sample.experiment_id))
            latest.update(dict(found.all()))
        return latest


# --------------------------------------------------------------------------- bulk ingest helpers

_MEASUREMENT_COLUMNS: Final = (
    "experiment_id", "sample_id", "property", "value", "unit", "uncertainty", "instrument", "timestamp",
    "quality", "run_uid", "event_uid",
)
"""The measurement columns a bulk insert fills (the id comes from the database)."""

_MEASUREMENTS: Final[sa.Table] = Measurement.metadata.tables["measurements"]
"""The measurements table, for Core inserts (an executemany, not one ORM object per row)."""

_RUNS: Final[sa.Table] = BlueskyRun.metadata.tables["bluesky_runs"]
"""The runs table, for Core statements (a run's start and stop)."""

BULK_CHUNK: Final = 900
"""Ids per ``IN (...)`` list: below every backend's bound-parameter limit."""


def _is_psycopg(connection: object) -> bool:
    """Whether a DBAPI connection is psycopg 3's (the driver that can COPY rows in)."""
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(connection, psycopg.Connection)


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """``items`` in slices of :data:`BULK_CHUNK` (nothing for an empty list)."""
    for start in range(0, len(items), BULK_CHUNK):
        yield items[start:start + BULK_CHUNK]


_TEXT_LIMITS: Final = {"property": 200, "unit": 50, "instrument": 200, "run_uid": 100, "event_uid": 100}
"""Column widths of the measurement's text fields (a longer value is refused, naming its row)."""


def _checked_measurement(experiment_id: int, m: Mapping[str, Any]) -> tuple[str, float, float | None, str]:
    """Property, value, uncertainty and quality of one measurement, checked the one way every path checks them."""
    prop = m.get("property")
    if not prop:
        raise RepositoryError(f"measurement of experiment {experiment_id} has no property name")
    value: Any = m.get("value")
    if isinstance(value, bool) or (not isinstance(value, (int, float)) and not hasattr(value, "__float__")):
        raise RepositoryError(f"measurement {prop!r} of experiment {experiment_id}: value {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise RepositoryError(f"measurement {prop!r}: value {value!r} is not a number") from exc
    if not math.isfinite(number):
        raise RepositoryError(f"measurement {prop!r} of experiment {experiment_id}: value {number} is not finite")
    unc = m.get("uncertainty")
    if unc is not None:
        try:
            unc = float(unc)
        except (TypeError, ValueError) as exc:
            raise RepositoryError(f"measurement {prop!r}: uncertainty {unc!r} is not a number") from exc
        if not math.isfinite(unc):
            unc = None
    quality = m.get("quality") or "ok"
    if not isinstance(quality, str) or len(quality) > 32:
        raise RepositoryError(f"measurement {prop!r}: quality flag {quality!r} must be a short string")
    return str(prop), number, unc, quality


def _measurement_values(experiment_id: int, m: Mapping[str, Any], now: dt.datetime) -> dict[str, Any]:
    """One measurement's column values, checked as :meth:`Store._measurement_row` checks them.

    Plain dicts rather than ORM rows: building an ORM object per value took a third of a bulk
    insert's time. Also refuses what the database would refuse later without naming the row:
    text longer than its column, a naive or non-datetime timestamp.
    """
    prop, number, unc, quality = _checked_measurement(experiment_id, m)
    when = m.get("timestamp") or now
    if not isinstance(when, dt.datetime) or when.tzinfo is None or when.utcoffset() is None:
        raise RepositoryError(f"measurement {prop!r}: timestamp {when!r} is not a timezone-aware datetime")
    row = {
        "experiment_id": experiment_id,
        "sample_id": m.get("sample_id"),
        "property": prop,
        "value": number,
        "unit": m.get("unit"),
        "uncertainty": unc,
        "instrument": m.get("instrument"),
        "timestamp": when,
        "quality": quality,
        "run_uid": m.get("run_uid"),
        "event_uid": m.get("event_uid"),
    }
    for name, limit in _TEXT_LIMITS.items():
        text = row[name]
        if text is not None and (not isinstance(text, str) or len(text) > limit):
            raise RepositoryError(f"measurement {prop!r}: {name} {str(text)[:60]!r} is not text of at most "
                                  f"{limit} characters")
    return row


# --------------------------------------------------------------------------- holding a lease


class CampaignLease:
    """A campaign's lease held for a ``with`` block: taken on entry, renewed, given back on exit.

    A daemon thread renews it every ``heartbeat_s``; a failed heartbeat (database away) is logged
    and retried, a lost lease (taken over by another runner) ends the thread, is kept in
    :attr:`lost` and handed to ``on_lost``: the runner must then call :meth:`check` between
    experiments, which raises it. Exit releases the lease, also when the block raised.

    Args:
        store: The repository.
        campaign_id: The campaign to run.
        holder: What runs it, in words (``sdl run``).
        heartbeat_s: Seconds between renewals (well below ``stale_after_s``).
        stale_after_s: Others may take the lease over after this long without a heartbeat.
        host: This runner's host (default ``socket.gethostname()``).
        pid: This runner's process id (default ``os.getpid()``).
        on_lost: Called (from the heartbeat thread) with the error when the lease is lost.
    """

    def __init__(
        self,
        store: Store,
        campaign_id: int,
        *,
        holder: str,
        heartbeat_s: float = 5.0,
        stale_after_s: float = 30.0,
        host: str | None = None,
        pid: int | None = None,
        on_lost: Callable[[CampaignLocked], None] | None = None,
    ) -> None:
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"need 0 < heartbeat_s < stale_after_s, got {heartbeat_s=}, {stale_after_s=}")
        self.store = store
        self.campaign_id = campaign_id
        self.holder = holder
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.host = host or socket.gethostname()
        self.pid = os.getpid() if pid is None else pid
        self.on_lost = on_lost
        self.token: str | None = None
        self.lost: CampaignLocked | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return (
            f"CampaignLease(campaign_id={self.campaign_id}, holder={self.holder!r}, host={self.host!r}, "
            f"pid={self.pid}, heartbeat_s={self.heartbeat_s:g}, stale_after_s={self.stale_after_s:g})"
        )

    def __enter__(self) -> CampaignLease:
        self.token = self.store.acquire_lease(
            self.campaign_id, holder=self.holder, host=self.host, pid=self.pid, stale_after_s=self.stale_after_s
        )
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"sdl-lease-{self.campaign_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.stale_after_s)
            self._thread = None
        if self.token is not None:
            try:
                self.store.release_lease(self.campaign_id, self.token)
            except RepositoryError as err:  # never hide the block's own error; the lease goes stale anyway
                logger.warning(
                    "campaign %d: lease not released (%s); it expires in %g s",
                    self.campaign_id,
                    err,
                    self.stale_after_s,
                )
            self.token = None

    def check(self) -> None:
        """Raise :class:`CampaignLocked` if another runner took the lease over."""
        if self.lost is not None:
            raise self.lost

    def _beat(self) -> None:
        token = self.token
        assert token is not None
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.store.renew_lease(self.campaign_id, token)
            except CampaignLocked as err:
                logger.error("%s", err)
                if self.on_lost is not None:  # told before `lost` is visible: whoever sees `lost` sees both
                    self.on_lost(err)
                self.lost = err
                return
            except RepositoryError as err:
                logger.warning(
                    "campaign %d: heartbeat failed, retrying in %g s: %s", self.campaign_id, self.heartbeat_s, err
                )


def hold_lease(
    store: Store,
    campaign_id: int,
    *,
    holder: str,
    heartbeat_s: float = 5.0,
    stale_after_s: float = 30.0,
    host: str | None = None,
    pid: int | None = None,
    on_lost: Callable[[CampaignLocked], None] | None = None,
) -> CampaignLease:
    """``with hold_lease(store, cid, holder="sdl run") as lease:`` runs the block as the campaign's one runner.

    See :class:`CampaignLease` (its arguments are this function's); raises :class:`CampaignLocked`
    on entry when another live runner has the campaign.
    """
    return CampaignLease(
        store,
        campaign_id,
        holder=holder,
        heartbeat_s=heartbeat_s,
        stale_after_s=stale_after_s,
        host=host,
        pid=pid,
        on_lost=on_lost,
    )
