"""The SQL knowledge repository: ORM tables, Alembic migrations and the :class:`Store`.

Never imports torch or prefect: any process (CLI, flow, document writer) can open it cheaply.
"""

from __future__ import annotations

from sdl.repository.store import (
    PROVENANCE_KEYS,
    SAMPLE_STATES,
    TRANSITIONS,
    BestRecord,
    CampaignRecord,
    DocumentRecord,
    EventRecord,
    ExperimentRecord,
    MaterialRecord,
    MeasurementRecord,
    ModelVersionRecord,
    ObservationRecord,
    RunRecord,
    SampleRecord,
    Store,
)

__all__ = [
    "Store",
    "TRANSITIONS",
    "PROVENANCE_KEYS",
    "SAMPLE_STATES",
    "BestRecord",
    "CampaignRecord",
    "DocumentRecord",
    "EventRecord",
    "ExperimentRecord",
    "MaterialRecord",
    "MeasurementRecord",
    "ModelVersionRecord",
    "ObservationRecord",
    "RunRecord",
    "SampleRecord",
]
