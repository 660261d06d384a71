"""Campaigns on a Prefect work pool (issue 13, item 3): ``sdl deploy``, ``sdl worker``, ``sdl submit``.

Real components: a local Prefect server (as ``sdl ui`` starts it), two ``sdl worker`` processes
(Prefect's ``ProcessWorker`` on a process pool), four crossed-barrel GP campaigns on zero-latency
simulator processes, one PostgreSQL repository. Every wait polls a real record (the repository, a
flow run, a worker's log) with a generous deadline; nothing is timed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from campaign_files import write_table_campaign
from typer.testing import CliRunner

from sdl.cli.main import app
from sdl.prefect_server import PrefectServer, free_port
from sdl.repository import Store

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
DEADLINE_S = 300.0
POOL = "test-lab"
END_STATES = ("completed", "failed", "abandoned")


def _until(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE_S) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    srv = PrefectServer(home=tmp_path_factory.mktemp("prefect-workpool"))
    srv.start(timeout=180)
    try:
        yield srv
    finally:
        srv.stop()


def _env(api: str, home: Path) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(home), "OMP_NUM_THREADS": "1",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "COLUMNS": "200"}


def _sdl(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdl.cli.main", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=240)


def _flow_run(api: str, flow_run_id: str) -> dict[str, Any]:
    reply = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30)
    reply.raise_for_status()
    run: dict[str, Any] = reply.json()
    return run


def _flow_run_count(api: str) -> int:
    reply = httpx.post(f"{api}/flow_runs/count", json={}, timeout=30)
    reply.raise_for_status()
    return int(reply.json())


def _queued_id(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    found = re.search(r"flow run ([0-9a-f-]{36})", result.stdout)
    assert found, result.stdout
    return found.group(1)


def _ended(url: str, name: str) -> int:
    store = Store.from_url(url)
    try:
        campaign = store.get_campaign(name)
        return 0 if campaign is None else len(store.experiments(campaign.id, END_STATES))
    except Exception:  # noqa: BLE001 - the first runner may not have made the schema yet
        return 0
    finally:
        store.close()


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2][:3]


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_two_workers_four_campaigns_one_lease_and_a_killed_worker_resumed(
        server: PrefectServer, fresh_postgres_url: str, tmp_path: Path) -> None:
    api, db = server.api_url, fresh_postgres_url
    env = _env(api, tmp_path / "prefect-client")
    # K runs long enough to be killed mid-way, also on a loaded machine where a flow run's process takes
    # tens of seconds to start (printer 6 s per experiment); B, C, D are quick.
    kept = write_table_campaign(tmp_path, "wp-killed", budget=12, time_scale=0.1)
    quick = [write_table_campaign(tmp_path, f"wp-{n}", budget=5, time_scale=0.002) for n in "bcd"]

    refused = _sdl("submit", str(kept), "--db", db, "--deployment", "nope", env=env, cwd=tmp_path)
    assert refused.returncode == 1 and "run `sdl deploy` first" in refused.stderr, refused.stderr
    deployed = _sdl("deploy", "--pool", POOL, env=env, cwd=tmp_path)
    assert deployed.returncode == 0, deployed.stderr[-3000:]

    workers: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    try:
        for name in ("w1", "w2"):
            logs[name] = tmp_path / f"{name}.log"
            with open(logs[name], "wb") as log:
                workers[name] = subprocess.Popen(
                    [sys.executable, "-m", "sdl.cli.main", "worker", "--pool", POOL, "--db", db, "--name", name,
                     "--limit", "2", "--state-dir", str(tmp_path / f"{name}-runs")],
                    env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True)
        for name in workers:
            _until(f"worker {name} started", lambda n=name: "started" in logs[n].read_text())

        first = _queued_id(_sdl("submit", str(kept), "--db", db, env=env, cwd=tmp_path))
        runs = {p.stem: _queued_id(_sdl("submit", str(p), "--db", db, env=env, cwd=tmp_path)) for p in quick[:2]}

        def measuring() -> bool:
            state = _flow_run(api, first)["state_type"]
            assert state in ("SCHEDULED", "PENDING", "RUNNING"), _flow_run(api, first)["state"]
            return _ended(db, "wp-killed") >= 2

        _until("the long campaign measuring", measuring)
        run = _flow_run(api, first)
        assert run["state_type"] == "RUNNING", run["state"]
        flow_pid = int(run["infrastructure_pid"])
        owner = next(n for n, w in workers.items() if w.pid == _parent(flow_pid))
        survivor = next(n for n in workers if n != owner)

        # No campaign runs twice at once: a second flow run of it fails on the repository lease.
        twice = _queued_id(_sdl("submit", str(kept), "--db", db, env=env, cwd=tmp_path))
        second = _until("the second run of the campaign refused",
                        lambda: (r := _flow_run(api, twice))["state_type"] in ("FAILED", "CRASHED", "COMPLETED") and r)
        assert second["state_type"] == "FAILED", second["state"]
        assert "is being run by flow run wp-killed" in second["state"]["message"], second["state"]["message"]
        assert _flow_run(api, first)["state_type"] == "RUNNING"

        for name, run_id in runs.items():
            done = _until(f"{name} finished", lambda i=run_id: (r := _flow_run(api, i))["state_type"]
                          in ("COMPLETED", "FAILED", "CRASHED") and r)
            assert done["state_type"] == "COMPLETED", (name, done["state"])

        # The worker that runs the long campaign dies with its flow run (a host lost): SIGKILL both groups.
        _kill_group(workers[owner].pid)
        _kill_group(flow_pid)
        workers[owner].wait(timeout=60)
        _until("the killed flow run's process gone", lambda: not _alive(flow_pid), timeout=60)
        at_kill = _ended(db, "wp-killed")
        assert 2 <= at_kill < 12, at_kill
        assert _flow_run(api, first)["state_type"] == "RUNNING"  # Prefect 3.8.8 does not notice: no zombie check

        # Resubmitted, it is resumed by the surviving worker (the dead runner's lease is taken over at once).
        again = _sdl("submit", str(kept), "--db", db, "--time-scale", "0.002", env=env, cwd=tmp_path)
        resumed = _queued_id(again)
        assert _flow_run(api, first)["state_type"] == "CRASHED", again.stderr  # marked by sdl submit: process gone
        runs["wp-killed"] = resumed
        runs["wp-d"] = _queued_id(_sdl("submit", str(quick[2]), "--db", db, env=env, cwd=tmp_path))
        for name, run_id in runs.items():
            done = _until(f"{name} finished", lambda i=run_id: (r := _flow_run(api, i))["state_type"]
                          in ("COMPLETED", "FAILED", "CRASHED") and r)
            assert done["state_type"] == "COMPLETED", (name, done["state"])
        assert workers[survivor].poll() is None, logs[survivor].read_text()[-3000:]
    finally:
        for proc in workers.values():
            _kill_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)

    store = Store.from_url(db)
    try:
        for name, budget in (("wp-killed", 12), ("wp-b", 5), ("wp-c", 5), ("wp-d", 5)):
            campaign = store.get_campaign(name)
            assert campaign is not None and campaign.state == "completed", (name, campaign)
            assert len(store.experiments(campaign.id, END_STATES)) == budget, name
        killed = store.get_campaign("wp-killed")
        assert killed is not None
        takeovers = store.events(killed.id, "campaign.lease_taken_over")
        assert len(takeovers) == 1 and "pid" in takeovers[0].message, [e.message for e in takeovers]
    finally:
        store.close()
    # Both workers took work: each log names the flow runs it submitted.
    taken = {name: set(re.findall(r"submitting flow run '([0-9a-f-]{36})'", text))
             - set(re.findall(r"Aborted submission of flow run '([0-9a-f-]{36})'", text))  # the other took it
             for name, text in ((n, p.read_text()) for n, p in logs.items())}
    assert first in taken[owner] and resumed in taken[survivor], taken
    assert all(taken.values()), taken
    assert set().union(*taken.values()) >= {first, twice, resumed, *runs.values()}, taken


def test_workers_and_submit_refuse_bad_input_in_one_line(server: PrefectServer, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    good = write_table_campaign(tmp_path, "wp-bad-input", budget=3, time_scale=0.002)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("goal: maximize", "goal: sideways"))
    dead_db = "postgresql+psycopg://postgres@127.0.0.1:1/nowhere"
    dead_api = f"http://127.0.0.1:{free_port()}/api"

    def one_line(args: list[str], code: int, message: str) -> None:
        result = runner.invoke(app, args)
        output = result.output.strip()
        assert result.exit_code == code, (args, output)
        assert message in output, (args, output)
        assert len(output.splitlines()) == 1, (args, output)

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    one_line(["worker", "--pool", POOL], 1, "PREFECT_API_URL is not set")
    monkeypatch.setenv("PREFECT_API_URL", dead_api)
    one_line(["worker", "--pool", POOL], 1, f"Prefect API {dead_api} is unreachable")
    one_line(["submit", str(good)], 1, f"Prefect API {dead_api} is unreachable")
    monkeypatch.setenv("PREFECT_API_URL", server.api_url)
    one_line(["worker", "--pool", POOL, "--db", dead_db], 1, "database postgresql+psycopg://postgres@127.0.0.1:1/"
             "nowhere is unreachable")
    before = _flow_run_count(server.api_url)
    one_line(["submit", str(bad), "--db", dead_db], 2, "objective.goal")
    one_line(["submit", str(good), "--db", dead_db], 1, "is unreachable")
    assert _flow_run_count(server.api_url) == before  # nothing queued
