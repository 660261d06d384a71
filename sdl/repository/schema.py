"""SQLAlchemy 2 ORM tables of the knowledge repository.

One declarative ``Base`` whose ``metadata`` is what the Alembic revisions in
``sdl/repository/migrations/versions`` build (a test compares the two). Two portable column
types keep SQLite and PostgreSQL behaving the same: :class:`UTCDateTime` (timezone-aware
datetimes, stored as UTC on both backends, read back with ``tzinfo=UTC``) and :data:`JSONType`
(``JSON`` on SQLite, ``JSONB`` on PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "ComputedValue",
    "UTCDateTime",
    "JSONType",
    "utcnow",
    "CAMPAIGN_STATES",
    "EXPERIMENT_STATES",
    "FAILURE_KINDS",
    "Campaign",
    "Lease",
    "Material",
    "Experiment",
    "Sample",
    "Measurement",
    "BlueskyRun",
    "BlueskyDocument",
    "ModelVersion",
    "Event",
    "CONTROL_STATES",
    "APPROVAL_DECISIONS",
    "CampaignControl",
    "Approval",
]

CAMPAIGN_STATES = ("running", "completed", "stopped", "failed")
EXPERIMENT_STATES = ("proposed", "running", "completed", "failed", "abandoned")
FAILURE_KINDS = ("instrument", "material")


def utcnow() -> dt.datetime:
    """The current time, timezone-aware in UTC (the only kind of time the repository stores)."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.types.TypeDecorator[dt.datetime]):
    """A timezone-aware datetime stored as UTC.

    SQLite has no timezone type, PostgreSQL returns times in the session's zone: converting on
    the way in and out makes both backends give back exactly the instant that was written.
    Naive datetimes are refused, since their zone is a guess.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: the repository stores timezone-aware UTC times only")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: sa.Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
"""JSON on SQLite, JSONB on PostgreSQL (indexable, de-duplicated keys)."""

_NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    """Declarative base with a naming convention, so that migrations name constraints the same way."""

    metadata = sa.MetaData(naming_convention=_NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dt.datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        float: sa.Double(),
    }


class Campaign(Base):
    """One closed-loop campaign, identified by its name; keeps the config it ran with."""

    __tablename__ = "campaigns"
    __table_args__ = (sa.CheckConstraint(_in("state", CAMPAIGN_STATES), name="state"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    description: Mapped[str] = mapped_column(sa.Text, default="")
    config_snapshot: Mapped[dict[str, Any]]
    config_hash: Mapped[str] = mapped_column(sa.String(128))
    code_version: Mapped[str | None] = mapped_column(sa.String(100))
    seed: Mapped[int | None]
    budget: Mapped[int | None]
    state: Mapped[str] = mapped_column(sa.String(20), default="running")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Lease(Base):
    """Who runs a campaign right now: at most one row per campaign, absent when nobody does.

    A runner writes ``heartbeat_at`` every few seconds; a row whose heartbeat is old, or whose
    process is gone from this host, may be taken over (see :meth:`Store.acquire_lease`).
    """

    __tablename__ = "campaign_leases"

    campaign_id: Mapped[int] = mapped_column(sa.ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    token: Mapped[str] = mapped_column(sa.String(64))
    holder: Mapped[str] = mapped_column(sa.String(200))
    host: Mapped[str] = mapped_column(sa.String(255))
    pid: Mapped[int]
    acquired_at: Mapped[dt.datetime]
    heartbeat_at: Mapped[dt.datetime]


class Material(Base):
    """A material or candidate, de-duplicated across campaigns by its canonical key."""

    __tablename__ = "materials"

    id: Mapped[int] = mapped_column(primary_key=True)
    canonical_key: Mapped[str] = mapped_column(sa.String(512), unique=True)
    formula: Mapped[str | None] = mapped_column(sa.String(200), index=True)
    structure: Mapped[dict[str, Any] | None]
    cif: Mapped[str | None] = mapped_column(sa.Text)
    params: Mapped[dict[str, Any] | None]
    source_id: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Experiment(Base):
    """One proposed experiment and its life: proposed → running → completed | failed | abandoned."""

    __tablename__ = "experiments"
    __table_args__ = (
        sa.CheckConstraint(_in("state", EXPERIMENT_STATES), name="state"),
        sa.CheckConstraint(f"failure_kind IS NULL OR {_in('failure_kind', FAILURE_KINDS)}", name="failure_kind"),
        sa.Index("ix_experiments_campaign_id_state", "campaign_id", "state"),
        sa.Index("ix_experiments_campaign_id_candidate_key", "campaign_id", "candidate_key"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(sa.ForeignKey("campaigns.id", ondelete="CASCADE"))
    material_id: Mapped[int | None] = mapped_column(sa.ForeignKey("materials.id"), index=True)
    candidate_key: Mapped[str] = mapped_column(sa.String(512))
    params: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(sa.String(20), default="proposed")
    idempotency_key: Mapped[str] = mapped_column(sa.String(200), unique=True)
    # provenance of the proposal
    model_version_id: Mapped[int | None] = mapped_column(sa.ForeignKey("model_versions.id"))
    model_version: Mapped[str | None] = mapped_column(sa.String(200))
    acquisition_value: Mapped[float | None]
    predicted_mean: Mapped[float | None]
    predicted_std: Mapped[float | None]
    batch_id: Mapped[str | None] = mapped_column(sa.String(200), index=True)
    provenance_extra: Mapped[dict[str, Any] | None]
    instruments: Mapped[list[str] | None] = mapped_column(JSONType)
    failure_kind: Mapped[str | None] = mapped_column(sa.String(20))
    failure_reason: Mapped[str | None] = mapped_column(sa.Text)
    proposed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]


class Sample(Base):
    """A physical sample made for an experiment, named by the robot's own uid."""

    __tablename__ = "samples"
    __table_args__ = (sa.UniqueConstraint("instrument", "sample_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(sa.ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    instrument: Mapped[str] = mapped_column(sa.String(200))
    sample_uid: Mapped[str] = mapped_column(sa.String(200))
    state: Mapped[str] = mapped_column(sa.String(40))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class BlueskyRun(Base):
    """One Bluesky run (start … stop), linked to the experiment named in its start metadata."""

    __tablename__ = "bluesky_runs"

    uid: Mapped[str] = mapped_column(sa.String(100), primary_key=True)
    experiment_id: Mapped[int | None] = mapped_column(sa.ForeignKey("experiments.id"), index=True)
    plan_name: Mapped[str | None] = mapped_column(sa.String(200))
    exit_status: Mapped[str | None] = mapped_column(sa.String(40))
    reason: Mapped[str | None] = mapped_column(sa.Text)
    start_time: Mapped[dt.datetime]
    stop_time: Mapped[dt.datetime | None]


class BlueskyDocument(Base):
    """Every document of every run, in arrival order, exactly as the RunEngine emitted it."""

    __tablename__ = "bluesky_documents"
    __table_args__ = (sa.UniqueConstraint("run_uid", "sequence"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    run_uid: Mapped[str | None] = mapped_column(sa.ForeignKey("bluesky_runs.uid"))
    name: Mapped[str] = mapped_column(sa.String(40))
    sequence: Mapped[int]
    doc_uid: Mapped[str | None] = mapped_column(sa.String(200), unique=True)
    document: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Measurement(Base):
    """One measured value of one property; the engine learns only from ``quality='ok'`` ones."""

    __tablename__ = "measurements"
    __table_args__ = (
        sa.UniqueConstraint("event_uid", "property"),
        sa.Index("ix_measurements_property_quality", "property", "quality"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    experiment_id: Mapped[int] = mapped_column(sa.ForeignKey("experiments.id", ondelete="CASCADE"), index=True)
    sample_id: Mapped[int | None] = mapped_column(sa.ForeignKey("samples.id"))
    property: Mapped[str] = mapped_column(sa.String(200))
    value: Mapped[float]
    unit: Mapped[str | None] = mapped_column(sa.String(50))
    uncertainty: Mapped[float | None]
    instrument: Mapped[str | None] = mapped_column(sa.String(200))
    timestamp: Mapped[dt.datetime] = mapped_column(default=utcnow)
    quality: Mapped[str] = mapped_column(sa.String(32), default="ok")
    run_uid: Mapped[str | None] = mapped_column(sa.ForeignKey("bluesky_runs.uid"), index=True)
    event_uid: Mapped[str | None] = mapped_column(sa.String(100))


class ModelVersion(Base):
    """A trained surrogate of a campaign, with its metrics and how to rebuild it."""

    __tablename__ = "model_versions"
    __table_args__ = (sa.UniqueConstraint("campaign_id", "model", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(sa.ForeignKey("campaigns.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(sa.String(100))
    version: Mapped[int]
    n_train: Mapped[int]
    metrics: Mapped[dict[str, Any]]
    info: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Event(Base):
    """Append-only log of everything that happened (a trigger rejects UPDATE and DELETE)."""

    __tablename__ = "events"
    __table_args__ = (
        sa.Index("ix_events_campaign_id_kind", "campaign_id", "kind"),
        sa.Index("ix_events_experiment_id", "experiment_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    ts: Mapped[dt.datetime] = mapped_column(default=utcnow)
    campaign_id: Mapped[int | None] = mapped_column(sa.ForeignKey("campaigns.id"))
    experiment_id: Mapped[int | None] = mapped_column(sa.ForeignKey("experiments.id"))
    kind: Mapped[str] = mapped_column(sa.String(100))
    level: Mapped[str] = mapped_column(sa.String(20), default="info")
    message: Mapped[str] = mapped_column(sa.Text)
    payload: Mapped[dict[str, Any] | None]


CONTROL_STATES = ("running", "paused", "cancelling", "cancelled")
APPROVAL_DECISIONS = ("pending", "accepted", "dropped", "edited", "superseded")


class CampaignControl(Base):
    """What a person asked of a running campaign (pause, resume, cancel): one row per campaign.

    Written by ``sdl pause/resume/cancel`` (any process, any host), polled by the runner, which
    also records here the Prefect flow run it reports to (so that others can find it).
    """

    __tablename__ = "campaign_controls"
    __table_args__ = (sa.CheckConstraint(_in("state", CONTROL_STATES), name="state"),)

    campaign_id: Mapped[int] = mapped_column(sa.ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    state: Mapped[str] = mapped_column(sa.String(20), default="running")
    requested_by: Mapped[str] = mapped_column(sa.String(200), default="")
    reason: Mapped[str] = mapped_column(sa.Text, default="")
    flow_run_id: Mapped[str | None] = mapped_column(sa.String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Approval(Base):
    """One proposal that waited for a person, and what they decided (who, when, through what).

    ``pending`` rows are the batch waiting now; an accepted or edited proposal becomes the
    experiment ``experiment_id``; a dropped one never becomes an experiment and its candidate is
    never proposed again.
    """

    __tablename__ = "approvals"
    __table_args__ = (
        sa.CheckConstraint(_in("decision", APPROVAL_DECISIONS), name="decision"),
        sa.Index("ix_approvals_campaign_id_decision", "campaign_id", "decision"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(sa.ForeignKey("campaigns.id", ondelete="CASCADE"))
    batch_id: Mapped[str | None] = mapped_column(sa.String(100))
    candidate_key: Mapped[str] = mapped_column(sa.String(512))
    params: Mapped[dict[str, Any]]
    predicted_mean: Mapped[float | None]
    predicted_std: Mapped[float | None]
    decision: Mapped[str] = mapped_column(sa.String(20), default="pending")
    edited_candidate_key: Mapped[str | None] = mapped_column(sa.String(512))
    edited_params: Mapped[dict[str, Any] | None]
    decided_by: Mapped[str | None] = mapped_column(sa.String(200))
    via: Mapped[str | None] = mapped_column(sa.String(50))
    experiment_id: Mapped[int | None] = mapped_column(sa.ForeignKey("experiments.id"))
    proposed_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    decided_at: Mapped[dt.datetime | None]


class ComputedValue(Base):
    """One value of a cheap computed source (``fidelities:``) for a candidate: no experiment, no sample.

    Its own table, not a measurement: a measurement belongs to an experiment, and a computed value
    must never count as one (budget, discoveries); it is kept so that a resumed campaign knows it.
    ``value`` is NULL where the source has none for the candidate (it is never asked again).
    """

    __tablename__ = "computed_values"
    __table_args__ = (sa.UniqueConstraint("campaign_id", "candidate_key", "source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    campaign_id: Mapped[int] = mapped_column(sa.ForeignKey("campaigns.id", ondelete="CASCADE"))
    candidate_key: Mapped[str] = mapped_column(sa.String(512))
    source: Mapped[str] = mapped_column(sa.String(200))
    property: Mapped[str] = mapped_column(sa.String(200))
    value: Mapped[float | None]
    cost: Mapped[float]
    model_version: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
