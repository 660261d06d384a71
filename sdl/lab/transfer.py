"""Warm start of a campaign's engine from earlier campaigns (``transfer:``), checked before it runs.

The lab asks the repository for the sources (:mod:`sdl.repository.transfer`), turns a refusal into
the one-line ``file:line transfer.campaigns: ...`` error of a bad YAML, and hands the measurements
to the engine as related data (:meth:`sdl.engine.Engine.add_related`): never as observations, so
nothing of the new campaign's bookkeeping (ledger, budget, status) ever sees them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sdl.config import CampaignConfig, config_error
from sdl.repository.transfer import SourceMeasurement, TransferSourceError, transfer_sources

if TYPE_CHECKING:
    from sdl.engine.models.multitask import RelatedData
    from sdl.repository.store import Store

__all__ = ["check_transfer", "load_related", "source_measurements"]

logger = logging.getLogger(__name__)


def source_measurements(cfg: CampaignConfig, store: Store) -> list[SourceMeasurement]:
    """The measurements ``cfg.transfer`` names ([] without ``transfer:``).

    Raises:
        CampaignConfigError: ``file:line transfer.campaigns: ...`` for a source that does not exist,
            measured another property, or measured it in another unit.
    """
    t = cfg.transfer
    if t is None:
        return []
    prop = t.property or cfg.objective.property
    unit = cfg.objective.unit if prop == cfg.objective.property else None
    try:
        rows = transfer_sources(store, t.campaigns, prop, unit, exclude=cfg.name)
    except TransferSourceError as exc:
        raise config_error(cfg, exc.field, str(exc)) from None
    if not rows:
        logger.warning("campaign %r: transfer: no earlier measurements of %r yet; starting cold", cfg.name, prop)
    return rows


def check_transfer(cfg: CampaignConfig, database_url: str) -> int:
    """Check ``cfg.transfer`` against the repository at ``database_url`` (``sdl run`` / ``sdl submit``).

    Returns:
        How many source measurements there are (0 without ``transfer:``).

    Raises:
        CampaignConfigError: As :func:`source_measurements`.
    """
    if cfg.transfer is None:
        return 0
    from sdl.repository import Store

    store = Store.from_url(database_url, create=True)
    try:
        return len(source_measurements(cfg, store))
    finally:
        store.close()


def load_related(cfg: CampaignConfig, store: Store) -> RelatedData | None:
    """The engine's related data for ``cfg.transfer`` (None without it, or when there is nothing yet).

    Raises:
        CampaignConfigError: As :func:`source_measurements`.
    """
    rows = source_measurements(cfg, store)
    if not rows:
        return None
    from sdl.engine.models.multitask import RelatedData

    return RelatedData.from_rows([(r.campaign, r.candidate_key, r.params, r.value) for r in rows])
