"""Round-trip cost of the SDL/1 driver stack against a real simulator process.

Prints: median / p95 of one ``*IDN?`` through ``LineTransport`` over TCP (``socket://``) and over a
pseudo-terminal, and the wall time of one synthesize-and-characterize plan (two Bluesky runs)
with durations scaled to zero. Run: ``python benchmarks/serial_roundtrip.py [--n 2000]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devices.plans import synthesize_and_characterize
from devices.robot import SynthesisRobot
from devices.station import CharacterizationStation
from devices.transport import LineTransport
from sdl.lab.runner import run_plan
from simulators.server import start_simulator

WORLD = Path(__file__).resolve().parent.parent / "simulators" / "worlds" / "perovskites_demo.csv.gz"


def roundtrips(url: str, n: int) -> list[float]:
    """Seconds per ``*IDN?`` round trip, ``n`` times."""
    times = []
    with LineTransport(url, instrument="bench", timeout=5) as line:
        line.command("*IDN?")
        for _ in range(n):
            t = time.perf_counter()
            line.command("*IDN?")
            times.append(time.perf_counter() - t)
    return times


def report(label: str, times: list[float]) -> None:
    """Print median and p95 in microseconds."""
    times = sorted(times)
    p95 = times[int(0.95 * (len(times) - 1))]
    print(f"{label:<34} n={len(times):<5} median {statistics.median(times) * 1e6:8.1f} us   p95 {p95 * 1e6:8.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--plans", type=int, default=20)
    args = parser.parse_args()
    with start_simulator(WORLD, time_scale=0.0) as sim:
        report("*IDN? over socket://", roundtrips(sim.url, args.n))
        robot = SynthesisRobot(name="robot", url=sim.url, timeout=30)
        station = CharacterizationStation(name="station", url=sim.url, properties=["e_form"])
        plan_times = []
        for i in range(args.plans):
            t = time.perf_counter()
            outcome = run_plan(synthesize_and_characterize(robot, station, {"job_id": f"bench-{time.time_ns()}-{i}",
                                                                            "candidate": "perov_33"}))
            plan_times.append(time.perf_counter() - t)
            assert outcome.ok, outcome.exception
        report("synthesize_and_characterize plan", plan_times)
    with start_simulator(WORLD, time_scale=0.0, pty=True) as sim:
        report("*IDN? over pty", roundtrips(sim.url, args.n))


if __name__ == "__main__":
    main()
