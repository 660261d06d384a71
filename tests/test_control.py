"""Pause, resume, cancel and approve a running campaign from another process (issue 11, items 2 and 3).

Real components: ``sdl run`` subprocesses on simulated instruments reporting to a local Prefect
server, the CLI commands in other subprocesses, the repository on SQLite (the control store also on
PostgreSQL), and the Prefect API exactly as the UI calls it (``Cancelling``, resume with input).
Every wait polls a real record (the repository, the flow run) with a generous deadline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from test_lab import write_campaign
from typer.testing import CliRunner

from sdl.cli.main import app
from sdl.prefect_server import PrefectServer
from sdl.repository import Store
from sdl.repository.control import (
    add_pending_approvals,
    approvals,
    control_of,
    control_states,
    decide_approvals,
    reset_control,
    set_control,
)
from sdl.repository.schema import utcnow

T = TypeVar("T")
DEADLINE_S = 240.0


def _until(what: str, probe: Callable[[], T | None], *, proc: subprocess.Popen[bytes] | None = None,
           timeout: float = DEADLINE_S) -> T:
    """Poll ``probe`` until it returns something truthy (fail with ``what`` after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: sdl run exited {proc.returncode}: "
                                 f"{proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Prefect server (as ``sdl ui`` starts it) that the campaigns report to."""
    server = PrefectServer(home=tmp_path_factory.mktemp("prefect-server"))
    server.start(timeout=180)
    try:
        yield server.api_url
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _no_orphans() -> Iterator[None]:
    """A failing test must not leave its ``sdl run`` behind (it would wait, paused, for ever)."""
    yield
    for proc in _SPAWNED:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    _SPAWNED.clear()


_SPAWNED: list[subprocess.Popen[bytes]] = []


def _env(api: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _sdl_run(yaml: Path, url: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-m", "sdl.cli.main", "run", str(yaml), "--db", url],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _SPAWNED.append(proc)
    return proc


def _sdl(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdl.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=240)


def _states(url: str, name: str) -> list[str]:
    store = Store.from_url(url)
    try:
        campaign = store.get_campaign(name)
        return [] if campaign is None else [e.state for e in store.experiments(campaign.id)]
    except Exception:  # noqa: BLE001 - the runner may not have created the schema yet
        return []
    finally:
        store.close()


def _campaign(url: str, name: str) -> tuple[Store, Any]:
    store = Store.from_url(url)
    campaign = store.get_campaign(name)
    assert campaign is not None
    return store, campaign


def _flow_run_state(api: str, flow_run_id: str) -> str:
    import httpx

    reply = httpx.get(f"{api}/flow_runs/{flow_run_id}", timeout=30)
    reply.raise_for_status()
    return str(reply.json()["state_type"])


def _flow_run_id(url: str, name: str) -> str | None:
    store = Store.from_url(url)
    try:
        campaign = store.get_campaign(name)
        row = None if campaign is None else control_of(store, campaign.id)
        return None if row is None else row.flow_run_id
    except Exception:  # noqa: BLE001 - not created yet
        return None
    finally:
        store.close()


# --------------------------------------------------------------------------- the control store


def test_control_and_approval_records_on_both_databases(database_url: str) -> None:
    from sdl.exceptions import RepositoryError

    store = Store.from_url(database_url, create=True)
    try:
        campaign = store.get_or_create_campaign("ctl", snapshot={}, config_hash="h", seed=0, budget=4)
        assert control_of(store, campaign.id) is None
        set_control(store, campaign.id, "paused", by="ann@lab", reason="sdl pause")
        assert control_states(store) == {campaign.id: "paused"}
        row = control_of(store, campaign.id)
        assert row is not None and (row.state, row.requested_by) == ("paused", "ann@lab")
        # A run that starts after the request keeps it; a request older than the run is forgotten.
        assert reset_control(store, campaign.id, older_than=row.updated_at).state == "paused"
        assert reset_control(store, campaign.id, older_than=utcnow()).state == "running"
        with pytest.raises(RepositoryError, match="control state"):
            set_control(store, campaign.id, "exploded", by="x")

        ids = add_pending_approvals(store, campaign.id, [
            {"candidate_key": "a", "params": {}, "batch_id": "b1", "predicted_mean": 1.0, "predicted_std": 0.5},
            {"candidate_key": "b", "params": {"x": 1}, "batch_id": "b1"},
        ])
        assert control_states(store) == {campaign.id: "awaiting approval"}
        with pytest.raises(RepositoryError, match="edit needs"):
            decide_approvals(store, campaign.id, {ids[0]: "edited"}, by="bo", via="cli")
        decided = decide_approvals(store, campaign.id, {ids[0]: "accepted", ids[1]: "dropped"}, by="bo", via="cli")
        assert [(d.decision, d.decided_by, d.via) for d in decided] == [
            ("accepted", "bo", "cli"), ("dropped", "bo", "cli")]
        with pytest.raises(RepositoryError, match="not waiting"):  # a decision is never overwritten
            decide_approvals(store, campaign.id, {ids[1]: "accepted"}, by="cy", via="cli")
        assert [a.decision for a in approvals(store, campaign.id)] == ["accepted", "dropped"]
        assert len(store.events(campaign.id, "approval.*")) == 2
        assert control_states(store) == {}
    finally:
        store.close()


# --------------------------------------------------------------------------- bad input


def test_control_commands_refuse_unknown_or_idle_campaigns_and_write_nothing(sqlite_url: str) -> None:
    store = Store.from_url(sqlite_url, create=True)
    campaign = store.get_or_create_campaign("idle", snapshot={}, config_hash="h", seed=0, budget=4)
    store.set_campaign_state(campaign.id, "stopped", reason="test")
    before = len(store.events())
    runner = CliRunner()
    cases = [
        (["pause", "nope", "--db", sqlite_url], "no such campaign"),
        (["cancel", "nope", "--db", sqlite_url], "no such campaign"),
        (["cancel", "idle", "--db", sqlite_url], "is not running"),
        (["pause", "idle", "--db", sqlite_url], "is not running"),
        (["resume", "idle", "--db", sqlite_url], "is not running"),
        (["approve", "idle", "--db", sqlite_url], "is not running"),
        (["approvals", "nope", "--db", sqlite_url], "no such campaign"),
    ]
    for args, message in cases:
        result = runner.invoke(app, args)
        output = result.output.strip()
        assert result.exit_code == 1, (args, output)
        assert message in output, (args, output)
        assert len(output.splitlines()) == 1, (args, output)
    # A live runner that is not paused: resume is refused, approve finds nothing waiting.
    lease = store.acquire_lease(campaign.id, holder="test", host="h", pid=os.getpid())
    store.set_campaign_state(campaign.id, "running", reason="test")
    before = len(store.events())
    for args, message in [(["resume", "idle", "--db", sqlite_url], "is not paused"),
                          (["approve", "idle", "--db", sqlite_url], "no proposals wait")]:
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and message in result.output, result.output
    assert len(store.events()) == before, "a refused command wrote something"
    assert control_of(store, campaign.id) is None
    store.release_lease(campaign.id, lease)
    store.close()


# --------------------------------------------------------------------------- real campaigns


@pytest.mark.slow
@pytest.mark.timeout(600)  # several `sdl run` processes: minutes on a loaded machine
def test_pause_resume_then_cancel_from_another_terminal_and_resume_to_budget(tmp_path: Path,
                                                                             prefect_api: str) -> None:
    budget = 6
    yaml = write_campaign(tmp_path, name="ctl-run", budget=budget, batch_size=2)
    yaml.write_text(yaml.read_text().replace("time_scale: 0.002", "time_scale: 0.05"))  # 3 s syntheses
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    env = _env(prefect_api)
    proc = _sdl_run(yaml, url, env)
    _until("an experiment running", lambda: "running" in _states(url, "ctl-run"), proc=proc)

    paused = _sdl("pause", "ctl-run", "--db", url, "--by", "ann", env=env)
    assert paused.returncode == 0, paused.stderr
    store, campaign = _campaign(url, "ctl-run")
    _until("the runner to pause", lambda: store.events(campaign.id, "campaign.paused"), proc=proc)
    # In flight finishes; nothing new is proposed: every experiment ends, and the run stays up.
    _until("in-flight experiments to end",
           lambda: (s := _states(url, "ctl-run")) and not {"proposed", "running"} & set(s), proc=proc)
    ended = len(_states(url, "ctl-run"))
    assert ended < budget
    status = _sdl("status", "--db", url, "--json", env=env)
    assert '"state": "paused"' in status.stdout, status.stdout
    time.sleep(3.0)  # an observation window, not a synchronisation: a paused runner proposes nothing
    assert len(_states(url, "ctl-run")) == ended and proc.poll() is None

    resumed = _sdl("resume", "ctl-run", "--db", url, env=env)
    assert resumed.returncode == 0, resumed.stderr
    _until("a new experiment running after resume",
           lambda: "running" in _states(url, "ctl-run")[ended:], proc=proc)

    cancelled = _sdl("cancel", "ctl-run", "--db", url, "--by", "bo", env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err.decode()[-3000:]
    states = _states(url, "ctl-run")
    assert "running" not in states and "abandoned" in states, states
    abandoned = [e for e in store.experiments(campaign.id) if e.state == "abandoned"]
    assert all("cancelled by bo" in (e.failure_reason or "") or "abort" in (e.failure_reason or "").lower()
               for e in abandoned), [e.failure_reason for e in abandoned]
    robot = (tmp_path / "sdl-runs" / "ctl-run" / "ctl-run.robot0.journal.jsonl").read_text()
    assert '"aborted"' in robot, "the robot never saw an ABORT"
    assert store.lease(campaign.id) is None
    flow_run_id = _flow_run_id(url, "ctl-run")
    assert flow_run_id and _flow_run_state(prefect_api, flow_run_id) == "CANCELLED"
    assert '"state": "cancelled"' in _sdl("status", "--db", url, "--json", env=env).stdout
    refused = _sdl("cancel", "ctl-run", "--db", url, env=env)
    assert refused.returncode == 1 and "is not running" in refused.stderr

    rerun = _sdl_run(yaml, url, env)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-3000:]
    states = _states(url, "ctl-run")
    assert sum(s in ("completed", "failed", "abandoned") for s in states) == budget, states
    assert store.get_campaign(campaign.id).state == "completed"
    assert '"state": "completed"' in _sdl("status", "--db", url, "--json", env=env).stdout
    store.close()


@pytest.mark.slow
def test_prefect_cancel_button_ends_the_campaign_cleanly(tmp_path: Path, prefect_api: str) -> None:
    """The UI's Cancel: the flow run is set Cancelling through the API, as the button does."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    yaml = write_campaign(tmp_path, name="ctl-ui-cancel", budget=6, batch_size=2)
    yaml.write_text(yaml.read_text().replace("time_scale: 0.002", "time_scale: 0.05"))
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    env = _env(prefect_api)
    proc = _sdl_run(yaml, url, env)
    _until("an experiment running", lambda: "running" in _states(url, "ctl-ui-cancel"), proc=proc)
    flow_run_id = _until("the flow run id", lambda: _flow_run_id(url, "ctl-ui-cancel"), proc=proc)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        result = client.set_flow_run_state(flow_run_id, Cancelling(message="Cancel button"))
    assert result.state is not None and result.state.is_cancelling(), result
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err.decode()[-3000:]
    store, campaign = _campaign(url, "ctl-ui-cancel")
    states = [e.state for e in store.experiments(campaign.id)]
    assert "running" not in states and "abandoned" in states, states
    assert store.lease(campaign.id) is None
    assert _flow_run_state(prefect_api, flow_run_id) == "CANCELLED"
    row = control_of(store, campaign.id)
    assert row is not None and row.state == "cancelled" and "Prefect" in row.requested_by
    store.close()


@pytest.mark.slow
def test_approval_through_sdl_approve_and_the_prefect_form(tmp_path: Path, prefect_api: str) -> None:
    """Batches wait; one is approved with a drop from the terminal, one through the form with an edit."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from test_lab import world_values

    name = "ctl-approve"
    yaml = write_campaign(tmp_path, name=name, budget=3, batch_size=2)
    yaml.write_text(yaml.read_text().replace("mode: batch}", "mode: batch, approval: required}"))
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    env = _env(prefect_api)
    proc = _sdl_run(yaml, url, env)

    def pending() -> list[Any]:
        try:
            store, campaign = _campaign(url, name)
        except Exception:  # noqa: BLE001 - not created yet
            return []
        try:
            return approvals(store, campaign.id, decision="pending")
        finally:
            store.close()

    first = _until("the first batch to wait", pending, proc=proc)
    assert len(first) == 2 and _states(url, name) == []  # nothing becomes an experiment before approval
    assert '"state": "awaiting approval"' in _sdl("status", "--db", url, "--json", env=env).stdout
    bad = _sdl("approve", name, "--db", url, "--drop", "999999", env=env)
    assert bad.returncode == 1 and "999999" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    ok = _sdl("approve", name, "--db", url, "--drop", str(first[0].id), "--by", "ann", env=env)
    assert ok.returncode == 0, ok.stderr

    second = _until("the second batch to wait", pending, proc=proc)
    flow_run_id = _until("the flow run", lambda: _flow_run_id(url, name), proc=proc)
    _until("the flow run to pause with its form", lambda: _flow_run_state(prefect_api, flow_run_id) == "PAUSED",
           proc=proc)
    taken = {a.candidate_key for a in [*first, *second]}
    instead = next(k for k in sorted(world_values()) if k not in taken)
    with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        resumed = client.resume_flow_run(flow_run_id, run_input={  # what the UI's Resume form sends
            "approved_by": "bo", "drop": [], "replace": {str(second[0].id): instead}})
    assert resumed.status.value == "ACCEPT", resumed
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]

    store, campaign = _campaign(url, name)
    rows = {a.id: a for a in approvals(store, campaign.id)}
    assert (rows[first[0].id].decision, rows[first[0].id].decided_by, rows[first[0].id].via) == ("dropped", "ann",
                                                                                                  "cli")
    assert rows[first[1].id].decision == "accepted" and rows[first[1].id].experiment_id is not None
    edited = rows[second[0].id]
    assert (edited.decision, edited.decided_by, edited.via, edited.edited_candidate_key) == (
        "edited", "bo", "prefect-ui", instead)
    experiments = {e.id: e for e in store.experiments(campaign.id)}
    assert experiments[edited.experiment_id].candidate_key == instead
    keys = [e.candidate_key for e in experiments.values()]
    assert first[0].candidate_key not in keys, "a dropped proposal was run"
    assert len(experiments) == 3 and all(e.state == "completed" for e in experiments.values())
    listing = _sdl("approvals", name, "--db", url, "--json", env=env)
    assert listing.returncode == 0 and '"via": "prefect-ui"' in listing.stdout
    store.close()


@pytest.mark.slow
def test_cancel_of_a_served_deployment_run_records_its_jobs_abandoned(tmp_path: Path, prefect_api: str) -> None:
    """``sdl serve``: Prefect's runner kills the run's process with SIGTERM; the campaign still ends cleanly."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    name = "ctl-served"
    yaml = write_campaign(tmp_path, name=name, budget=6, batch_size=2)
    yaml.write_text(yaml.read_text().replace("time_scale: 0.002", "time_scale: 0.05"))
    url = f"sqlite:///{tmp_path / 'lab.db'}"
    env = {**_env(prefect_api), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    serve = subprocess.Popen([sys.executable, "-m", "sdl.cli.main", "serve", "--name", "ctl-served"], env=env,
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
            deployment = _until("the deployment", lambda: _deployment(client, "sdl-campaign/ctl-served"), proc=serve)
            run = client.create_flow_run_from_deployment(deployment, parameters={
                "config_path": str(yaml), "db_url": url})
            _until("an experiment running", lambda: "running" in _states(url, name), proc=serve)
            client.set_flow_run_state(run.id, Cancelling(message="Cancel button"))
            _until("the flow run to end Cancelled",
                   lambda: client.read_flow_run(run.id).state_type.value in ("CANCELLED", "CRASHED", "FAILED"),
                   proc=serve)
            assert client.read_flow_run(run.id).state_type.value == "CANCELLED"
        store, campaign = _campaign(url, name)
        _until("the lease released", lambda: store.lease(campaign.id) is None)
        states = [e.state for e in store.experiments(campaign.id)]
        assert "running" not in states and "abandoned" in states, states
        assert store.get_campaign(campaign.id).state == "stopped"
        row = control_of(store, campaign.id)
        assert row is not None and row.state == "cancelled"
        store.close()
    finally:
        serve.terminate()
        serve.wait(timeout=60)


def _deployment(client: Any, name: str) -> Any:
    try:
        return client.read_deployment_by_name(name).id
    except Exception:  # noqa: BLE001 - not registered yet
        return None
