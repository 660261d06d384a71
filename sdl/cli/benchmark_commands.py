"""CLI: ``sdl benchmark`` — pool replay of strategies over a recorded dataset.

Heavy modules (torch, the engine) are imported inside the command so ``sdl --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

logger = logging.getLogger(__name__)


def _fail(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def _from_campaign(campaign: Path, work_dir: Path) -> tuple[Any, Any]:
    """Dataset and the campaign config from a campaign YAML (data, target, goal, space, model)."""
    from sdl import benchmark as bmk
    from sdl.config import load_campaign

    cfg = load_campaign(campaign)
    goal = str(cfg.objective.goal)
    if goal not in ("maximize", "minimize"):
        where = "objectives[0].goal" if cfg.objectives is not None else "objective.goal"
        raise bmk.BenchmarkError(
            f"{campaign}: {where} {goal!r} is not supported by benchmarks (use maximize or minimize"
            + (", or list a target objective after the first)" if cfg.objectives is not None else ")")
        )
    target = cfg.objective.property
    cand = cfg.search_space.candidates
    if cand is not None:
        if cand.structure_column:
            ds = bmk.load_crystal_dataset(
                cand.file,
                target,
                goal,
                structure_column=cand.structure_column,
                id_column=cand.id_column,
                formula_column=cand.formula_column or "formula",
                work_dir=work_dir,
            )
        elif cand.parameter_columns:
            ds = bmk.load_table_dataset(cand.file, target, goal, cand.parameter_columns, work_dir=work_dir)
        else:
            raise bmk.BenchmarkError(
                f"{campaign}: search_space.candidates needs structure_column or parameter_columns for a benchmark"
            )
    else:
        params = [p.name for p in (cfg.search_space.parameters or [])]
        worlds = [i.world for i in cfg.instruments if i.world is not None and target in (i.measures or [])]
        if not params or not worlds:
            raise bmk.BenchmarkError(
                f"{campaign}: no recorded data to replay: give search_space.candidates, or an instrument "
                f"with a world that measures {target!r}"
            )
        ds = bmk.load_table_dataset(worlds[0], target, goal, params, work_dir=work_dir)
    if cfg.objectives is not None:
        from sdl.benchmark_pareto import attach_objectives

        attach_objectives(ds, cfg, ds.source)
    rules = [i for i in cfg.instruments if i.role == "synthesis" and i.simulated
             and i.simulator.tolerance_factor is not None]
    if rules:
        from simulators.synthesis_rules import ToleranceFactorRule

        tf = rules[0].simulator.tolerance_factor
        assert tf is not None
        try:
            bmk.apply_synthesis_rule(ds, ToleranceFactorRule(tf.low, tf.high, unjudged=tf.unjudged))
        except bmk.BenchmarkError as exc:
            raise bmk.BenchmarkError(f"{campaign}: instruments.{rules[0].name}.simulator.tolerance_factor: "
                                     f"{exc}") from None
    return ds, cfg


def _campaign_strategies(cfg: Any, spec: str | None, acquisition: str | None) -> list[Any]:
    """Strategies for a campaign: its own model (with its options) plus random, unless --strategies."""
    import dataclasses

    from sdl import benchmark as bmk

    model = cfg.model.name
    default = "random" if model == "random" else f"random,{model}"
    if model != "random" and _has_synthesis_rule(cfg):  # failures happen: measure the feasibility model
        default += f",{model}:blind"
    strategies = bmk.parse_strategies(spec or default, acquisition or None)
    out = []
    for s in strategies:
        # The campaign's own design for its own model; a 'prior' design needs the backbone, so the
        # other strategies start from the seeded random design.
        design = cfg.initial_design.strategy
        if s.model != model and design == "prior":
            design = "random"
        update: dict[str, Any] = {"initial_strategy": design, "acquisition_config": cfg.acquisition}
        if s.model == model:
            update["model_config"] = cfg.model
            if acquisition is None and s.label in (model, f"{model}:blind"):
                update["acquisition"] = cfg.acquisition.function
        out.append(dataclasses.replace(s, **update))
    return out


def _has_synthesis_rule(cfg: Any) -> bool:
    return any(i.role == "synthesis" and i.simulated and i.simulator.tolerance_factor is not None
               for i in cfg.instruments)


def register(app: typer.Typer) -> None:
    """Add ``sdl benchmark`` to the sdl app."""

    @app.command("benchmark")
    def benchmark(
        campaign: Path | None = typer.Argument(
            None, help="Campaign YAML (data, target, goal, space, model); or use --data."
        ),
        data: Path | None = typer.Option(None, "--data", help="Table CSV or crystal CSV(.gz) to replay."),
        target: str | None = typer.Option(None, "--target", help="Target column."),
        goal: str | None = typer.Option(None, "--goal", help="max or min."),
        params: str | None = typer.Option(None, "--params", help="Parameter columns a,b,c (table CSV)."),
        structure_column: str | None = typer.Option(None, "--structure-column", help="CIF column (crystal CSV)."),
        id_column: str = typer.Option(
            "id", "--id-column", help="Id column of a crystal CSV (rows are numbered if absent)."
        ),
        columns: str | None = typer.Option(
            None, "--columns", help="Column names a,b,c for a CSV without a header row (e.g. Olympus data.csv)."
        ),
        strategies: str | None = typer.Option(
            None, "--strategies", help="Comma list of random, gp, gnn-ensemble, or model:acquisition (gp:qucb)."
        ),
        acquisition: str | None = typer.Option(
            None, "--acquisition",
            help="Acquisition for every model strategy (default: qlognei for gp, qucb for gnn-ensemble)."
        ),
        seeds: int = typer.Option(10, "--seeds", min=1, help="Seeds 0..n-1."),
        first_seed: int = typer.Option(0, "--first-seed", help="First seed."),
        budget: int | None = typer.Option(
            None, "--budget", min=1,
            help="Experiments per run, capped at the pool size (default 200, or the YAML's).",
        ),
        top_fraction: float = typer.Option(0.05, "--top-fraction", help="Fraction of the pool that is the top set."),
        initial: int | None = typer.Option(
            None, "--initial", min=1,
            help="Initial designs, same per seed for all strategies (default 2, or the YAML's).",
        ),
        batch_size: int | None = typer.Option(
            None, "--batch-size", min=1, help="Proposals per round (default 1, or the YAML's)."
        ),
        extensive: bool = typer.Option(
            False, "--extensive",
            help="Crystal CSV: the target scales with the cell (learnt per atom, predicted per cell).",
        ),
        out: Path = typer.Option(..., "--out", help="Output folder for results.json and plots."),
        dask: str | None = typer.Option(
            None, "--dask", metavar="ADDRESS",
            help="Featurise and score the pool on this Dask scheduler (tcp://host:8786) or 'local' (a LocalCluster).",
        ),
    ) -> None:
        """Replay strategies over a recorded dataset in pool mode; write results.json and plots."""
        import functools
        import os
        import tempfile

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from rich.console import Console
        from rich.table import Table

        from sdl import benchmark as bmk
        from sdl.exceptions import SDLError

        console = Console()
        out.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.TemporaryDirectory(prefix="sdl-benchmark-")
        work = Path(tmp.name)
        compute = None
        try:
            if dask is not None:
                from sdl.engine.distributed import ComputeError, DaskCompute

                try:
                    compute = DaskCompute(dask).connect()
                except ComputeError as exc:
                    raise bmk.BenchmarkError(f"--dask {dask}: {exc}") from None
            if campaign is not None:
                if data is not None:
                    raise bmk.BenchmarkError("give either a campaign YAML or --data, not both")
                ds, cfg = _from_campaign(campaign, work)
                ds.extensive = bool(cfg.objective.extensive)
                if cfg.fidelities is not None:  # cheap sources: scored by cost, see sdl.benchmark_fidelity
                    from sdl.cli import fidelity_benchmark

                    fidelity_benchmark.run(ds, cfg, list(range(first_seed, first_seed + seeds)),
                                           budget or cfg.budget.experiments, top_fraction, out, _command_line())
                    return
                strats = _campaign_strategies(cfg, strategies, acquisition)
                budget = budget or cfg.budget.experiments
                initial = initial or cfg.initial_design.size
                batch_size = batch_size or cfg.acquisition.batch_size
            else:
                if data is None:
                    raise bmk.BenchmarkError("--data FILE (or a campaign YAML) is required")
                if not target:
                    raise bmk.BenchmarkError("--target COL is required with --data")
                if not goal:
                    raise bmk.BenchmarkError("--goal max|min is required with --data")
                plist = _split(params)
                if (plist is None) == (structure_column is None):
                    raise bmk.BenchmarkError(
                        "give exactly one of --params a,b,c (table) or --structure-column COL (crystals)"
                    )
                if plist is not None:
                    ds = bmk.load_table_dataset(data, target, goal, plist, columns=_split(columns), work_dir=work)
                else:
                    ds = bmk.load_crystal_dataset(
                        data, target, goal,
                        structure_column=structure_column or "cif", id_column=id_column, work_dir=work,
                    )
                    ds.extensive = extensive
                strats = bmk.parse_strategies(strategies or "random,gp", acquisition)
                budget, initial, batch_size = budget or 200, initial or 2, batch_size or 1
            seed_list = list(range(first_seed, first_seed + seeds))
            console.print(
                f"[bold]{ds.name}[/]: {ds.pool_size} designs ({ds.n_rows} rows), target {ds.target} ({ds.goal}), "
                f"budget {min(budget, ds.pool_size)}, seeds {seed_list[0]}..{seed_list[-1]}, "
                f"strategies {', '.join(s.label for s in strats)}",
                highlight=False,
            )

            def progress(label: str, seed: int, run: Any) -> None:
                console.print(
                    f"  {label} seed {seed}: {len(run.keys)} experiments, {run.wall_time_s:.1f} s", highlight=False
                )

            results = bmk.run_benchmark(
                ds,
                strats,
                seed_list,
                budget,
                top_fraction=top_fraction,
                initial=initial,
                batch_size=batch_size,
                progress=progress,
                engine_factory=functools.partial(bmk.default_engine_factory, compute=compute),
            )
            results["data_sha256_16"] = bmk.dataset_fingerprint(ds.source)
            results["command"] = _command_line()
            paths = bmk.write_outputs(results, out)
        except (SDLError, ValueError, FileNotFoundError, ImportError) as exc:
            _fail(str(exc))
            return
        finally:
            tmp.cleanup()
            if compute is not None:
                compute.close()

        top = ("true Pareto front" if "objectives" in results else f"top {results['top_fraction'] * 100:g} %")
        table = Table(
            title=f"{ds.name}: {top} = {results['n_top']} of {results['pool_size']} "
            f"(median [IQR] over {len(seed_list)} seeds)"
        )
        headers: tuple[str, ...] = (
            "strategy", "exp. to 50 %", "AF 50 %", "exp. to 100 %", "AF 100 %", "recall@budget", "EF@budget", "s/seed"
        )
        failures = results.get("synthesis_rule") is not None
        if failures:
            headers = (*headers, "failures")
        for col in headers:
            table.add_column(col, justify="left" if col == "strategy" else "right")
        for row in bmk.summary_rows(results):
            table.add_row(
                row["strategy"],
                f"{row['to_half']} ({row['to_half_reached']})",
                _f(row["af_half"]),
                f"{row['to_all']} ({row['to_all_reached']})",
                _f(row["af_all"]),
                _f(row["recall_at_budget"]),
                _f(row["ef_at_budget"]),
                f"{row['seconds_per_seed']:.1f}",
                *([row["failures"]] if failures else []),
            )
        if failures:
            console.print(f"synthesis rule {results['synthesis_rule']}: {results['n_infeasible']} of "
                          f"{results['pool_size']} designs fail; the top set is drawn from the others",
                          highlight=False)
        half = next(iter(results["strategies"].values()))["summary"]["levels"]
        table.caption = (
            f"random (analytic): {half['0.5']['random_expected']:.1f} experiments to 50 %, "
            f"{half['1']['random_expected']:.1f} to 100 %"
        )
        console.print(table)
        if "objectives" in results:
            for name, s in results["strategies"].items():
                at = ", ".join(f"{k}: {v:.3f}" for k, v in s["summary"]["hypervolume_at"].items())
                console.print(f"  hypervolume / pool front's, median over seeds after k experiments, {name}: {at}",
                              highlight=False)
        if not results["initial_designs_identical"]:
            console.print("[yellow]warning:[/] strategies did not start from the same initial designs", highlight=False)
        console.print(f"wrote {paths['results']} and {len(paths) - 1} plot(s) in {out}", highlight=False)


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _command_line() -> str:
    import shlex
    import sys

    return "sdl " + " ".join(shlex.quote(a) for a in sys.argv[1:])
