"""The SQL knowledge repository: ORM tables, Alembic migrations and the :class:`Store`.

Never imports torch or prefect: any process (CLI, flow, document writer) can open it cheaply.
"""

from __future__ import annotations

from sdl.repository.store import (
    ABSENT,
    PROVENANCE_KEYS,
    SAMPLE_STATES,
    TRANSITIONS,
    BestRecord,
    CampaignConfigChanged,
    CampaignLease,
    CampaignLocked,
    CampaignRecord,
    DocumentRecord,
    EventRecord,
    ExperimentRecord,
    HandOutcome,
    HandResult,
    LeaseRecord,
    MaterialMeasurementRecord,
    MaterialRecord,
    MeasurementRecord,
    ModelVersionRecord,
    ObservationRecord,
    ResultRefused,
    RunRecord,
    SampleRecord,
    Store,
    config_differences,
    hold_lease,
)

__all__ = [
    "Store",
    "CampaignLocked",
    "CampaignConfigChanged",
    "CampaignLease",
    "ResultRefused",
    "hold_lease",
    "config_differences",
    "ABSENT",
    "TRANSITIONS",
    "PROVENANCE_KEYS",
    "SAMPLE_STATES",
    "BestRecord",
    "CampaignRecord",
    "DocumentRecord",
    "EventRecord",
    "ExperimentRecord",
    "HandOutcome",
    "HandResult",
    "LeaseRecord",
    "MaterialMeasurementRecord",
    "MaterialRecord",
    "MeasurementRecord",
    "ModelVersionRecord",
    "ObservationRecord",
    "RunRecord",
    "SampleRecord",
]
