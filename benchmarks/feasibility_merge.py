"""Failures and discovery per strategy over ``sdl benchmark`` runs of disjoint seed ranges.

Why: on a loaded machine the 10-seed feasibility comparison runs as several ``sdl benchmark``
processes (``--first-seed``/``--seeds``, one strategy each); this joins their ``results.json`` per
strategy (refusing runs of a different world, budget or top set) and prints, per strategy, the
failures in the budget, experiments to half of the top set and recall at the budget (median [IQR]
and per seed), plus the per-seed difference of each strategy's failures from a reference strategy.

    python benchmarks/feasibility_merge.py benchmarks/results/feasibility_marginal/*/results.json \
        --reference gnn-ensemble:blind --json benchmarks/results/feasibility_marginal/summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from sdl.benchmark_metrics import median_iqr

_SAME = ("data_sha256_16", "budget", "top_fraction", "n_top", "initial", "batch_size", "synthesis_rule")


def _fmt(st: dict[str, float | None]) -> str:
    def f(x: float | None) -> str:
        return ">budget" if x is None else f"{x:g}"

    return f"{f(st['median'])} [{f(st['q25'])}–{f(st['q75'])}]"


def merge(paths: list[Path]) -> dict[str, Any]:
    """Per strategy: seeds, failures, experiments to half, recall at the budget (per seed, sorted by seed)."""
    head: dict[str, Any] | None = None
    per: dict[str, dict[int, dict[str, Any]]] = {}
    for path in paths:
        res = json.loads(path.read_text())
        if head is None:
            head = {k: res.get(k) for k in _SAME}
        for k in _SAME:
            if res.get(k) != head[k]:
                raise SystemExit(f"{path}: {k} = {res.get(k)!r}, the other runs have {head[k]!r}")
        for name, s in res["strategies"].items():
            for i, seed in enumerate(res["seeds"]):
                if seed in per.setdefault(name, {}):
                    raise SystemExit(f"{path}: strategy {name!r} seed {seed} is in two runs")
                per[name][seed] = {"failures": s["failures"][i], "to_half": s["experiments_to_half"][i],
                                   "recall": s["recall"][i][-1]}
    assert head is not None
    out: dict[str, Any] = {"runs": [str(p) for p in paths], **head, "strategies": {}}
    for name, seeds in per.items():
        order = sorted(seeds)
        rows = [seeds[s] for s in order]
        out["strategies"][name] = {
            "seeds": order,
            **{key: [r[key] for r in rows] for key in ("failures", "to_half", "recall")},
            **{f"{key}_stats": median_iqr([r[key] for r in rows]) for key in ("failures", "to_half", "recall")},
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results.json of sdl benchmark runs")
    parser.add_argument("--reference", default="gnn-ensemble:blind", help="strategy the failures are paired with")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    out = merge(args.results)
    ref = out["strategies"].get(args.reference)
    print(f"budget {out['budget']}, top set {out['n_top']}, {out['synthesis_rule']}")
    print("| strategy | seeds | failures, median [IQR] | experiments to 50 % of top | recall at budget |")
    print("|---|---|---|---|---|")
    for name, s in out["strategies"].items():
        reached = sum(x is not None for x in s["to_half"])
        print(f"| {name} | {len(s['seeds'])} | {_fmt(s['failures_stats'])} ({', '.join(map(str, s['failures']))}) "
              f"| {_fmt(s['to_half_stats'])} ({reached}/{len(s['seeds'])}) "
              f"| {s['recall_stats']['median']:.2f} [{s['recall_stats']['q25']:.2f}–{s['recall_stats']['q75']:.2f}] |")
        if ref is not None and name != args.reference:
            common = sorted(set(s["seeds"]) & set(ref["seeds"]))
            diff = [s["failures"][s["seeds"].index(k)] - ref["failures"][ref["seeds"].index(k)] for k in common]
            s["failures_minus_reference"] = diff
            fewer = sum(d < 0 for d in diff)
            print(f"|   vs {args.reference} | {len(common)} paired | failures {float(np.median(diff)):+g} median "
                  f"(fewer in {fewer}/{len(common)} seeds) | | |")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
