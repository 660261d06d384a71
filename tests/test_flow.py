"""The campaign as a real Prefect flow run (prefect_test_harness), on SQLite and PostgreSQL.

Checks what a person sees in the UI: one flow run named after the campaign and tagged with it,
one task run per experiment (its instrument steps retry inside it), and the progress / table /
markdown / link artifacts.
"""

from __future__ import annotations

import base64
import csv
import gzip
import json
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from test_lab import WORLD, journal, world_values, write_campaign


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
    # the listeners' best is the loop's own tally: the same as the repository's at the end
    assert (progress[-1]["best_value"], progress[-1]["best_candidate"]) == (summary["best_value"],
                                                                            summary["best_candidate"])
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
            if (len(tasks) >= 4 and all(t.state.is_final() for t in tasks)) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # one task run per experiment: its instrument steps (and their retries) run inside it
        assert {f"experiment-{name}:{i}" for i in range(1, 5)} <= names
        assert not any(n.startswith(("synthesize-", "characterize-")) for n in names)
        assert all(t.state.is_completed() for t in tasks)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    by_key: dict[str, list] = {}
    for a in artifacts:
        by_key.setdefault(a.key, []).append(a)
    page = {artifact_key(name, k) for k in ("progress", "report", "proposals", "best-candidates", "summary",
                                            "plot-best-so-far", "plot-recall")}
    assert page <= set(by_key), sorted(by_key)
    assert all(len(v) == 1 for v in by_key.values()), "one card per key, updated in place every round"
    assert by_key[artifact_key(name, "progress")][0].data == 100.0
    report = by_key[artifact_key(name, "report")][0]
    # retrain.every = 2 with a budget of 4: the card shows round 2 first, round 1 below
    assert report.data.index("round 2 (latest)") < report.data.index("Earlier rounds") and "Best so far" in report.data
    assert report.description.startswith("Round 2 report") and " eV" in report.description
    table = by_key[artifact_key(name, "best-candidates")][0].data
    rows = json.loads(table)
    with gzip.open(WORLD, "rt", newline="") as handle:
        formula_of = {row["id"]: row["formula"] for row in csv.DictReader(handle)}
    assert {r["candidate"] for r in rows} == {e.candidate_key for e in experiments}
    assert all(r["formula"] == formula_of[r["candidate"]] for r in rows) and "e_form (eV)" in rows[0]
    plot = by_key[artifact_key(name, "plot-best-so-far")][0]
    match = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", plot.data)
    assert match and base64.b64decode(match.group(1))[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in plot.description  # the thumbnail on the flow run's Artifacts tab

    lines = _flow_run_logs(run.id, lambda got: sum("measured " in m for m in got) >= 4)
    assert sum(m.startswith("proposed ") for m in lines) == 4 and sum(m.startswith("measured ") for m in lines) == 4
    measured = next(m for m in lines if m.startswith(f"measured {name}:1: "))
    key = measured.split("(")[1].split(")")[0]
    assert measured == f"measured {name}:1: {formula_of[key]} ({key}): e_form = {truth[key]:.4g} eV", measured
    assert not any(m.startswith("Finished in state Completed") for m in lines[1:-1]), "per-task state lines"


def _flow_run_logs(flow_run_id: uuid.UUID, ready: Callable[[list[str]], bool]) -> list[str]:
    """Messages of a flow run and its task runs, oldest first (polls: logs arrive in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    deadline = time.monotonic() + 60
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                    sort=LogSort.TIMESTAMP_ASC, limit=200)
            messages = [log.message for log in logs]
            if ready(messages) or time.monotonic() > deadline:
                return messages
            time.sleep(0.5)


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


@pytest.mark.slow
def test_flow_warm_starts_a_second_campaign_from_the_first(harness: None, tmp_path: Path, sqlite_url: str) -> None:
    """``transfer:`` end to end: the first campaign's 6 measurements seed the second's GP, not its budget."""
    from sdl.flows import run_campaign
    from sdl.repository import Store

    tag = uuid.uuid4().hex[:6]
    first = run_campaign(write_campaign(tmp_path, name=f"first-{tag}", budget=6, model="gp"), db_url=sqlite_url)
    path = write_campaign(tmp_path, name=f"second-{tag}", budget=4, model="gp")
    path.write_text(path.read_text() + f"transfer: {{campaigns: [first-{tag}]}}\n")
    second = run_campaign(path, db_url=sqlite_url)
    assert first["counts"]["completed"] == 6
    assert second["state"] == "completed" and second["counts"]["completed"] == 4  # its own budget, all of it
    store = Store.from_url(sqlite_url)
    try:
        versions = store.model_versions(second["campaign_id"])
        assert versions and all(v.info["transfer"] == {"campaigns": [f"first-{tag}"], "measurements": 6}
                                for v in versions)
        assert all(v.n_train <= 4 for v in versions)  # trained on its own labels (+ the related task)
        status = {s["name"]: s for s in store.campaign_summaries()}[f"second-{tag}"]
        assert status["counts"]["completed"] == 4 and status["n_measurements"] == 4
    finally:
        store.close()
