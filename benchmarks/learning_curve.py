"""Learning curve of the crystal models: accuracy and calibration against the number of labels.

Every point is one ``sdl model evaluate`` run (the same code a campaign runs), on the same split
for every model: ``--seed s`` draws ``N + test`` rows of the table, trains on ``N`` of them and
scores the other ``test`` (2,000 by default). Models:

* ``pretrained-gp``: CHGNet features + prior, GP head (the default up to 1,000 labels);
* ``pretrained-mlp``: the same inputs, bootstrap MLP heads with the out-of-bag recalibrated spread;
* ``composition-gp``: a GP on composition descriptors (``--model gp``);
* ``scratch``: the CGCNN-style ensemble trained from the labels alone (``--backbone scratch``),
  only up to ``--scratch-max`` labels (it is slow and poor with few labels).

Usage::

    SDL_EMBEDDING_CACHE=/path/emb.sqlite python benchmarks/learning_curve.py \
        --data ../shared/data/perovskites_cmr_mp_oqmd/cmr_castelli_perovskites.csv.gz --target e_form \
        --sizes 50 100 200 500 1000 --seeds 0 1 --out benchmarks/results/learning_curve [--json]

Writes ``<out>/runs/*.json`` (one per point, reused when present) and ``<out>/summary.json``, and
prints a table of medians over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODELS: dict[str, list[str]] = {
    "pretrained-gp": ["--model", "gnn-ensemble", "--backbone", "chgnet", "--head", "gp"],
    "pretrained-mlp": ["--model", "gnn-ensemble", "--backbone", "chgnet", "--head", "mlp", "--members", "10"],
    "composition-gp": ["--model", "gp"],
    "scratch": ["--model", "gnn-ensemble", "--backbone", "scratch", "--members", "5"],
}
METRICS = ("mae", "rmse", "spearman_abs_error_std", "miscalibration_area", "coverage_68", "coverage_95",
           "fit_seconds")


def run_point(args: argparse.Namespace, model: str, n: int, seed: int) -> dict[str, object]:
    """One evaluate run (cached on disk by its parameters)."""
    out = args.out / "runs" / f"{model}-n{n}-s{seed}.json"
    if not out.exists():
        cmd = [sys.executable, "-m", "sdl.cli.main", "model", "evaluate", "--data", str(args.data),
               "--target", args.target, "--train-size", str(n), "--max-rows", str(n + args.test),
               "--seed", str(seed), "--json", str(out), *MODELS[model], *(["--extensive"] if args.extensive else [])]
        print(" ".join(cmd[3:]), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return dict(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--target", default="e_form")
    parser.add_argument("--extensive", action="store_true", help="The target scales with the cell.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--test", type=int, default=2000, help="Held-out rows per split.")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--scratch-max", type=int, default=200, help="Largest N for the scratch ensemble.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON instead of a table.")
    args = parser.parse_args()
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for model in args.models:
        for n in args.sizes:
            if model == "scratch" and n > args.scratch_max:
                continue
            runs = [run_point(args, model, n, s) for s in args.seeds]
            summary.setdefault(model, {})[str(n)] = {
                m: statistics.median(float(r[m]) for r in runs) for m in METRICS  # type: ignore[arg-type]
            }
    result = {"data": str(args.data), "target": args.target, "test_rows": args.test, "seeds": args.seeds,
              "statistic": "median over seeds", "models": summary}
    (args.out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.data.name} {args.target}: {args.test} held out, median of seeds {args.seeds}")
    print(f"{'model':16s} {'N':>5s} {'MAE':>7s} {'Spearman':>8s} {'cov68':>6s} {'cov95':>6s} {'fit s':>7s}")
    for model, by_n in summary.items():
        for n, m in by_n.items():
            print(f"{model:16s} {n:>5s} {m['mae']:7.3f} {m['spearman_abs_error_std']:8.2f} {m['coverage_68']:6.2f} "
                  f"{m['coverage_95']:6.2f} {m['fit_seconds']:7.1f}")


if __name__ == "__main__":
    main()
