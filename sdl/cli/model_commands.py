"""CLI commands of the ``sdl model`` group: ``sdl model evaluate`` (a crystal model on a crystal table)."""

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


@model_app.command("evaluate")
def evaluate(
    data: Path = typer.Option(..., "--data", help="Crystal CSV(.gz) with a structure column and a target column."),
    target: str = typer.Option(..., "--target", help="Column to predict (e.g. e_form)."),
    structure_column: str = typer.Option("cif", "--structure-column", help="CIF text or pymatgen JSON column."),
    id_column: str = typer.Option(
        "id", "--id-column", help="Candidate id column (made up from row numbers if absent)."
    ),
    model: str = typer.Option("gnn-ensemble", "--model", help="gnn-ensemble (crystal model) or gp (composition GP)."),
    backbone: str = typer.Option(
        "chgnet", "--backbone", help="gnn-ensemble: chgnet, package.module:Class, or scratch."
    ),
    head: str = typer.Option("auto", "--head", help="Pretrained backbone: auto, gp or mlp."),
    use_prior: bool = typer.Option(True, "--prior/--no-prior", help="Give the heads the backbone's zero-shot prior."),
    extensive: bool = typer.Option(False, "--extensive", help="The target scales with the cell (learn it per atom)."),
    train_size: int | None = typer.Option(
        None, "--train-size", help="Training rows (absolute); the rest is the test set."
    ),
    train_fraction: float = typer.Option(
        0.8, "--train-fraction", help="Random train share when --train-size is not given."
    ),
    members: int = typer.Option(5, "--members", help="Ensemble members."),
    seed: int = typer.Option(0, "--seed", help="Seed of the split, sampling and the models."),
    max_rows: int | None = typer.Option(None, "--max-rows", help="Use a random subset of this many rows."),
    cache: Path | None = typer.Option(None, "--cache", help="Embedding cache file (default: $SDL_EMBEDDING_CACHE or "
                                      "~/.cache/sdl/embeddings.sqlite)."),
    workers: int = typer.Option(1, "--workers", help="Processes that featurise crystals the cache lacks."),
    epochs: int | None = typer.Option(None, "--epochs", help="Scratch: max epochs per member (default 150)."),
    hidden: int = typer.Option(64, "--hidden", help="Scratch: node feature width."),
    layers: int = typer.Option(3, "--layers", help="Scratch: graph convolutions."),
    batch_size: int = typer.Option(64, "--batch-size", help="Scratch: crystals per training step."),
    patience: int = typer.Option(20, "--patience", help="Scratch: early-stopping patience, epochs."),
    time_budget: float | None = typer.Option(None, "--time-budget", help="Scratch: fit wall-clock budget, s."),
    threads: int = typer.Option(1, "--threads", help="torch threads (the machine is shared)."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the result object here."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Scratch: save the trained ensemble (torch.save)."
    ),
    dask: str | None = typer.Option(None, "--dask", metavar="ADDRESS", help="Featurise and score on this Dask "
                                    "scheduler (tcp://host:8786) or 'local' (a LocalCluster of --workers processes)."),
) -> None:
    """Train a crystal model on a random split of a crystal table; report accuracy and uncertainty quality.

    The same split (``--seed``, ``--max-rows``, ``--train-size``) is drawn for every ``--model`` /
    ``--backbone``, so runs compare on equal terms.
    """
    import numpy as np
    import torch
    from rich.console import Console

    if model not in ("gnn-ensemble", "gp"):
        _fail(f"--model must be gnn-ensemble or gp, got {model!r}")
    if head not in ("auto", "gp", "mlp"):
        _fail(f"--head must be auto, gp or mlp, got {head!r}")
    if train_size is None and not 0.0 < train_fraction < 1.0:
        _fail(f"--train-fraction must be in (0, 1), got {train_fraction}")
    if members < 1:
        _fail(f"--members must be >= 1, got {members}")
    torch.set_num_threads(max(1, threads))
    console = Console(stderr=True)
    t0 = time.perf_counter()
    try:
        frame = load_crystal_frame(data, target, structure_column, id_column, max_rows, seed)
    except ValueError as exc:
        _fail(str(exc))
    n = len(frame)
    n_train = round(train_fraction * n) if train_size is None else int(train_size)
    if n < 4 or not 2 <= n_train <= n - 2:
        _fail(f"{data}: {n} rows with a {target!r} value; --train-size must leave >= 2 to train and >= 2 to test "
              f"(got {n_train})")
    perm = np.random.default_rng(seed).permutation(n)
    train_idx, test_idx = perm[:n_train], perm[n_train:]
    from sdl.engine.space import CandidatePool

    fmt = "pymatgen-json" if str(frame[structure_column].iloc[0]).lstrip().startswith("{") else "cif"
    try:
        pool = CandidatePool.from_frame(frame, id_column=id_column, structure_column=structure_column,
                                        structure_format=fmt, source=str(data))
    except ValueError as exc:
        _fail(str(exc))
    common: dict[str, Any] = {"data": str(data), "target": target, "model": model, "seed": seed,
                              "max_rows": max_rows, "train_fraction": n_train / n, "extensive": extensive}
    if model == "gnn-ensemble" and backbone == "scratch":
        result = _evaluate_scratch(pool, frame[target].to_numpy(dtype=float), train_idx, test_idx, console,
                                   members=members, epochs=epochs, hidden=hidden, layers=layers,
                                   batch_size=batch_size, patience=patience, time_budget=time_budget,
                                   checkpoint=checkpoint, extensive=extensive, seed=seed)
        result["parse_seconds"] = time.perf_counter() - t0 - result["fit_seconds"] - result["predict_seconds"]
    else:
        result = _evaluate_engine(pool, frame[target].to_numpy(dtype=float), train_idx, test_idx, console,
                                  model=model, backbone=backbone, head=head, use_prior=use_prior, members=members,
                                  seed=seed, cache=cache, workers=workers, extensive=extensive, dask=dask)
    result = {**common, **result, "threads": torch.get_num_threads()}
    _print_result(result, f"{model if model == 'gp' else backbone} on {data.name}: {target}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def load_crystal_frame(path: Path, target: str, structure_column: str, id_column: str, max_rows: int | None,
                       seed: int) -> Any:
    """Rows of a crystal CSV(.gz) with a target value (a seeded random subset of ``max_rows``).

    Raises:
        ValueError: Missing file or column; the message names the file and the column.
    """
    import pandas as pd

    if not path.exists():
        raise ValueError(f"{path}: file not found")
    try:
        df = pd.read_csv(path)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read as CSV ({exc})") from exc
    for col in (target, structure_column):
        if col not in df.columns:
            raise ValueError(f"{path}: no column {col!r} (columns: {', '.join(map(str, df.columns))})")
    if id_column not in df.columns:
        df[id_column] = [f"row_{i}" for i in range(len(df))]
    df = df[df[target].notna()]
    if max_rows is not None and max_rows < len(df):
        df = df.sample(n=max_rows, random_state=seed)
    return df.reset_index(drop=True)


