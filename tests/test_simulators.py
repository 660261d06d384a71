"""Simulated worlds and instrument processes: real data in, real protocol out."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from instruments_helpers import (  # noqa: F401 - fixtures
    CRYSTAL_WORLD,
    TABLE_WORLD,
    crystal_sim,
    crystal_truth,
    journal_records,
    simulator,
    table_replicates,
)

from devices.transport import LineTransport
from sdl.exceptions import InstrumentRejected
from simulators.faults import FaultRates
from simulators.worlds import CrystalWorld, TableWorld, WorldError, load_world


def test_table_world_draws_real_replicates_and_answers_off_table_from_nearest() -> None:
    world = load_world(TABLE_WORLD)
    assert isinstance(world, TableWorld)
    assert world.parameters == ("n", "theta", "r", "t") and world.properties == ("toughness",)
    truth = table_replicates()
    key, replicates = next(iter(truth.items()))
    rng = random.Random(0)
    seen = set()
    for _ in range(30):
        m = world.measure({"params": dict(zip(world.parameters, key, strict=True))}, rng)
        assert m.values["toughness"] in replicates and m.note is None
        seen.add(m.values["toughness"])
    assert len(seen) > 1  # several real replicates are drawn, not one made-up mean
    off = world.measure({"params": {"n": 6, "theta": 1.0, "r": 1.5, "t": 0.71}}, rng)
    assert off.note and "nearest" in off.note
    assert off.values["toughness"] in truth[(6.0, 0.0, 1.5, 0.7)]
    refusing = TableWorld(TABLE_WORLD, off_table="refuse")
    with pytest.raises(WorldError) as info:
        refusing.resolve({"params": {"n": 6, "theta": 1.0, "r": 1.5, "t": 0.71}})
    assert info.value.code == "OFF_TABLE"
    with pytest.raises(WorldError, match="lacks"):
        world.resolve({"params": {"n": 6}})
    with pytest.raises(WorldError, match="finite"):
        world.resolve({"params": {"n": float("nan"), "theta": 0, "r": 1.5, "t": 0.7}})


def test_crystal_world_returns_recorded_values_plus_configured_noise() -> None:
    world = load_world(CRYSTAL_WORLD)
    assert isinstance(world, CrystalWorld)
    truth = crystal_truth()
    cid = sorted(truth)[5]
    exact = world.measure({"candidate": cid}, random.Random(1), noise_std=0.0)
    assert exact.values == truth[cid]
    noisy = [world.measure({"candidate": cid}, random.Random(i), noise_std=0.1).values["e_form"] for i in range(200)]
    mean = sum(noisy) / len(noisy)
    spread = (sum((v - mean) ** 2 for v in noisy) / (len(noisy) - 1)) ** 0.5
    assert abs(mean - truth[cid]["e_form"]) < 0.05 and 0.07 < spread < 0.13
    with pytest.raises(WorldError) as info:
        world.resolve({"candidate": "perov_does_not_exist"})
    assert info.value.code == "BAD_RECIPE"


def test_crystal_world_xrd_pattern_is_pymatgens() -> None:
    from pymatgen.analysis.diffraction.xrd import XRDCalculator
    from pymatgen.core import Structure

    world = load_world(CRYSTAL_WORLD)
    cid = "perov_33"
    _, rows = world.raw(world.resolve({"candidate": cid}))
    import csv
    import gzip

    with gzip.open(CRYSTAL_WORLD, "rt", newline="") as handle:
        cif = next(r["cif"] for r in csv.DictReader(handle) if r["id"] == cid)
    pattern = XRDCalculator().get_pattern(Structure.from_str(cif, fmt="cif"), two_theta_range=(10, 90))
    assert [r[0] for r in rows] == pytest.approx(list(pattern.x))
    assert max(r[1] for r in rows) == pytest.approx(100.0)


def test_bad_world_files_are_named_in_the_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,x\n")
    with pytest.raises(WorldError, match=r"bad.csv:2 column 'b'"):
        load_world(bad)
    with pytest.raises(WorldError, match="not found"):
        load_world(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="drop"):
        FaultRates(drop=1.5)


def test_cli_reports_a_bad_world_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sdl.cli.main", "simulate", "--world", str(tmp_path / "no.csv")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "no.csv: world file not found" in proc.stderr and "Traceback" not in proc.stderr


def test_sdl_simulate_prints_its_url_first_and_answers_idn(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdl.cli.main", "simulate", "--world", str(TABLE_WORLD), "--listen", "127.0.0.1:0",
         "--instrument", "robot", "--serial", "SN-42"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = proc.stdout.readline().strip()  # type: ignore[union-attr]
        assert first.startswith("listening socket://127.0.0.1:")
        with LineTransport(first.split(" ", 1)[1], instrument="cli-sim") as line:
            idn = line.identify()
            assert (idn.model, idn.serial, idn.protocol) == ("robot", "SN-42", "SDL/1")
            with pytest.raises(InstrumentRejected, match="UNSUPPORTED"):
                line.command("MEASURE STATUS", "x")
    finally:
        proc.terminate()
        proc.wait(10)


def test_duplicate_job_id_never_synthesizes_twice(crystal_sim) -> None:  # noqa: F811
    journal = Path(crystal_sim.argv[crystal_sim.argv.index("--journal") + 1])
    with LineTransport(crystal_sim.url, instrument="robot") as line:
        first = line.command("SYNTH START", "dup-1", {"candidate": "perov_33"}).data
        again = line.command("SYNTH START", "dup-1", {"candidate": "perov_33"}).data
        assert first["duplicate"] is False and again["duplicate"] is True
        with pytest.raises(InstrumentRejected, match="DUPLICATE"):
            line.command("SYNTH START", "dup-1", {"candidate": "perov_60"})
        deadline = time.monotonic() + 10
        while line.command("SYNTH STATUS", "dup-1").data["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.02)
        done = line.command("SYNTH START", "dup-1", {"candidate": "perov_33"}).data
        assert done["duplicate"] is True and done["state"] == "done"
    started = [r for r in journal_records(journal) if r["event"] == "started" and r["job_id"] == "dup-1"]
    assert len(started) == 1


def test_journal_survives_a_simulator_restart(tmp_path: Path) -> None:
    journal = tmp_path / "robot.jsonl"
    with (
        simulator(CRYSTAL_WORLD, tmp_path, journal=journal, instrument="robot", time_scale=0.01) as sim,
        LineTransport(sim.url, instrument="robot") as line,
    ):
        line.command("SYNTH START", "keep-1", {"candidate": "perov_60"})
        line.command("SYNTH START", "keep-2", {"candidate": "perov_33"})  # BUSY until keep-1 ends
    # killed while keep-2 may still be running: on restart both jobs are known, none is started again
    with (
        simulator(CRYSTAL_WORLD, tmp_path, journal=journal, instrument="robot", time_scale=0.01) as sim,
        LineTransport(sim.url, instrument="robot") as line,
    ):
        deadline = time.monotonic() + 10
        while line.command("JOB?", "keep-2").data["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        job = line.command("JOB?", "keep-1").data
        assert job["state"] == "done" and job["recipe"] == {"candidate": "perov_60"}
        assert job["result"]["sample"]["key"] == "perov_60"
        again = line.command("SYNTH START", "keep-1", {"candidate": "perov_60"}).data
        assert again["duplicate"] is True
    records = journal_records(journal)
    assert [r["job_id"] for r in records if r["event"] == "started"] == ["keep-1", "keep-2"]
    assert {r["job_id"] for r in records if r["event"] == "finished"} == {"keep-1", "keep-2"}


def test_pty_mode_speaks_the_same_protocol(tmp_path: Path) -> None:
    with simulator(CRYSTAL_WORLD, tmp_path, pty=True) as sim:
        assert sim.url.startswith("/dev/")
        with LineTransport(sim.url, instrument="pty-sim", timeout=5) as line:
            assert line.identify().protocol == "SDL/1"
            line.command("MEASURE START", "p1", {"candidate": "perov_33"})
            deadline = time.monotonic() + 10
            while line.command("MEASURE STATUS", "p1").data["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.02)
            values = line.command("MEASURE RESULT", "p1").data["values"]
            assert values == crystal_truth()["perov_33"]
            with pytest.raises(InstrumentRejected, match="UNKNOWN"):
                line.command("FROB?")  # parse happens on the instrument: unknown command


def test_simulator_exits_with_its_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from simulators.server import start_simulator
        sim = start_simulator({str(TABLE_WORLD)!r}, exit_with_parent=True)
        print(sim.pid, flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())  # type: ignore[union-attr]
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("simulator outlived its SIGKILLed parent")


def test_a_torn_journal_line_from_a_crash_is_skipped(tmp_path: Path) -> None:
    from simulators.instruments import Journal, SimulatedInstruments

    journal = tmp_path / "j.jsonl"
    lab = SimulatedInstruments(load_world(CRYSTAL_WORLD), time_scale=0.0, journal=Journal(journal))
    from devices.protocol import parse_command

    lab.handle(parse_command('SYNTH START t1 {"candidate":"perov_33"}'))
    lab.tick()
    with journal.open("a") as handle:
        handle.write('{"event":"started","job_id":"t2","ki')  # the crash hit mid-write
    reloaded = SimulatedInstruments(load_world(CRYSTAL_WORLD), time_scale=0.0, journal=Journal(journal))
    assert set(reloaded.jobs) == {"t1"} and reloaded.jobs["t1"].state == "done"
