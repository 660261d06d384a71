"""``sdl simulate``: serve simulated SDL/1 instruments backed by a real-data world.

The options mirror ``simulators.server`` (and ``sdl.config.SimulatorOptions`` / ``SimulatedFaults``)
one to one; this command only builds the argument list and runs the server in this process.
"""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add ``sdl simulate`` to the sdl app."""

    @app.command("simulate")
    def simulate(
        world: Path = typer.Option(
            ..., "--world", help="World CSV(.gz): table (params + properties) or crystal (id, cif, properties)."
        ),
        listen: str = typer.Option(
            "127.0.0.1:0", "--listen", help="HOST:PORT; port 0 picks a free port (printed on the first line)."
        ),
        pty: bool = typer.Option(False, "--pty", help="Serve on a pseudo-terminal and print its path."),
        instrument: str = typer.Option("both", "--instrument", help="robot, station or both."),
        time_scale: float = typer.Option(1.0, "--time-scale", help="Multiplies every duration (0.001 for CI)."),
        seed: int = typer.Option(0, "--seed", help="Seed of measurement draws and faults."),
        noise_std: float = typer.Option(0.0, "--noise-std", help="Gaussian noise on recorded values (property units)."),
        off_table: str = typer.Option(
            "nearest", "--off-table", help="Table world, recipe off the table: nearest or refuse."
        ),
        properties: str | None = typer.Option(None, "--properties", help="Comma-separated property columns."),
        journal: Path | None = typer.Option(None, "--journal", help="JSONL job journal (fsync'd, reloaded at start)."),
        serial: str = typer.Option("SIM-0001", "--serial", help="Serial number in the *IDN? reply."),
        synth_seconds: float = typer.Option(60.0, "--synth-seconds", help="Unscaled synthesis duration (s)."),
        measure_seconds: float = typer.Option(20.0, "--measure-seconds", help="Unscaled measurement duration (s)."),
        exit_with_parent: bool = typer.Option(False, "--exit-with-parent", help="Exit when the parent process dies."),
        fault_timeout: float = typer.Option(0.0, "--fault-timeout", help="Probability that a command gets no reply."),
        fault_garbled: float = typer.Option(0.0, "--fault-garbled", help="Probability of a corrupted reply line."),
        fault_drop: float = typer.Option(0.0, "--fault-drop", help="Probability of dropping the connection."),
        fault_busy: float = typer.Option(0.0, "--fault-busy", help="Probability of a BUSY reply."),
        fault_failed_synthesis: float = typer.Option(
            0.0, "--fault-failed-synthesis", help="Probability that a synthesis loses its sample."
        ),
        fault_drift: float = typer.Option(0.0, "--fault-drift", help="Probability of a drifted measurement."),
        impurity_rate: float = typer.Option(
            0.0, "--impurity-rate", help="Crystal world: probability that a sample holds a competing phase."
        ),
        impurity_phases: Path | None = typer.Option(
            None, "--impurity-phases", help="CSV(.gz) of competing phases (id, formula, cif) impurities come from."
        ),
        xrd_strain: float = typer.Option(0.0, "--xrd-strain", help="Largest lattice strain of a measured sample."),
        xrd_intensity_noise: float = typer.Option(
            0.0, "--xrd-intensity-noise", help="Relative noise on each XRD reflection's intensity."
        ),
        log_level: str = typer.Option("WARNING", "--log-level", help="Logging level on stderr."),
    ) -> None:
        """Serve simulated instruments; the first line printed says where (e.g. socket://127.0.0.1:PORT)."""
        from simulators.server import main as serve

        argv = [
            "--world", str(world), "--listen", listen, "--instrument", instrument,
            "--time-scale", str(time_scale), "--seed", str(seed), "--noise-std", str(noise_std),
            "--off-table", off_table, "--serial", serial, "--synth-seconds", str(synth_seconds),
            "--measure-seconds", str(measure_seconds), "--log-level", log_level,
            "--fault-timeout", str(fault_timeout), "--fault-garbled", str(fault_garbled),
            "--fault-drop", str(fault_drop), "--fault-busy", str(fault_busy),
            "--fault-failed-synthesis", str(fault_failed_synthesis), "--fault-drift", str(fault_drift),
        ]
        if pty:
            argv.append("--pty")
        if properties:
            argv += ["--properties", properties]
        if journal:
            argv += ["--journal", str(journal)]
        if exit_with_parent:
            argv.append("--exit-with-parent")
        if impurity_rate or xrd_strain or xrd_intensity_noise:
            argv += ["--impurity-rate", str(impurity_rate), "--xrd-strain", str(xrd_strain),
                     "--xrd-intensity-noise", str(xrd_intensity_noise)]
        if impurity_phases:
            argv += ["--impurity-phases", str(impurity_phases)]
        try:
            code = serve(argv)
        except SystemExit as exc:  # argparse rejected a value; it already said which
            code = int(exc.code or 0)
        if code:
            raise typer.Exit(code)
