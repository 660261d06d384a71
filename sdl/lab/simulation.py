"""Simulator subprocesses for the ``simulated: true`` instruments of a campaign.

Why: a campaign must run end to end through pyserial with no set-up (CI, the demo). ``sdl run``
starts one simulator process per simulated instrument on a free port (``simulators.server``, the
code behind ``sdl simulate``), reads the URL it prints first, and stops the processes at the end.
Each simulator keeps a journal of its jobs in a file next to the database, named after the
campaign and the instrument, so that after a crash the new simulator (same journal) can tell the
resumed campaign which jobs finished: that is how an experiment caught mid-run is reconciled
instead of being synthesized twice. ``exit_with_parent`` makes a simulator die with ``sdl run``
even on ``kill -9``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdl.engine.objectives import Objective
from sdl.exceptions import InstrumentConnectionError

__all__ = ["SimulatorFleet", "journal_path", "world_best", "world_rank", "world_values"]

logger = logging.getLogger(__name__)


def journal_path(state_dir: Path, campaign: str, instrument: str) -> Path:
    """Journal file of one simulated instrument of one campaign (stable across restarts)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{campaign}.{instrument}")
    return Path(state_dir) / f"{safe}.journal.jsonl"


@dataclass
class SimulatorFleet:
    """The simulators of one campaign; a context manager that stops them all at the end.

    Args:
        state_dir: Directory for journals and logs (next to the database).
        campaign: Campaign name (journal files are named after it and the instrument).
        time_scale: Overrides every instrument's ``simulator.time_scale`` when set.
    """

    state_dir: Path
    campaign: str
    time_scale: float | None = None
    processes: dict[str, Any] = field(default_factory=dict)

    def start(self, instruments: Iterable[Any], seed: int = 0) -> dict[str, str]:
        """Start a simulator for each ``simulated`` instrument; return ``{name: url}``.

        Args:
            instruments: ``sdl.config`` instrument entries.
            seed: Campaign seed; an instrument without its own ``simulator.seed`` gets
                ``seed + index`` so that faults are reproducible but differ between instruments.

        Raises:
            InstrumentConnectionError: A simulator did not start (the message names it and its log).
        """
        from simulators.server import start_simulator

        self.state_dir = Path(self.state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        urls: dict[str, str] = {}
        started = time.monotonic()
        try:
            for index, inst in enumerate(instruments):
                if not inst.simulated:
                    continue
                sim = inst.simulator
                log = self.state_dir / f"{self.campaign}.{inst.name}.log"
                try:
                    proc = start_simulator(
                        inst.world,
                        instrument="robot" if inst.role == "synthesis" else "station",
                        journal=journal_path(self.state_dir, self.campaign, inst.name),
                        exit_with_parent=True,
                        time_scale=self.time_scale if self.time_scale is not None else sim.time_scale,
                        seed=sim.seed if sim.seed is not None else seed + index,
                        noise_std=sim.noise_std or None,
                        off_table=sim.off_table,
                        properties=list(inst.measures) or None,
                        serial=f"SIM-{inst.name}",
                        faults=sim.faults.model_dump(),
                        outage_after_s=sim.outage_after_s,
                        outage_s=sim.outage_s,
                        impurity_rate=sim.impurity_rate or None,
                        impurity_phases=inst.impurity_phases if sim.impurity_rate else None,
                        xrd_strain=sim.xrd_strain or None,
                        xrd_intensity_noise=sim.xrd_intensity_noise or None,
                        tolerance_factor=(f"{sim.tolerance_factor.low},{sim.tolerance_factor.high}"
                                          if sim.tolerance_factor is not None else None),
                        tolerance_unjudged=sim.tolerance_factor.unjudged if sim.tolerance_factor is not None else None,
                        log_level="INFO",  # the log then lists every injected fault: an audit trail
                        log_path=log,
                    )
                except RuntimeError as exc:
                    raise InstrumentConnectionError(
                        f"simulator did not start: {exc} (log: {log})", instrument=inst.name
                    ) from exc
                self.processes[inst.name] = proc
                urls[inst.name] = proc.url
                logger.info("simulated instrument %s listening at %s", inst.name, proc.url)
        except BaseException:
            self.stop()
            raise
        logger.info("started %d simulator(s) in %.1f s", len(urls), time.monotonic() - started)
        return urls

    def journal(self, name: str) -> Path:
        """Journal path of instrument ``name``."""
        return journal_path(self.state_dir, self.campaign, name)

    def stop(self) -> None:
        """Stop every simulator this fleet started."""
        for proc in self.processes.values():
            proc.stop()
        self.processes.clear()

    def __enter__(self) -> SimulatorFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _world_column(cfg: Any) -> tuple[Any, Objective] | None:
    """The simulated world's table and the objective, when a simulated instrument measures it."""
    import pandas as pd

    prop = cfg.objective.property
    for inst in cfg.instruments:
        if inst.simulated and inst.world is not None and prop in inst.measures:
            try:
                frame = pd.read_csv(inst.world)
            except Exception:
                logger.warning("could not read the world %s", inst.world, exc_info=True)
                return None
            if prop not in frame.columns:
                return None
            return frame, Objective.from_any(cfg.objective)
    return None


def world_best(cfg: Any) -> tuple[str, float] | None:
    """The best value a simulated world holds for the campaign's objective (to judge it), or None.

    Ground truth belongs to the simulation, not to the lab: a real lab has none.
    """
    found = _world_column(cfg)
    if found is None:
        return None
    frame, objective = found
    prop = cfg.objective.property
    utility = objective.utility(frame[prop].to_numpy(dtype=float))
    row = frame.iloc[int(utility.argmax())]
    if "id" in frame.columns:
        key = str(row["id"])
    else:  # a table world: the recorded parameters name the best point
        names = [c for c in frame.columns if c != prop]
        key = ", ".join(f"{c}={row[c]:g}" if isinstance(row[c], float) else f"{c}={row[c]}" for c in names)
    return key, float(row[prop])


def world_rank(cfg: Any, value: float | None) -> tuple[int, int] | None:
    """Rank of ``value`` among the simulated world's recorded values (1 = the best), and their count.

    Why: "best found" means little without knowing how many recorded materials beat it.
    """
    found = None if value is None else _world_column(cfg)
    if found is None or value is None:
        return None
    frame, objective = found
    utility = objective.utility(frame[cfg.objective.property].to_numpy(dtype=float))
    better = int((utility > float(objective.utility([value])[0]) + 1e-12).sum())
    return better + 1, len(utility)


def world_values(cfg: Any) -> tuple[list[str] | None, np.ndarray] | None:
    """The simulated world's recorded values of the objective (with their ids when it has them), or None.

    Why: the page draws what random picks from the same world would find, and the recall of the
    world's top set; a real lab has no such table.
    """
    found = _world_column(cfg)
    if found is None:
        return None
    frame, _ = found
    ids = [str(i) for i in frame["id"]] if "id" in frame.columns else None
    return ids, frame[cfg.objective.property].to_numpy(dtype=float)
