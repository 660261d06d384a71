"""Warm-start sources: what earlier campaigns measured, checked before a new campaign uses it.

Why here: which campaigns exist and what they measured is the repository's knowledge, and the
check has to run before the first experiment of the new campaign (at ``sdl run`` / ``sdl submit``),
so a typo in a campaign name or a source in another unit fails in one line instead of silently
seeding the model with nothing, or with kelvin read as degrees Celsius.

The values are the same per-experiment means of ``ok`` measurements the engine learns from in
its own campaign (:meth:`sdl.repository.store.Store.observations`). This module never imports torch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from sdl.exceptions import RepositoryError
from sdl.repository.store import Store

__all__ = ["SourceMeasurement", "TransferSourceError", "transfer_sources"]

logger = logging.getLogger(__name__)


class TransferSourceError(RepositoryError, ValueError):
    """A ``transfer:`` source the repository cannot provide; ``field`` names the YAML field."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SourceMeasurement:
    """One completed experiment of a source campaign: its candidate and mean ok value."""

    campaign: str
    candidate_key: str
    params: dict[str, Any]
    value: float


def _units_text(units: set[str]) -> str:
    return ", ".join(repr(u) for u in sorted(units))


def transfer_sources(
    store: Store,
    campaigns: Sequence[str] | str,
    property: str,  # noqa: A002 - the domain's word
    unit: str | None,
    *,
    exclude: str | None = None,
) -> list[SourceMeasurement]:
    """Every completed measurement of ``property`` in the source campaigns, oldest experiment first.

    Args:
        store: The repository.
        campaigns: Campaign names, or ``"all"``: every campaign except ``exclude`` that measured
            ``property`` (one in another unit is skipped with a warning: nobody listed it).
        property: The property the sources must have measured.
        unit: The unit they must have measured it in (None: not checked).
        exclude: This campaign's name (never its own source).

    Raises:
        TransferSourceError: A named campaign does not exist, measured no ``property``, or measured
            it in another unit (``field`` is ``transfer.campaigns`` or ``transfer.property``).
    """
    if campaigns == "all":
        records = [c for c in store.campaigns() if c.name != exclude]
        named = False
    else:
        records = []
        known = None
        for name in campaigns:
            rec = store.get_campaign(name)
            if rec is None:
                known = known if known is not None else sorted(c.name for c in store.campaigns() if c.name != exclude)
                raise TransferSourceError(
                    f"campaign {name!r} does not exist in the repository "
                    f"(campaigns there: {', '.join(known) if known else 'none'})", field="transfer.campaigns")
            records.append(rec)
        named = True
    out: list[SourceMeasurement] = []
    for rec in records:
        units = store.measured_units(rec.id)
        if property not in units:
            if named:
                other = ", ".join(sorted(units)) or "nothing yet"
                raise TransferSourceError(f"campaign {rec.name!r} measured no {property!r} (it measured: {other})",
                                          field="transfer.campaigns")
            continue
        got = {u for u in units[property] if u is not None}
        if not got:  # the instrument gave no unit: the source's objective says it, if it is this property
            objective = (rec.config_snapshot or {}).get("objective")
            if isinstance(objective, dict) and objective.get("property") == property and objective.get("unit"):
                got = {str(objective["unit"])}
        if unit is not None and got and got != {unit}:
            message = (f"campaign {rec.name!r} measured {property!r} in {_units_text(got)}, "
                       f"this campaign in {unit!r}")
            if named:
                raise TransferSourceError(message, field="transfer.campaigns")
            logger.warning("transfer: all: %s; skipped", message)
            continue
        rows = store.observations(rec.id, property)
        out.extend(SourceMeasurement(rec.name, o.candidate_key, dict(o.params or {}), o.value) for o in rows)
        logger.info("transfer: %d measurements of %r from campaign %r", len(rows), property, rec.name)
    return out
