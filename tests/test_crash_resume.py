"""Crash safety: ``kill -9`` a running ``sdl run`` at random points, several times, then rerun it.

Judged from two independent records: the repository, and the simulators' own journals (the
"instrument log", fsync'd by the simulator processes, which ``sdl run`` cannot touch):

* zero repeated syntheses: no job id started twice on the robot, one synthesis per experiment;
* zero lost measurements: every measurement the station finished with an ``ok`` flag is in the
  repository as an ``ok`` measurement of that experiment, with the same value;
* the campaign ends with exactly its budget of experiments in an end state.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_lab import write_campaign

from sdl.prefect_server import PrefectServer

BUDGET = 8


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Prefect server (as ``sdl ui`` starts it) that the ``sdl run`` processes report to."""
    server = PrefectServer(home=tmp_path_factory.mktemp("prefect-server"))
    server.start(timeout=180)
    try:
        yield server.api_url
    finally:
        server.stop()


def _experiments(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT id, state FROM experiments").fetchall()
    except sqlite3.Error:
        return []


def _sdl_run(yaml: Path, db: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sdl.cli.main", "run", str(yaml), "--db", f"sqlite:///{db}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)  # several `sdl run` processes: minutes on a loaded machine
def test_sigkill_at_random_points_then_resume(tmp_path: Path, prefect_api: str) -> None:
    rng = random.Random(20261122)
    yaml = write_campaign(tmp_path, name="crash", budget=BUDGET)
    # Slower instruments than the other tests so that kills land inside syntheses and measurements.
    yaml.write_text(yaml.read_text().replace("time_scale: 0.002", "time_scale: 0.006"))
    db = tmp_path / "lab.db"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    kills = 0
    for _ in range(3):
        before = len(_experiments(db))
        proc = _sdl_run(yaml, db, env)
        deadline = time.monotonic() + 240
        while len(_experiments(db)) <= before and proc.poll() is None:
            assert time.monotonic() < deadline, "sdl run made no progress"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=30)
        time.sleep(0.6)  # the simulators notice their parent is gone within 0.2 s
        states = dict(_experiments(db))
        if sum(s in ("completed", "failed", "abandoned") for s in states.values()) >= BUDGET:
            break
    assert kills >= 2, "the campaign finished before it could be killed: slow the instruments down"

    final = _sdl_run(yaml, db, env)
    _, err = final.communicate(timeout=300)
    assert final.returncode == 0, err.decode()[-3000:]

    from sdl.lab import campaign_token, job_id_for
    from sdl.repository import Store

    store = Store.from_url(f"sqlite:///{db}")
    try:
        campaign = store.get_campaign("crash")
        experiments = store.experiments(campaign.id)
        token = campaign_token(campaign)
        by_job = {job_id_for(e.idempotency_key, token): e for e in experiments}
        states = [e.state for e in experiments]
        assert sum(s in ("completed", "failed", "abandoned") for s in states) == BUDGET
        assert not {"proposed", "running"} & set(states)
        assert store.get_campaign(campaign.id).state == "completed"

        journals = tmp_path / "sdl-runs" / "crash"
        robot = [json.loads(x) for x in (journals / "crash.robot0.journal.jsonl").read_text().splitlines() if x]
        station = [json.loads(x) for x in (journals / "crash.station0.journal.jsonl").read_text().splitlines() if x]

        started = [r["job_id"] for r in robot if r["event"] == "started"]
        assert len(started) == len(set(started)), "a job was synthesized twice"
        assert set(started) <= set(by_job), "the robot made something no experiment asked for"
        for e in experiments:
            if e.state == "completed":
                assert job_id_for(e.idempotency_key, token) in started

        finished_ok = [r for r in station if r["event"] == "finished" and r["result"]["quality"] == "ok"]
        assert finished_ok, "no measurement finished"
        for record in finished_ok:
            experiment = by_job[record["job_id"].rsplit(".m", 1)[0]]
            stored = [m for m in store.measurements(experiment_id=experiment.id)
                      if m.quality == "ok" and m.property == "e_form"]
            assert stored, f"measurement {record['job_id']} of experiment {experiment.id} was lost"
            assert any(m.value == pytest.approx(record["result"]["values"]["e_form"]) for m in stored)
            assert experiment.state == "completed"
        for e in experiments:
            if e.state == "completed":
                assert any(m.quality == "ok" for m in store.measurements(experiment_id=e.id))
        reconciled = [
            *store.events(campaign.id, "experiment.reconciled"),
            *store.events(campaign.id, "experiment.resumed"),
        ]
        assert reconciled, "no experiment was caught mid-run: the kills did not test resume"
    finally:
        store.close()


def _flow_run_states(api: str, name: str) -> list[str]:
    """States of the flow runs named ``name`` on the Prefect server at ``api``."""
    import httpx

    reply = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"any_": [name]}}}, timeout=30)
    reply.raise_for_status()
    return [run["state_type"] for run in reply.json()]


def test_sdl_run_on_a_dead_robot_fails_fast_in_one_line(tmp_path: Path, prefect_api: str) -> None:
    """A robot whose URL does not answer: exit 1, one error line naming it, a Failed flow run."""
    yaml = write_campaign(tmp_path, name="dead-robot", budget=4, robot_url="socket://127.0.0.1:1", timeout_s=0.3,
                          outage_window_s=2.0)
    db = tmp_path / "lab.db"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    proc = subprocess.run(
        [sys.executable, "-m", "sdl.cli.main", "run", str(yaml), "--db", f"sqlite:///{db}"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(errors) <= 3, errors
    assert any("robot0" in line and "socket://127.0.0.1:1" in line for line in errors), errors
    assert _experiments(db) == []
    deadline = time.monotonic() + 30
    while (states := _flow_run_states(prefect_api, "dead-robot")) != ["FAILED"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert states == ["FAILED"]
    log = (tmp_path / "sdl-runs" / "dead-robot.log").read_text()
    assert "robot0" in log and "Traceback" in log  # the details are kept for whoever debugs it


@pytest.mark.slow
@pytest.mark.timeout(600)  # several `sdl run` processes: minutes on a loaded machine
def test_sigint_lets_jobs_in_flight_finish_and_a_rerun_resumes(tmp_path: Path, prefect_api: str) -> None:
    yaml = write_campaign(tmp_path, name="ctrl-c", budget=BUDGET, batch_size=2)
    yaml.write_text(yaml.read_text().replace("time_scale: 0.002", "time_scale: 0.02"))
    db = tmp_path / "lab.db"
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "OMP_NUM_THREADS": "1"}
    proc = _sdl_run(yaml, db, env)
    deadline = time.monotonic() + 240
    while not any(state == "running" for _, state in _experiments(db)):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr.decode()
    states = [state for _, state in _experiments(db)]
    assert "abandoned" not in states and "running" not in states and "completed" in states, states
    assert len(states) < BUDGET
    rerun = _sdl_run(yaml, db, env)
    _, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr.decode()
    assert [state for _, state in _experiments(db)] == ["completed"] * BUDGET
