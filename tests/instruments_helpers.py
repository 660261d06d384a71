"""Fixtures and helpers that start real simulator processes (reused by the flow tests).

Import the fixtures you need into a test module (``from instruments_helpers import crystal_sim``).
Every simulator is a real ``python -m simulators.server`` process on a free port, spoken to through
pyserial; nothing here fakes the protocol.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulators.server import SimulatorProcess, start_simulator

REPO_ROOT = Path(__file__).resolve().parent.parent
WORLDS = REPO_ROOT / "simulators" / "worlds"
CRYSTAL_WORLD = WORLDS / "perovskites_demo.csv.gz"
TABLE_WORLD = WORLDS / "crossed_barrel.csv"
FAST = 0.001
"""Time scale of the test simulators: a 60 s synthesis takes 60 ms."""

__all__ = [
    "CRYSTAL_WORLD",
    "TABLE_WORLD",
    "FAST",
    "simulator",
    "crystal_sim",
    "table_sim",
    "crystal_truth",
    "table_replicates",
    "journal_records",
]


def simulator(world: Path | str, tmp_path: Path | None = None, **options: Any) -> SimulatorProcess:
    """Start a simulator (time scale :data:`FAST` unless given); stderr goes to ``tmp_path/sim.log``."""
    options.setdefault("time_scale", FAST)
    log = (tmp_path / f"sim-{len(list(tmp_path.glob('sim-*.log')))}.log") if tmp_path else None
    return start_simulator(world, log_path=log, **options)


def crystal_truth(path: Path = CRYSTAL_WORLD) -> dict[str, dict[str, float]]:
    """Recorded properties per candidate id, read independently of the simulator code."""
    with gzip.open(path, "rt", newline="") as handle:
        return {row["id"]: {"e_form": float(row["e_form"]), "gap_gllbsc": float(row["gap_gllbsc"])}
                for row in csv.DictReader(handle)}


def table_replicates(path: Path = TABLE_WORLD) -> dict[tuple[float, ...], list[float]]:
    """Recorded toughness replicates per (n, theta, r, t), read independently of the simulator code."""
    out: dict[tuple[float, ...], list[float]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            key = (float(row["n"]), float(row["theta"]), float(row["r"]), float(row["t"]))
            out.setdefault(key, []).append(float(row["toughness"]))
    return out


def journal_records(path: Path) -> list[dict[str, Any]]:
    """All records of a simulator journal."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def crystal_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """A robot + station simulator on the demo perovskite world, no faults, no noise."""
    tmp = tmp_path_factory.mktemp("crystal-sim")
    with simulator(CRYSTAL_WORLD, tmp, journal=tmp / "journal.jsonl") as sim:
        yield sim


@pytest.fixture(scope="session")
def table_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimulatorProcess]:
    """A robot + station simulator on the crossed-barrel table (nearest point off the table)."""
    tmp = tmp_path_factory.mktemp("table-sim")
    with simulator(TABLE_WORLD, tmp, journal=tmp / "journal.jsonl") as sim:
        yield sim
