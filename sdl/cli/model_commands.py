"""CLI commands of the ``sdl model`` group: ``sdl model evaluate`` (GNN ensemble on a crystal table)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import typer

logger = logging.getLogger(__name__)

model_app = typer.Typer(help="Surrogate models: train and evaluate on recorded data.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the sdl app."""
    app.add_typer(model_app, name="model")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def load_crystal_table(
    path: Path, target: str, structure_column: str, id_column: str, max_rows: int | None, seed: int
) -> tuple[list[Any], Any, list[str]]:
    """Read a crystal CSV(.gz): structures (CIF or pymatgen JSON), targets and ids; errors name the file/column/row."""
    import numpy as np
    import pandas as pd
    from pymatgen.core import Structure

    if not path.exists():
        raise ValueError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for a bad file
        raise ValueError(f"{path}: cannot read as CSV ({exc})") from exc
    for col in (target, structure_column):
        if col not in df.columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, df.columns))})")
    if id_column not in df.columns:
        df[id_column] = [f"row_{i}" for i in range(len(df))]
    df = df[df[target].notna()]
    if max_rows is not None and max_rows < len(df):
        df = df.sample(n=max_rows, random_state=seed)
    structures = []
    for row_id, text in zip(df[id_column], df[structure_column], strict=True):
        try:
            s_text = str(text)
            if s_text.lstrip().startswith("{"):
                structures.append(Structure.from_dict(json.loads(s_text)))
            else:
                structures.append(Structure.from_str(s_text, fmt="cif"))
        except Exception as exc:
            raise ValueError(f"{path}: column {structure_column!r}, row {row_id}: cannot parse structure ({exc})") from exc
    y = df[target].to_numpy(dtype=np.float64)
    return structures, y, [str(v) for v in df[id_column]]


@model_app.command("evaluate")
def evaluate(
    data: Path = typer.Option(..., "--data", help="Crystal CSV(.gz) with a structure column and a target column."),
    target: str = typer.Option(..., "--target", help="Column to predict (e.g. e_form)."),
    structure_column: str = typer.Option("cif", "--structure-column", help="CIF text or pymatgen JSON column."),
    id_column: str = typer.Option("id", "--id-column", help="Candidate id column (graph cache key)."),
    train_fraction: float = typer.Option(0.8, "--train-fraction", help="Random train share; the rest is the test set."),
    members: int = typer.Option(5, "--members", help="Ensemble members."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, sampling and the ensemble."),
    max_rows: int | None = typer.Option(None, "--max-rows", help="Use a random subset of this many rows."),
    epochs: int | None = typer.Option(None, "--epochs", help="Max epochs per member (default: options, 150)."),
    hidden: int = typer.Option(64, "--hidden", help="Node feature width."),
    layers: int = typer.Option(3, "--layers", help="Graph convolutions."),
    batch_size: int = typer.Option(64, "--batch-size", help="Crystals per training step."),
    patience: int = typer.Option(20, "--patience", help="Early-stopping patience, epochs."),
    time_budget: float | None = typer.Option(None, "--time-budget", help="Fit wall-clock budget, s (members share it)."),
    threads: int = typer.Option(1, "--threads", help="torch threads (the machine is shared)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the result object here."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="Save the trained ensemble (torch.save)."),
) -> None:
    """Train the GNN ensemble on a random split of a crystal table; report accuracy and uncertainty quality."""
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from sdl.models.ensemble import EnsembleOptions, GNNEnsemble
    from sdl.uq import uncertainty_metrics

    if not 0.0 < train_fraction < 1.0:
        _fail(f"--train-fraction must be in (0, 1), got {train_fraction}")
    if members < 1:
        _fail(f"--members must be >= 1, got {members}")
    torch.set_num_threads(max(1, threads))
    console = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        structures, y, ids = load_crystal_table(data, target, structure_column, id_column, max_rows, seed)
    except ValueError as exc:
        _fail(str(exc))
    parse_s = time.perf_counter() - t0
    n = len(y)
    if n < 4:
        _fail(f"{data}: only {n} rows with a {target!r} value; need at least 4")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_train = int(round(train_fraction * n))
    train_idx, test_idx = perm[:n_train], perm[n_train:]
    defaults = EnsembleOptions()
    options = EnsembleOptions(
        members=members,
        hidden=hidden,
        layers=layers,
        epochs=epochs if epochs is not None else defaults.epochs,
        batch_size=batch_size,
        patience=patience,
    )
    ens = GNNEnsemble(options, seed=seed)
    console.print(f"[bold]{n}[/] crystals parsed in {parse_s:.1f} s; {ens!r}")
    t1 = time.perf_counter()
    ens.graphs(structures, ids)
    graph_s = time.perf_counter() - t1
    report = ens.fit(
        [structures[i] for i in train_idx], y[train_idx], [ids[i] for i in train_idx], time_budget_s=time_budget
    )
    t2 = time.perf_counter()
    mean, std = ens.predict([structures[i] for i in test_idx], [ids[i] for i in test_idx])
    predict_s = time.perf_counter() - t2
    metrics = uncertainty_metrics(y[test_idx], mean, std)
    result: dict[str, Any] = {
        "data": str(data),
        "target": target,
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        **{k: v for k, v in metrics.items() if k != "n"},
        "fit_seconds": report.seconds,
        "predict_seconds": predict_s,
        "graph_seconds": graph_s,
        "parse_seconds": parse_s,
        "members": members,
        "epochs": options.epochs,
        "epochs_run": report.epochs_run,
        "best_epoch": report.best_epoch,
        "best_val_mae": report.best_val_mae,
        "stopped_by_time": report.stopped_by_time,
        "time_budget": time_budget,
        "seed": seed,
        "train_fraction": train_fraction,
        "options": report_options(options),
        "threads": torch.get_num_threads(),
        "max_rows": max_rows,
        "mean_test_std": float(std.mean()),
    }
    table = Table(title=f"GNN ensemble on {data.name}: {target}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("n_train", "n_test", "mae", "rmse", "spearman_abs_error_std", "miscalibration_area",
                "coverage_68", "coverage_95", "fit_seconds", "predict_seconds", "graph_seconds"):
        val = result[key]
        table.add_row(key, f"{val:.4f}" if isinstance(val, float) else str(val))
    Console().print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
    if checkpoint is not None:
        torch.save(ens.state_dict(), checkpoint)


def report_options(options: Any) -> dict[str, Any]:
    """Options as a JSON-able dict."""
    from dataclasses import asdict

    return asdict(options)
