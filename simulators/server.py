"""Serve simulated instruments over TCP or a pseudo-terminal (``python -m simulators.server``).

The first line on stdout says where the instrument listens (``listening socket://127.0.0.1:PORT``
or ``listening /dev/pts/N``) and is flushed at once, so a parent process started with port 0 can
read it. Logs go to stderr. :func:`start_simulator` starts such a process and returns its URL.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from devices.protocol import MAX_LINE, FrameError, format_busy, format_err, parse_command
from simulators.faults import FaultInjector, FaultRates
from simulators.impurities import ImpurityModel
from simulators.instruments import MEASURE_SECONDS, SYNTH_SECONDS, Journal, SimulatedInstruments
from simulators.synthesis_rules import ToleranceFactorRule
from simulators.worlds import CrystalWorld, World, WorldError, load_world

__all__ = [
    "ServerOptions",
    "build_parser",
    "build_lab",
    "build_impurities",
    "serve_tcp",
    "serve_pty",
    "main",
    "SimulatorProcess",
    "start_simulator",
    "simulator_argv",
]

logger = logging.getLogger(__name__)


@dataclass
class ServerOptions:
    """Everything ``sdl simulate`` accepts; field names follow ``sdl.config.SimulatorOptions``."""

    world: Path
    listen: str = "127.0.0.1:0"
    instrument: str = "both"
    time_scale: float = 1.0
    seed: int = 0
    noise_std: float = 0.0
    off_table: str = "nearest"
    properties: list[str] | None = None
    faults: FaultRates = field(default_factory=FaultRates)
    journal: Path | None = None
    pty: bool = False
    exit_with_parent: bool = False
    serial: str = "SIM-0001"
    outage_after_s: float | None = None
    outage_s: float | None = None
    synth_seconds: float = SYNTH_SECONDS
    measure_seconds: float = MEASURE_SECONDS
    impurity_rate: float = 0.0
    impurity_phases: Path | None = None
    xrd_strain: float = 0.0
    xrd_intensity_noise: float = 0.0
    tolerance_factor: tuple[float, float] | None = None
    tolerance_unjudged: str = "succeed"


def build_parser() -> argparse.ArgumentParser:
    """The command line of the simulator (``sdl simulate`` passes its arguments through)."""
    p = argparse.ArgumentParser(prog="sdl simulate",
                                description="Serve simulated SDL/1 instruments backed by a real-data world.")
    add = p.add_argument
    add("--world", required=True, type=Path,
        help="world CSV(.gz): table (params + properties) or crystal (id, cif, properties)")
    add("--listen", default="127.0.0.1:0",
        help="HOST:PORT to listen on; port 0 picks a free port (default 127.0.0.1:0)")
    add("--pty", action="store_true", help="serve on a pseudo-terminal instead of TCP and print its path")
    add("--instrument", choices=["robot", "station", "both"], default="both", help="which instrument(s) to serve")
    add("--time-scale", type=float, default=1.0, help="multiplies every duration (e.g. 0.001 for CI)")
    add("--seed", type=int, default=0, help="seed of measurement draws and faults")
    add("--noise-std", type=float, default=0.0, help="gaussian noise added to recorded values (property units)")
    add("--off-table", choices=["nearest", "refuse"], default="nearest", help="table world: off-table recipes")
    add("--properties", default=None,
        help="comma-separated property columns (default: table: last column; crystal: numeric columns)")
    add("--journal", type=Path, default=None, help="JSONL job journal (fsync'd, reloaded at start)")
    add("--serial", default="SIM-0001", help="serial number in the *IDN? reply")
    add("--synth-seconds", type=float, default=SYNTH_SECONDS, help="unscaled synthesis duration")
    add("--measure-seconds", type=float, default=MEASURE_SECONDS, help="unscaled measurement duration")
    p.add_argument("--outage-after-s", type=float, default=None, metavar="S",
                   help="fault injection: stop answering S seconds after start")
    p.add_argument("--outage-s", type=float, default=None, metavar="S",
                   help="fault injection: answer again after S seconds of outage (default: never)")
    p.add_argument("--exit-with-parent", action="store_true", help="exit when the parent process dies")
    p.add_argument("--impurity-rate", type=float, default=0.0, metavar="RATE",
                   help="crystal world: probability that a sample holds a competing phase instead of the target")
    p.add_argument("--impurity-phases", type=Path, default=None, metavar="CSV",
                   help="table of competing phases (id, formula, cif) the impurities are drawn from")
    p.add_argument("--xrd-strain", type=float, default=0.0, metavar="STRAIN",
                   help="largest isotropic lattice strain of a measured sample (e.g. 0.005)")
    p.add_argument("--xrd-intensity-noise", type=float, default=0.0, metavar="SD",
                   help="relative noise on each XRD reflection's intensity (e.g. 0.05)")
    p.add_argument("--tolerance-factor", default=None, metavar="LOW,HIGH",
                   help="crystal world robot: fail syntheses whose Goldschmidt tolerance factor is outside [LOW, HIGH]")
    p.add_argument("--tolerance-unjudged", choices=["succeed", "fail"], default="succeed",
                   help="with --tolerance-factor: fate of a candidate without charge-balanced radii")
    for name in ("timeout", "garbled", "drop", "busy", "failed-synthesis", "drift"):
        p.add_argument(f"--fault-{name}", type=float, default=0.0, metavar="RATE",
                       help=f"probability of a {name} fault")
    p.add_argument("--log-level", default="WARNING", help="logging level on stderr")
    return p


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """Convert parsed arguments (validated) into :class:`ServerOptions`."""
    faults = FaultRates(
        timeout=args.fault_timeout,
        garbled=args.fault_garbled,
        drop=args.fault_drop,
        busy=args.fault_busy,
        failed_synthesis=args.fault_failed_synthesis,
        drift=args.fault_drift,
    )
    return ServerOptions(
        world=args.world,
        listen=args.listen,
        instrument=args.instrument,
        time_scale=args.time_scale,
        seed=args.seed,
        noise_std=args.noise_std,
        off_table=args.off_table,
        properties=[p.strip() for p in args.properties.split(",") if p.strip()] if args.properties else None,
        faults=faults,
        journal=args.journal,
        pty=args.pty,
        exit_with_parent=args.exit_with_parent,
        serial=args.serial,
        outage_after_s=args.outage_after_s,
        outage_s=args.outage_s,
        synth_seconds=args.synth_seconds,
        measure_seconds=args.measure_seconds,
        impurity_rate=args.impurity_rate,
        impurity_phases=args.impurity_phases,
        xrd_strain=args.xrd_strain,
        xrd_intensity_noise=args.xrd_intensity_noise,
        tolerance_factor=_window(args.tolerance_factor),
        tolerance_unjudged=args.tolerance_unjudged,
    )


def _window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--tolerance-factor: expected LOW,HIGH, got {text!r}") from None
    return low, high


def build_synthesis_rule(options: ServerOptions, world: World) -> ToleranceFactorRule | None:
    """The robot's synthesis-failure rule, or None when no option asks for one.

    Raises:
        ValueError: A rule on a world without crystal structures, or a bad window.
    """
    if options.tolerance_factor is None:
        return None
    if not isinstance(world, CrystalWorld):
        raise ValueError(f"--tolerance-factor needs a crystal world (id, cif columns), not {world.name}")
    low, high = options.tolerance_factor
    return ToleranceFactorRule(low, high, unjudged=options.tolerance_unjudged)  # type: ignore[arg-type]


def build_impurities(options: ServerOptions, world: World) -> ImpurityModel | None:
    """The impurity model of a crystal world's station, or None when no option asks for one.

    Raises:
        ValueError: Impurity or XRD options on a world without crystal structures, or a rate
            without a phase table (the message names the option).
    """
    if not (options.impurity_rate or options.xrd_strain or options.xrd_intensity_noise):
        return None
    if not isinstance(world, CrystalWorld):
        raise ValueError(f"--impurity-rate/--xrd-* need a crystal world (id, cif columns), not {world.name}")
    table = None
    if options.impurity_phases is not None:
        from sdl.xrd.phases import PhaseTable, PhaseTableError

        try:
            table = PhaseTable.load(options.impurity_phases)
        except PhaseTableError as exc:
            raise ValueError(f"--impurity-phases: {exc}") from None
    elif options.impurity_rate:
        raise ValueError("--impurity-rate needs --impurity-phases (the competing phases to draw from)")
    return ImpurityModel(table, rate=options.impurity_rate, seed=options.seed, strain=options.xrd_strain,
                         intensity_noise=options.xrd_intensity_noise)


def build_lab(options: ServerOptions) -> SimulatedInstruments:
    """Load the world and the journal and build the instrument state machines."""
    world = load_world(options.world, properties=options.properties, off_table=options.off_table)  # type: ignore[arg-type]
    instruments = frozenset({"robot", "station"} if options.instrument == "both" else {options.instrument})
    impurities = build_impurities(options, world) if "station" in instruments else None
    rule = build_synthesis_rule(options, world) if "robot" in instruments else None
    return SimulatedInstruments(
        world,
        instruments=instruments,
        time_scale=options.time_scale,
        seed=options.seed,
        noise_std=options.noise_std,
        faults=FaultInjector(options.faults, seed=options.seed, outage_after_s=options.outage_after_s,
                             outage_s=options.outage_s),
        journal=Journal(options.journal),
        serial=options.serial,
        synth_seconds=options.synth_seconds,
        measure_seconds=options.measure_seconds,
        impurities=impurities,
        synthesis_rule=rule,
    )


class _Session:
    """Turns received lines into reply bytes, applying line faults. One per connection."""

    def __init__(self, lab: SimulatedInstruments) -> None:
        self.lab = lab

    def respond(self, raw: bytes, too_long: bool = False) -> tuple[list[bytes], str | None]:
        """Reply lines for one received line, and the line fault applied (if any)."""
        if self.lab.faults.silent():
            return [], "outage"
        fault = self.lab.faults.line_fault()
        if fault == "drop":
            return [], "drop"
        if fault == "busy":
            return [format_busy("instrument busy (injected), retry later")], "busy"
        if too_long:
            replies = [format_err("TOO_LONG", f"line longer than {MAX_LINE} bytes")]
        else:
            try:
                replies = self.lab.handle(parse_command(raw))
            except FrameError as exc:
                replies = [format_err(exc.code, exc.message)]
            except WorldError as exc:
                replies = [format_err(exc.code, exc.message)]
            except Exception as exc:
                logger.exception("internal error on %r", raw[:200])
                replies = [format_err("INTERNAL", f"{type(exc).__name__}: {exc}")]
        if fault == "timeout":
            return [], "timeout"
        if fault == "garbled":
            replies = [self.lab.faults.garble(replies[0]), *replies[1:]]
        return replies, fault


class _Handler(socketserver.StreamRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        session = _Session(self.server.lab)
        peer = self.client_address
        logger.info("connection from %s", peer)
        while True:
            try:
                raw = self.rfile.readline(MAX_LINE + 1)
            except OSError:
                return
            if not raw:
                return
            too_long = False
            if not raw.endswith(b"\n"):
                if len(raw) <= MAX_LINE:
                    return  # EOF in the middle of a line
                too_long = True
                while raw and not raw.endswith(b"\n"):  # discard the rest of the long line
                    try:
                        raw = self.rfile.readline(MAX_LINE + 1)
                    except OSError:
                        return
            replies, fault = session.respond(raw.rstrip(b"\n"), too_long)
            if fault:
                logger.info("fault %s injected on %r", fault, raw[:80])
            if fault == "drop":
                with contextlib.suppress(OSError):
                    self.request.shutdown(socket.SHUT_RDWR)
                return
            try:
                self.wfile.write(b"".join(replies))
                self.wfile.flush()
            except OSError:
                return


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], lab: SimulatedInstruments) -> None:
        self.lab = lab
        super().__init__(address, _Handler)


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    return host or "127.0.0.1", int(port)


def _ticker(lab: SimulatedInstruments, stop: threading.Event) -> None:
    while not stop.wait(0.02):
        try:
            lab.tick()
        except Exception:
            logger.exception("tick failed")


def serve_tcp(
    lab: SimulatedInstruments, listen: str, out: TextIO = sys.stdout, stop: threading.Event | None = None
) -> None:
    """Serve until ``stop`` is set (or forever); print the URL as the first line of ``out``."""
    stop = stop or threading.Event()
    server = _TCPServer(_split_listen(listen), lab)
    host, port = server.server_address[:2]
    host = host.decode() if isinstance(host, bytes) else host
    out.write(f"listening socket://{host}:{port}\n")
    out.flush()
    threading.Thread(target=_ticker, args=(lab, stop), daemon=True).start()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()


def serve_pty(lab: SimulatedInstruments, out: TextIO = sys.stdout, stop: threading.Event | None = None) -> None:
    """Serve on a pseudo-terminal; print its path as the first line of ``out``.

    A dropped-connection fault cannot close a pty, so it behaves like a missing reply.
    """
    stop = stop or threading.Event()
    master, slave = os.openpty()
    tty.setraw(slave)
    out.write(f"listening {os.ttyname(slave)}\n")
    out.flush()
    threading.Thread(target=_ticker, args=(lab, stop), daemon=True).start()
    session = _Session(lab)
    buffer = b""
    discarding = False
    import select

    while not stop.is_set():
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:
            time.sleep(0.05)
            continue
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > MAX_LINE:
                    buffer, discarding = b"", True
                break
            line, buffer = buffer[:newline], buffer[newline + 1:]
            if discarding:
                discarding = False
                replies, _ = session.respond(b"", too_long=True)
            else:
                replies, _ = session.respond(line.rstrip(b"\r"), len(line) + 1 > MAX_LINE)
            if replies:
                os.write(master, b"".join(replies))


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(0.2)
        if os.getppid() != parent:
            logger.warning("parent process %d is gone; exiting", parent)
            os._exit(0)


def _warm_pymatgen() -> None:
    try:
        import pymatgen.analysis.diffraction.xrd
        import pymatgen.core  # noqa: F401
        import scipy.ndimage  # noqa: F401 - RAW threads broaden patterns; scipy's lazy import races in threads
    except ImportError:
        logger.warning("pymatgen is not installed: MEASURE RAW will fail")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m simulators.server`` and ``sdl simulate``."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = options_from_args(args)
        lab = build_lab(options)
        if not options.pty:
            _split_listen(options.listen)
    except (ValueError, WorldError, OSError) as exc:
        sys.stderr.write(f"error: {exc.message if isinstance(exc, WorldError) else exc}\n")
        return 2
    if isinstance(lab.world, CrystalWorld):  # XRD needs pymatgen: import it before the first RAW asks
        threading.Thread(target=_warm_pymatgen, daemon=True).start()
    if options.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        if options.pty:
            serve_pty(lab)
        else:
            serve_tcp(lab, options.listen)
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {options.listen}: {exc}\n")
        return 2
    return 0


# -- starting simulators as child processes ------------------------------------------------


def simulator_argv(world: str | Path, **options: Any) -> list[str]:
    """Command line for a simulator process; keyword names are the option names with ``_``.

    ``faults={"timeout": 0.1, ...}`` maps to ``--fault-timeout 0.1``; booleans are flags.
    """
    argv = [sys.executable, "-m", "simulators.server", "--world", str(world)]
    faults = options.pop("faults", None) or {}
    if hasattr(faults, "model_dump"):
        faults = faults.model_dump()
    elif hasattr(faults, "__dataclass_fields__"):
        faults = {k: getattr(faults, k) for k in faults.__dataclass_fields__}
    for name, value in faults.items():
        if value:
            argv += [f"--fault-{name.replace('_', '-')}", str(value)]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            argv += [flag, ",".join(map(str, value))]
        else:
            argv += [flag, str(value)]
    return argv


class SimulatorProcess:
    """A simulator child process and the URL it serves (use as a context manager).

    Args:
        argv: Command line, e.g. from :func:`simulator_argv`.
        startup_timeout: Seconds to wait for the ``listening`` line.
        log_path: File that receives the child's stderr (default: discarded).
    """

    def __init__(self, argv: list[str], *, startup_timeout: float = 60.0, log_path: str | Path | None = None) -> None:
        self.argv = argv
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed in stop()
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal is the client's to handle, not the instrument's
        )
        self.url = self._read_url(startup_timeout)

    def _read_url(self, timeout: float) -> str:
        import select

        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                self.stop()
                what = " ".join(self.argv[2:])
                raise RuntimeError(f"simulator {what} did not start (exit {self.process.returncode})")
            ready, _, _ = select.select([self.process.stdout], [], [], min(left, 0.2))
            if ready:
                byte = os.read(self.process.stdout.fileno(), 1)  # unbuffered: select stays truthful
                if not byte:
                    time.sleep(0.05)
                    continue
                line += byte
        text = line.decode("ascii", errors="replace").strip()
        if not text.startswith("listening "):
            self.stop()
            raise RuntimeError(f"simulator printed {text!r} instead of 'listening URL'")
        return text.split(" ", 1)[1]

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the child (kill if it does not exit in ``timeout``)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        if self.process.stdout:
            self.process.stdout.close()
        if self._log:
            self._log.close()
            self._log = None

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_simulator(world: str | Path, *, log_path: str | Path | None = None, startup_timeout: float = 60.0,
                    **options: Any) -> SimulatorProcess:
    """Start ``python -m simulators.server`` on a free port (unless ``listen`` says otherwise).

    Keyword options are those of the command line (``time_scale=0.001``, ``instrument="robot"``,
    ``journal=path``, ``faults={"drop": 0.2}``, ``exit_with_parent=True``, ``pty=True``, ...).
    """
    options.setdefault("listen", None if options.get("pty") else "127.0.0.1:0")
    return SimulatorProcess(simulator_argv(world, **options), startup_timeout=startup_timeout, log_path=log_path)


if __name__ == "__main__":
    sys.exit(main())
