"""Campaign YAML files that tests write: a crossed-barrel GP campaign and a small several-objective one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["PARETO_CAMPAIGN", "PEROVSKITE_WORLD", "TABLE_WORLD", "write_pareto_campaign", "write_table_campaign"]

REPO = Path(__file__).resolve().parent.parent
TABLE_WORLD = REPO / "simulators" / "worlds" / "crossed_barrel.csv"
PARETO_CAMPAIGN = REPO / "campaigns" / "perovskite-pareto.yaml"
PEROVSKITE_WORLD = REPO / "simulators" / "worlds" / "perovskites_demo.csv.gz"


def write_pareto_campaign(tmp_path: Path, name: str, *, budget: int = 6, constrained: bool = True,
                          instruments: bool = True, stopping: dict[str, Any] | None = None) -> Path:
    """``campaigns/perovskite-pareto.yaml`` made small: the 400-crystal demo world, the composition GP,
    4 random designs, batches of 2 (e_form minimised, gap_gllbsc in 1.5-3.0 eV, gap >= 0.5).

    ``instruments=False`` drops the simulated robot and station (a campaign run by hand);
    ``stopping`` replaces the YAML's stopping rules.
    """
    data = yaml.safe_load(PARETO_CAMPAIGN.read_text())
    data["name"] = name
    if not constrained:  # a random design of 4 from 400 crystals rarely holds a gapped one
        data.pop("constraints")
    data["search_space"]["candidates"]["file"] = str(PEROVSKITE_WORLD)
    data["model"] = {"name": "gp"}
    data["acquisition"] = {"batch_size": 2}
    data["initial_design"] = {"strategy": "random", "size": 4}
    data["budget"] = {"experiments": budget}
    data["retrain"] = {"every": 2}
    data["repository"] = {"url": f"sqlite:///{tmp_path / 'sdl.db'}"}
    if stopping is not None:
        data["stopping"] = stopping
    if instruments:
        for inst in data["instruments"]:
            inst["world"] = str(PEROVSKITE_WORLD)
            inst["simulator"] = {"time_scale": 0.002}
    else:
        del data["instruments"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def write_table_campaign(tmp_path: Path, name: str, *, budget: int, time_scale: float | None = None,
                         goal_value: float | None = None) -> Path:
    """A crossed-barrel GP campaign (4 printing parameters, toughness in J).

    ``time_scale`` adds the two simulated instruments (printer 60 s, tester 20 s × time_scale);
    without it the campaign is run by hand (``sdl ask`` / ``sdl tell``).
    """
    lines = [
        f"name: {name}",
        "seed: 2",
        "search_space:",
        "  parameters:",
        "    - {name: n, type: integer, low: 6, high: 12, unit: struts}",
        "    - {name: theta, type: continuous, low: 0, high: 200, unit: deg}",
        "    - {name: r, type: continuous, low: 1.5, high: 2.5, unit: mm}",
        "    - {name: t, type: continuous, low: 0.7, high: 1.4, unit: mm}",
        "objective: {property: toughness, unit: J, goal: maximize}",
        "model: {name: gp}",
        "acquisition: {function: qlognei, batch_size: 2}",
        "initial_design: {strategy: sobol, size: 3}",
        f"budget: {{experiments: {budget}, max_failures: 4}}",
    ]
    if goal_value is not None:
        lines.append(f"stopping: {{goal_value: {goal_value}}}")
    if time_scale is not None:
        sim = f"{{time_scale: {time_scale}, off_table: nearest}}"
        lines += [
            "instruments:",
            f"  - {{name: printer, role: synthesis, simulated: true, world: {TABLE_WORLD}, simulator: {sim}}}",
            f"  - {{name: tester, role: characterization, simulated: true, world: {TABLE_WORLD}, "
            f"measures: [toughness], simulator: {sim}}}",
        ]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path
