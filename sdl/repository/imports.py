"""Imports of earlier results: a CSV of measurements filed into a campaign's experiments in one go.

Why a module of its own: results measured elsewhere (an earlier lab notebook, an instrument's own
log, a second property measured later on the same samples) arrive by the thousand, and must land
all or nothing: one bad line names itself and nothing is written. The rows go through
:meth:`Store.add_measurements_bulk` (one transaction for the file, lookups once per file), so a
file of tens of thousands of values takes seconds, not minutes.

An import adds measurements only: it never changes an experiment's state (``sdl tell`` does
that), and it holds the campaign's lease while it writes, so it never races ``sdl run``.

Columns (header names, case-insensitive; other columns are ignored):

* ``experiment`` (the experiment id) or ``candidate`` (its candidate key in the campaign);
* ``value`` (required), ``property`` (default: the campaign's objective property);
* optional ``unit`` (default: the objective's unit for the objective property), ``uncertainty``,
  ``instrument`` (default ``import:<file name>``), ``quality`` (default ``ok``) and ``timestamp``
  (ISO 8601 with a time zone, e.g. ``2026-01-05T10:00:00Z``).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdl.exceptions import RepositoryError, SDLError
from sdl.repository.store import CampaignRecord, ExperimentRecord, Store, hold_lease

__all__ = ["ImportInputError", "ImportSummary", "import_results", "read_results_table"]

logger = logging.getLogger(__name__)


class ImportInputError(SDLError, ValueError):
    """A results file that cannot be imported; ``str(err)`` names the file and line."""


@dataclasses.dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_results` stored."""

    campaign: str
    path: Path
    measurements: int
    experiments: int
    properties: dict[str, int]


@dataclasses.dataclass(frozen=True)
class _Line:
    """One parsed CSV line, before its experiment is resolved."""

    where: str
    experiment: int | None
    candidate: str | None
    fields: dict[str, Any]


def _number(text: str, what: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ImportInputError(f"{where}: {what} {text!r} is not a number") from None
    if not math.isfinite(value):
        raise ImportInputError(f"{where}: {what} {text!r} is not a finite number")
    return value


def _timestamp(text: str, where: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ImportInputError(f"{where}: timestamp {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise ImportInputError(f"{where}: timestamp {text!r} has no time zone (add Z or +01:00)")
    return when.astimezone(dt.UTC)


def read_results_table(path: Path, *, default_property: str | None, default_unit: str | None) -> list[_Line]:
    """Parse a results CSV (see the module docstring); the first bad line raises ImportInputError."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ImportInputError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    if not {"experiment", "candidate"} & set(columns) or "value" not in columns:
        raise ImportInputError(f"{path} line 1: the header must name 'experiment' or 'candidate', and 'value' "
                               f"(found {', '.join(columns) or 'nothing'})")
    if "property" not in columns and default_property is None:
        raise ImportInputError(f"{path} line 1: no 'property' column and the campaign names no objective property")
    reader.fieldnames = columns
    instrument = f"import:{path.name}"
    lines: list[_Line] = []
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if None in row:
            raise ImportInputError(f"{where}: more cells than the header has columns")
        cells = {k: (v or "").strip() for k, v in row.items()}
        if not any(cells.values()):
            continue
        experiment: int | None = None
        if cells.get("experiment"):
            try:
                experiment = int(cells["experiment"])
            except ValueError:
                raise ImportInputError(f"{where}: experiment {cells['experiment']!r} is not an experiment id") from None
        candidate = cells.get("candidate") or None
        if experiment is None and candidate is None:
            raise ImportInputError(f"{where}: neither an experiment id nor a candidate")
        if not cells.get("value"):
            raise ImportInputError(f"{where}: no value")
        prop = cells.get("property") or default_property
        if not prop:
            raise ImportInputError(f"{where}: no property")
        fields: dict[str, Any] = {
            "property": prop,
            "value": _number(cells["value"], "value", where),
            "unit": cells.get("unit") or (default_unit if prop == default_property else None),
            "uncertainty": _number(cells["uncertainty"], "uncertainty", where) if cells.get("uncertainty") else None,
            "instrument": cells.get("instrument") or instrument,
            "quality": cells.get("quality") or "ok",
            "origin": where,
        }
        if cells.get("timestamp"):
            fields["timestamp"] = _timestamp(cells["timestamp"], where)
        lines.append(_Line(where, experiment, candidate, fields))
    if not lines:
        raise ImportInputError(f"{path}: no results in it")
    return lines


def _objective(record: CampaignRecord) -> tuple[str | None, str | None]:
    objective = record.config_snapshot.get("objective")
    if not isinstance(objective, Mapping):
        return None, None
    prop, unit = objective.get("property"), objective.get("unit")
    return (prop if isinstance(prop, str) and prop else None), (unit if isinstance(unit, str) and unit else None)


def _by_candidate(experiments: list[ExperimentRecord]) -> dict[str, list[ExperimentRecord]]:
    found: dict[str, list[ExperimentRecord]] = {}
    for e in experiments:
        if e.state != "abandoned":
            found.setdefault(e.candidate_key, []).append(e)
    return found


def _resolve(line: _Line, by_candidate: dict[str, list[ExperimentRecord]], campaign: str) -> int:
    """The experiment a line names: its id, or the one experiment of its candidate (completed first)."""
    if line.experiment is not None:
        return line.experiment
    assert line.candidate is not None
    matches = by_candidate.get(line.candidate, [])
    completed = [e for e in matches if e.state == "completed"]
    chosen = completed or matches
    if not chosen:
        raise ImportInputError(f"{line.where}: campaign {campaign!r} has no experiment of candidate {line.candidate!r}")
    if len(chosen) > 1:
        ids = ", ".join(str(e.id) for e in chosen)
        raise ImportInputError(f"{line.where}: candidate {line.candidate!r} has experiments {ids}: "
                               "name one in an 'experiment' column")
    return chosen[0].id


def import_results(store: Store, campaign: str, path: Path) -> ImportSummary:
    """File every line of ``path`` as a measurement of ``campaign``: one transaction, all or nothing.

    Raises:
        ImportInputError: A bad file or line (named); nothing was written.
        CampaignLocked: Another process (``sdl run``) holds the campaign now.
        RepositoryError: Unknown campaign, or a line the repository refuses (named).
    """
    record = store.get_campaign(campaign)
    if record is None:
        known = ", ".join(c.name for c in store.campaigns()) or "none"
        raise RepositoryError(f"no campaign named {campaign!r} in {store.url} (known: {known})")
    prop, unit = _objective(record)
    lines = read_results_table(path, default_property=prop, default_unit=unit)
    by_candidate = _by_candidate(store.experiments(record.id)) if any(ln.candidate for ln in lines) else {}
    rows = [(_resolve(line, by_candidate, record.name), line.fields) for line in lines]
    with hold_lease(store, record.id, holder=f"sdl import-results ({path.name})"):
        stored = store.add_measurements_bulk(rows, campaign_id=record.id, source=str(path))
    properties: dict[str, int] = {}
    for _, fields in rows:
        properties[fields["property"]] = properties.get(fields["property"], 0) + 1
    logger.info("imported %d measurement(s) from %s into %s", stored, path, record.name)
    return ImportSummary(record.name, path, stored, len({eid for eid, _ in rows}), properties)
