"""The campaign as a real Prefect flow run (prefect_test_harness), on SQLite and PostgreSQL.

Checks what a person sees in the UI: one flow run named after the campaign and tagged with it,
a task run per instrument step, and the progress / table / markdown / link artifacts.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_lab import journal, world_values, write_campaign

for _key, _value in {
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
}.items():
    os.environ.setdefault(_key, _value)


@pytest.fixture(scope="module")
def harness() -> Iterator[None]:
    """One Prefect test server for the module (about 10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _flow_runs(name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))


def test_flow_runs_a_campaign_and_reports_it(harness: None, tmp_path: Path, database_url: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    from sdl.flows import artifact_key, run_campaign
    from sdl.repository import Store

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    name = f"flow-{uuid.uuid4().hex[:6]}"
    path = write_campaign(tmp_path, name=name, budget=4)
    progress: list[dict] = []
    summary = run_campaign(path, db_url=database_url, on_progress=progress.append)

    assert summary["state"] == "completed" and summary["counts"]["completed"] == 4
    dones = [p["done"] for p in progress]  # one call per experiment; done counts end states
    assert len(dones) == 4 and dones == sorted(dones) and dones[-1] == 4
    truth = world_values()
    store = Store.from_url(database_url)
    try:
        experiments = store.experiments(summary["campaign_id"])
        assert len(experiments) == 4 and {e.state for e in experiments} == {"completed"}
        assert summary["best_value"] == min(truth[e.candidate_key] for e in experiments)
        assert summary["true_best_value"] == min(truth.values())
    finally:
        store.close()

    runs = _flow_runs(name)
    assert len(runs) == 1
    run = runs[0]
    assert run.state.is_completed() and name in run.tags and run.parameters["config_path"] == str(path)
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 30  # the server records task runs in batches
        while True:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            names = {t.name for t in tasks}
            if (len(tasks) >= 12 and all(t.state.is_final() for t in tasks)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for i in range(1, 5):
            assert {f"experiment-{name}:{i}", f"synthesize-{name}:{i}", f"characterize-{name}:{i}"} <= names
        assert all(t.state.is_completed() for t in tasks)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    by_key = {}
    for a in artifacts:
        by_key.setdefault(a.key, []).append(a)
    assert {artifact_key(name, k) for k in ("progress", "best-candidates", "round", "summary",
                                            "plot-best-so-far")} <= set(by_key)
    assert by_key[artifact_key(name, "progress")][0].data == 100.0
    rounds = by_key[artifact_key(name, "round")]
    assert len(rounds) == 2  # retrain.every = 2 with a budget of 4
    assert any("Best so far" in a.data and "provenance" in a.data for a in rounds)
    table = by_key[artifact_key(name, "best-candidates")][0].data
    assert "perov_" in str(table)
    link = by_key[artifact_key(name, "plot-best-so-far")][0].data
    match = re.search(r"\((file://[^)]+)\)", link)  # stored as markdown: [text](file:///...png)
    assert match and Path(match.group(1).removeprefix("file://")).is_file()


def test_flow_resumes_a_finished_campaign_without_new_experiments(harness: None, tmp_path: Path,
                                                                  sqlite_url: str) -> None:
    from sdl.flows import run_campaign

    name = f"again-{uuid.uuid4().hex[:6]}"
    path = write_campaign(tmp_path, name=name, budget=3)
    first = run_campaign(path, db_url=sqlite_url)
    second = run_campaign(path, db_url=sqlite_url)
    assert first["counts"]["completed"] == second["counts"]["completed"] == 3
    assert second["best_value"] == first["best_value"]
    bigger = run_campaign(path, db_url=sqlite_url, budget=5)  # a larger budget continues the campaign
    assert bigger["counts"]["completed"] == 5

    from sdl.config import load_campaign
    from sdl.lab import state_dir_for

    class _Lab:  # the journal helper only needs the state dir and the name
        cfg = load_campaign(path)
        state_dir = state_dir_for(sqlite_url) / name

    started = [r["job_id"] for r in journal(_Lab, "robot0") if r["event"] == "started"]
    assert len(started) == len(set(started)) == 5
