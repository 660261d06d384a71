"""``sdl benchmark`` of a campaign with ``fidelities:``: single- vs multi-fidelity, scored by cost.

Called by :mod:`sdl.cli.benchmark_commands` when the campaign names cheap sources; prints one table
(cost and experiments to half the top set, median [IQR] over seeds) and writes ``results.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _stats(s: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return ">budget" if x is None else f"{x:.3g}"

    return f"{f(s['median'])} [{f(s['q25'])}–{f(s['q75'])}]"


def run(ds: Any, cfg: Any, seeds: list[int], budget: int, top_fraction: float, out: Path, command: str) -> None:
    """Replay both strategies over ``seeds``, print the table, write ``out/results.json``."""
    from rich.console import Console
    from rich.table import Table

    from sdl.benchmark import dataset_fingerprint
    from sdl.benchmark_fidelity import run_fidelity_benchmark

    console = Console()
    costs = ", ".join(f"{s.name} {s.cost:g}" for s in cfg.fidelities.sources)
    console.print(f"[bold]{ds.name}[/]: {ds.pool_size} candidates, target {ds.target} ({ds.goal}), measured cost "
                  f"{cfg.fidelities.measured_cost:g}, sources {costs}; at most {budget} experiments, seeds "
                  f"{seeds[0]}..{seeds[-1]}", highlight=False)

    def progress(run: Any) -> None:
        console.print(f"  {run.strategy} seed {run.seed}: {len(run.keys)} experiments, "
                      f"{sum(run.computations.values())} computations, cost {run.total_cost:.2f}, "
                      f"{run.wall_time_s:.1f} s", highlight=False)

    results = run_fidelity_benchmark(ds, cfg, seeds, budget, top_fraction=top_fraction, progress=progress)
    results["data_sha256_16"] = dataset_fingerprint(ds.source)
    results["command"] = command
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    table = Table(title=f"{ds.name}: half of the top {top_fraction * 100:g} % = {results['half_of_top']} of "
                  f"{results['n_top']} measured (median [IQR] over {len(seeds)} seeds)")
    for col in ("strategy", "cost to 50 %", "experiments to 50 %", "computations to 50 %", "reached", "s/seed"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, s in results["strategies"].items():
        sm = s["summary"]
        wall = sorted(s["wall_time_s"])[len(s["wall_time_s"]) // 2]
        table.add_row(name, _stats(sm["cost_to_half"]), _stats(sm["experiments_to_half"]),
                      _stats(sm["computations_to_half"]), f"{sm['reached']}/{len(seeds)}", f"{wall:.1f}")
    ratio = results["cost_ratio_median"]
    table.caption = None if ratio is None else f"median cost ratio multi/single: {ratio:.2f}"
    console.print(table)
    console.print(f"wrote {path}", highlight=False)
