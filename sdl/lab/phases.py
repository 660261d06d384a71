"""XRD phase identification in the lab: a detector for each station that asks for it, and its verdict.

Why "target not formed" is a material failure: the instrument did its job (the robot made a
sample, the station measured it); the chemistry produced something else. So the experiment
ends ``failed`` with kind ``material`` and the identified phase in its reason, the engine never
proposes the candidate again, nothing is retried and no outage is waited for. The verdict is
read back from the repository (the ``target_formed`` measurement of the run and the summary in
the same event), so the lab and a later reader of the database see the same reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymatgen.core import Structure

    from devices.phase_detector import XRDPhaseDetector
    from devices.station import CharacterizationStation
    from sdl.config import CampaignConfig
    from sdl.repository.store import Store
    from sdl.xrd import PhaseTable

__all__ = ["TARGET_FORMED", "TARGET_FRACTION", "load_phase_tables", "phase_detectors", "phase_failure"]

logger = logging.getLogger(__name__)

TARGET_FORMED = "target_formed"
"""Measurement property of the verdict: 1.0 when the target phase formed, 0.0 when not."""
TARGET_FRACTION = "target_phase_fraction"
"""Measurement property of the target's share of the diffracted intensity."""


def load_phase_tables(cfg: CampaignConfig) -> dict[str, PhaseTable]:
    """Every phase table the campaign names (phase identification, simulated impurities), by path.

    Called before anything is written, so that a table without its columns or with a bad formula
    stops the campaign in one line naming the file and the row.

    Raises:
        PhaseTableError: A table cannot be read.
    """
    from sdl.xrd import PhaseTable

    tables: dict[str, PhaseTable] = {}
    for inst in cfg.instruments:
        wanted = []
        if inst.phase_identification is not None and inst.phase_identification.enabled:
            wanted.append(inst.phase_identification.competing_phases)
        if inst.simulated and inst.simulator.impurity_rate > 0 and inst.impurity_phases is not None:
            wanted.append(inst.impurity_phases)
        for path in wanted:
            if str(path) not in tables:
                tables[str(path)] = PhaseTable.load(path)
    return tables


def phase_detectors(
    cfg: CampaignConfig,
    stations: dict[str, CharacterizationStation],
    structure_of: Callable[[str], Structure],
    tables: dict[str, PhaseTable] | None = None,
) -> dict[str, XRDPhaseDetector]:
    """An :class:`~devices.phase_detector.XRDPhaseDetector` per station with ``phase_identification`` on.

    Stations that share a competing-phases file share its table and the cached reference patterns.

    Args:
        cfg: The campaign.
        stations: Connected stations by instrument name (built with ``raw=True`` where needed).
        structure_of: Candidate id → its structure (the pool's).
        tables: Tables already loaded (:func:`load_phase_tables`); others are loaded here.

    Raises:
        PhaseTableError: A competing-phases file cannot be read (the message names it).
    """
    from devices.phase_detector import XRDPhaseDetector
    from sdl.xrd import PhaseIdentifier, PhaseTable, ProfileGrid, Reference, ReferenceLibrary

    loaded = dict(tables or {})
    libraries: dict[str, ReferenceLibrary] = {}
    out: dict[str, XRDPhaseDetector] = {}
    for inst in cfg.instruments:
        options = inst.phase_identification
        if options is None or not options.enabled or inst.name not in stations:
            continue
        path = str(options.competing_phases)
        if path not in libraries:
            table = loaded.get(path) or PhaseTable.load(options.competing_phases)
            libraries[path] = ReferenceLibrary(table)
        library = libraries[path]

        def references(candidate: str, library: ReferenceLibrary = library) -> tuple[Reference, list[Reference]]:
            return library.references(candidate, structure_of(candidate))

        identifier = PhaseIdentifier(threshold=options.threshold, min_fit=options.min_fit,
                                     grid=ProfileGrid(fwhm=options.fwhm_deg), max_strain=options.max_strain)
        out[inst.name] = XRDPhaseDetector(name=f"{inst.name}_phases", station=stations[inst.name],
                                          references=references, identifier=identifier)
        logger.info("station %s: phase identification against %s (%r)", inst.name, path, identifier)
    return out


def phase_failure(store: Store, experiment_id: int, run_uids: Iterable[str], summary_key: str) -> str | None:
    """Why the target did not form in these runs (the detector's summary), or None when it did.

    Args:
        store: The repository.
        experiment_id: The experiment.
        run_uids: The characterization runs to look at.
        summary_key: Event data key of the detector's one-line summary.
    """
    runs = set(run_uids)
    verdicts = [m for m in store.measurements(experiment_id=experiment_id)
                if m.property == TARGET_FORMED and m.run_uid in runs and m.quality == "ok"]
    failed = [m for m in verdicts if m.value < 0.5]
    if not failed:
        return None
    last = failed[-1]
    if last.run_uid is not None:
        for doc in store.documents(last.run_uid):
            if doc.name == "event" and doc.doc_uid == last.event_uid:
                summary = (doc.document.get("data") or {}).get(summary_key)
                if isinstance(summary, str) and summary:
                    return summary
    return f"target phase not formed (XRD verdict of run {last.run_uid})"
