"""Collect every ``benchmarks/results/*/results.json`` into markdown tables (printed to stdout).

    python benchmarks/results/make_summary.py \
        [--liang ../shared/data/liang2021_bo_benchmark/TopCount_collection_GP_Matern52_LCB2.json]

The tables in ``SUMMARY.md`` were pasted from this output; every number comes from a results.json.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _f(x: float | None, nd: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ">budget"
    return f"{x:.{nd}f}" if isinstance(x, float) and not float(x).is_integer() else f"{x:g}"


def _af(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _stats(st: dict) -> str:
    return f"{_f(st['median'])} [{_f(st['q25'])}–{_f(st['q75'])}] ({st['reached']}/{st['n']})"


def _pct(values: list[float]) -> str:
    q25, med, q75 = np.percentile(values, [25, 50, 75])
    return f"{med:.2f} [{q25:.2f}–{q75:.2f}]"


def table(res: dict) -> str:
    n, m, b = res["pool_size"], res["n_top"], res["budget"]
    lines = [
        f"**{res['dataset']}** — target `{res['target']}` ({res['goal']}), N = {n} designs ({res['n_rows']} rows), "
        f"top {res['top_fraction'] * 100:g} % = M = {m}, budget {b}, batch {res['batch_size']}, "
        f"initial {res['initial']}, {len(res['seeds'])} seeds, wall {res['wall_time_s'] / 60:.1f} min",
        "",
        f"Command: `{res.get('command', '?')}`",
        "",
        "| strategy | exp. to 50 % of top: median [IQR] (seeds reached) | AF 50 % | exp. to 100 % | AF 100 % "
        "| recall at budget: median [IQR] | EF at budget | s / seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = None
    for name, s in res["strategies"].items():
        lv = s["summary"]["levels"]
        first = lv
        rec = [r[b - 1] for r in s["recall"]]
        lines.append(
            f"| {name} | {_stats(lv['0.5']['experiments_stats'])} | {_af(lv['0.5']['af_median'])} "
            f"| {_stats(lv['1']['experiments_stats'])} | {_af(lv['1']['af_median'])} "
            f"| {_pct(rec)} | {s['summary']['ef_median'][b - 1]:.2f} | {np.median(s['wall_time_s']):.1f} |"
        )
    if first is not None:
        lines.append(
            f"| random (analytic) | {first['0.5']['random_expected']:.1f} | 1 "
            f"| {first['1']['random_expected']:.1f} | 1 "
            f"| {min(b / n, 1.0):.2f} | 1 | — |"
        )
    for frac, m2 in res.get("top_fractions", {}).items():
        if float(frac) == res["top_fraction"]:
            continue
        lines += ["", f"Top {float(frac) * 100:g} % (M = {m2}):", "",
                  "| strategy | exp. to 50 % | exp. to 100 % | recall at budget |", "|---|---|---|---|"]
        for name, s in res["strategies"].items():
            o = s["other_top_fractions"][frac]
            lv = o["summary"]["levels"]
            rec = [r[b - 1] for r in o["recall"]]
            lines.append(
                f"| {name} | {_stats(lv['0.5']['experiments_stats'])} "
                f"| {_stats(lv['1']['experiments_stats'])} | {_pct(rec)} |"
            )
    return "\n".join(lines)


def liang(path: Path, n_top: int = 30) -> str:
    runs = json.loads(path.read_text())["runs"]
    out = []
    for k in (15, 30):
        first = [next((i + 1 for i, c in enumerate(r) if c >= k), None) for r in runs]
        vals = [v for v in first if v is not None]
        q25, med, q75 = np.percentile(vals, [25, 50, 75])
        out.append(
            f"| Liang et al. GP-Matern52 + LCB (their file, {len(runs)} runs) | {k} of {n_top} "
            f"| mean {np.mean(vals):.1f}, "
            f"median {med:g} [{q25:g}–{q75:g}], min–max {min(vals)}–{max(vals)} |"
        )
    return "\n".join(out)


def liang_figure(liang_path: Path, ours: Path, out: Path) -> Path:
    """Our crossed-barrel recall curves beside Liang's GP-Matern52+LCB runs (median, IQR)."""
    from sdl.plots import plot_recall_curves

    res = json.loads(ours.read_text())
    raw = json.loads(liang_path.read_text())["runs"]
    b = res["budget"]
    # runs end when all top designs were found; pad with the final count
    runs = np.asarray([(list(r) + [r[-1]] * b)[:b] for r in raw], dtype=float) / res["n_top"]
    curves = {}
    for name, s in res["strategies"].items():
        curves[f"sdl {name} ({len(res['seeds'])} seeds)"] = {
            "median": s["summary"]["recall_median"], "q25": s["summary"]["recall_q25"],
            "q75": s["summary"]["recall_q75"],
        }
    q25, med, q75 = np.percentile(runs[:, :b], [25, 50, 75], axis=0)
    curves[f"Liang et al. GP-M52+LCB ({runs.shape[0]} runs)"] = {"median": med, "q25": q25, "q75": q75}
    return plot_recall_curves(
        curves, out, pool_size=res["pool_size"], n_top=res["n_top"],
        title="Crossed barrel: top 5 % recall, this engine vs Liang et al. 2021",
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    liang = Path("../shared/data/liang2021_bo_benchmark/TopCount_collection_GP_Matern52_LCB2.json")
    ap.add_argument("--liang", type=Path, default=liang)
    args = ap.parse_args()
    for p in sorted(HERE.glob("*/results.json")):
        print(f"### {p.parent.name}\n")
        print(table(json.loads(p.read_text())))
        print()
    if args.liang.exists():
        print("### Liang reference (crossed barrel)\n")
        print(liang(args.liang))
        ours = HERE / "crossed_barrel" / "results.json"
        if ours.exists():
            print(f"\nfigure: {liang_figure(args.liang, ours, HERE / 'crossed_barrel' / 'recall_vs_liang.png')}")


if __name__ == "__main__":
    main()
