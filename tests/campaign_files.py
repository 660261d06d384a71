"""Campaign YAML files that tests write: one crossed-barrel GP campaign, shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TABLE_WORLD", "write_table_campaign"]

TABLE_WORLD = Path(__file__).resolve().parent.parent / "simulators" / "worlds" / "crossed_barrel.csv"


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
