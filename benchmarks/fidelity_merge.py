"""Merge per-seed ``results.json`` of ``sdl benchmark`` on a campaign with ``fidelities:`` into one.

Why: on a shared machine the seeds run as separate processes (``--first-seed k --seeds 1``); this
joins them and prints the median [IQR] cost and experiments to half the top set per strategy.

    python benchmarks/fidelity_merge.py DIR_SEED0 DIR_SEED1 ... --json benchmarks/results/x/results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sdl import benchmark_metrics as bm

PER_SEED = ("experiments_to_half", "cost_to_half", "computations_to_half", "total_cost", "cumulative_cost",
            "computations", "keys", "wall_time_s")


def main() -> int:
    """Merge, print one line per strategy, write the merged JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="folders with a results.json each")
    ap.add_argument("--json", type=Path, required=True, help="merged results.json to write")
    args = ap.parse_args()
    parts = [json.loads((d / "results.json").read_text()) for d in args.dirs]
    merged = dict(parts[0])
    merged["seeds"] = [s for p in parts for s in p["seeds"]]
    merged["commands"] = [p["command"] for p in parts]
    merged["wall_time_s"] = sum(p["wall_time_s"] for p in parts)
    merged["initial_designs_identical"] = all(p["initial_designs_identical"] for p in parts)
    for name in parts[0]["strategies"]:
        s = {k: [v for p in parts for v in p["strategies"][name][k]] for k in PER_SEED}
        s["summary"] = {
            "experiments_to_half": bm.median_iqr(s["experiments_to_half"]),
            "cost_to_half": bm.median_iqr(s["cost_to_half"]),
            "computations_to_half": bm.median_iqr(s["computations_to_half"]),
            "reached": sum(x is not None for x in s["experiments_to_half"]),
        }
        merged["strategies"][name] = s
    names = list(merged["strategies"])
    med = [merged["strategies"][n]["summary"]["cost_to_half"]["median"] for n in names]
    merged["cost_ratio_median"] = med[1] / med[0] if None not in med and med[0] else None
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(merged, indent=1) + "\n")
    for n in names:
        sm = merged["strategies"][n]["summary"]
        sys.stdout.write(f"{n}: cost {sm['cost_to_half']}, experiments {sm['experiments_to_half']}, "
                         f"computations {sm['computations_to_half']}, reached {sm['reached']}/{len(merged['seeds'])}, "
                         f"per seed cost {merged['strategies'][n]['cost_to_half']}\n")
    sys.stdout.write(f"median cost ratio: {merged['cost_ratio_median']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