def _evaluate_engine(pool: Any, y: Any, train_idx: Any, test_idx: Any, console: Any, *, model: str, backbone: str,
                     head: str, use_prior: bool, members: int, seed: int, cache: Path | None, workers: int,
                     extensive: bool, dask: str | None = None) -> dict[str, Any]:
    """Fit through :class:`sdl.engine.Engine` (exactly what a campaign runs) and score the test rows."""
    from types import SimpleNamespace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from sdl.engine import Engine, Observation
    from sdl.engine.distributed import DaskCompute
    from sdl.engine.models.embedding_store import EmbeddingStore, default_store_path
    from sdl.engine.uq import uncertainty_metrics
    from sdl.exceptions import EngineError

    store = EmbeddingStore(cache if cache is not None else default_store_path())
    options = {"backbone": backbone, "head": head, "use_prior": use_prior, "members": members}
    compute = DaskCompute(dask, workers=workers) if dask is not None else None
    try:
        if compute is not None:
            compute.connect()
        eng = Engine(objective=SimpleNamespace(goal="minimize", extensive=extensive),
                     model=SimpleNamespace(name=model, options=options if model == "gnn-ensemble" else {}),
                     acquisition=SimpleNamespace(function="qucb", batch_size=1), seed=seed, pool=pool,
                     embedding_store=store, featurize_workers=workers, compute=compute)
        t0 = time.perf_counter()
        with Progress(TextColumn("featurising"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task("featurise", total=None)
            eng.prepare(progress=lambda done, total: bar.update(task, completed=done, total=total))
        featurize_s = time.perf_counter() - t0
        eng.observe([Observation(pool.keys[int(i)], {}, float(y[int(i)])) for i in train_idx])
        t1 = time.perf_counter()
        eng.fit()
        fit_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        mean, std = eng.predict_pool()
        predict_s = time.perf_counter() - t2
    except EngineError as exc:
        _fail(f"--dask {dask}: {exc}" if compute is not None and not compute.connected else str(exc))
    finally:
        if compute is not None:
            compute.close()
    keep = [int(i) for i in test_idx if pool.keys[int(i)] not in eng.excluded]
    metrics = uncertainty_metrics(y[keep], mean.numpy()[keep], std.numpy()[keep])
    held = eng.uncertainty_metrics()
    out: dict[str, Any] = {
        "n_train": int(held["n_train"]), "n_test": len(keep),
        **{k: v for k, v in metrics.items() if k != "n"},
        "fit_seconds": fit_s, "predict_seconds": predict_s, "featurize_seconds": featurize_s,
        "excluded": len(eng.excluded), "cache_hits": store.hits, "cache_misses": store.misses,
        "backbone": backbone if model == "gnn-ensemble" else None,
        "backbone_version": eng.backbone.version if eng.backbone is not None else None,
        "head": eng.head_kind, "use_prior": use_prior, "members": members,
        "mean_test_std": float(std.numpy()[keep].mean()),
        "held_out": {k: held[k] for k in ("held_out", "mae", "coverage_68", "coverage_95", "spread_scale")
                     if k in held},
    }
    return out


def _evaluate_scratch(pool: Any, y: Any, train_idx: Any, test_idx: Any, console: Any, *, members: int,
                      epochs: int | None, hidden: int, layers: int, batch_size: int, patience: int,
                      time_budget: float | None, checkpoint: Path | None, extensive: bool, seed: int) -> dict[str, Any]:
    """The CGCNN-style ensemble trained from the labels alone (``--backbone scratch``)."""
    import numpy as np
    import torch

    from sdl.engine.models.ensemble import EnsembleOptions, GNNEnsemble
    from sdl.engine.uq import uncertainty_metrics

    ids = list(pool.keys)
    try:
        structures = pool.structures()
    except ValueError as exc:  # names the file, the candidate and the column
        _fail(str(exc))
    scale = np.array([len(s) for s in structures], dtype=np.float64) if extensive else np.ones(len(y))
    defaults = EnsembleOptions()
    options = EnsembleOptions(members=members, hidden=hidden, layers=layers,
                              epochs=epochs if epochs is not None else defaults.epochs, batch_size=batch_size,
                              patience=patience)
    ens = GNNEnsemble(options, seed=seed)
    console.print(f"[bold]{len(y)}[/] crystals parsed; {ens!r}")
    t1 = time.perf_counter()
    ens.graphs(structures, ids)
    graph_s = time.perf_counter() - t1
    report = ens.fit([structures[i] for i in train_idx], y[train_idx] / scale[train_idx], [ids[i] for i in train_idx],
                     time_budget_s=time_budget)
    t2 = time.perf_counter()
    mean, std = ens.predict([structures[i] for i in test_idx], [ids[i] for i in test_idx])
    predict_s = time.perf_counter() - t2
    s = torch.as_tensor(scale[test_idx])
    mean, std = mean * s, std * s
    metrics = uncertainty_metrics(y[test_idx], mean, std)
    if checkpoint is not None:
        torch.save(ens.state_dict(), checkpoint)
    return {
        "n_train": len(train_idx), "n_test": len(test_idx),
        **{k: v for k, v in metrics.items() if k != "n"},
        "fit_seconds": report.seconds, "predict_seconds": predict_s, "graph_seconds": graph_s,
        "backbone": "scratch", "members": members, "epochs": options.epochs, "epochs_run": report.epochs_run,
        "best_epoch": report.best_epoch, "best_val_mae": report.best_val_mae,
        "stopped_by_time": report.stopped_by_time, "time_budget": time_budget, "options": report_options(options),
        "mean_test_std": float(std.mean()),
    }


def _print_result(result: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("n_train", "n_test", "mae", "rmse", "spearman_abs_error_std", "miscalibration_area",
                "coverage_68", "coverage_95", "fit_seconds", "predict_seconds", "featurize_seconds", "graph_seconds"):
        if key in result:
            val = result[key]
            table.add_row(key, f"{val:.4f}" if isinstance(val, float) else str(val))
    Console().print(table)


def report_options(options: Any) -> dict[str, Any]:
    """Options as a JSON-able dict."""
    from dataclasses import asdict

    return asdict(options)
