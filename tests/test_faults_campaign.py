"""A campaign under injected faults: 10 % line faults per command, plus lost samples and drift.

The simulators log every fault they inject; the campaign must still finish its budget, every
injected line fault must be in the repository's event log, no faulty reply may become an ``ok``
measurement, and a material failure must be recorded once and never retried (a separate
campaign in which every synthesis fails makes that check deterministic).
"""

from __future__ import annotations

import re
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from test_lab import world_values, write_campaign

LINE_FAULTS = "timeout: 0.02, garbled: 0.03, drop: 0.02, busy: 0.03"  # 10 % of commands


def test_campaign_survives_faults(harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdl.flows import run_campaign
    from sdl.repository import Store

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    name = f"faulty-{uuid.uuid4().hex[:6]}"
    faults = f"{LINE_FAULTS}, failed_synthesis: 0.2, drift: 0.2"
    path = write_campaign(tmp_path, name=name, budget=10, faults=faults, timeout_s=0.4, max_failures=10)
    db = f"sqlite:///{tmp_path / 'faults.db'}"
    summary = run_campaign(path, db_url=db)

    counts = summary["counts"]
    assert summary["state"] == "completed"
    assert counts["completed"] + counts["failed"] + counts["abandoned"] == 10
    assert counts["proposed"] == counts["running"] == 0

    injected: Counter[str] = Counter()
    for log in (tmp_path / "state" / name).glob("*.log"):
        injected.update(re.findall(r"fault (\w+) injected", log.read_text()))
    assert sum(injected.values()) >= 5, f"too few faults injected to mean anything: {injected}"

    truth = world_values()
    store = Store.from_url(db)
    try:
        cid = summary["campaign_id"]
        logged = Counter(e.payload["fault"] for e in store.events(cid, "instrument.fault"))
        for kind in ("timeout", "garbled", "drop", "busy"):
            assert logged[kind] == injected[kind], f"{kind}: {injected[kind]} injected, {logged[kind]} logged"

        experiments = {e.id: e for e in store.experiments(cid)}
        measurements = store.measurements(campaign_id=cid)
        ok = [m for m in measurements if m.quality == "ok"]
        for m in ok:  # no garbled or drifted reply became a measurement
            assert m.value == pytest.approx(truth[m.candidate_key])
            assert experiments[m.experiment_id].state == "completed"
        drifted = [m for m in measurements if m.quality == "drift"]
        for m in drifted:
            assert m.value != pytest.approx(truth[m.candidate_key])
        assert {m.experiment_id for m in ok} == {i for i, e in experiments.items() if e.state == "completed"}
        if drifted:
            assert store.events(cid, "measurement.flagged")

        for e in experiments.values():
            if e.state == "failed":
                assert e.failure_kind == "material"
                assert not [m for m in measurements if m.experiment_id == e.id]
    finally:
        store.close()


def test_material_failures_are_recorded_and_never_retried(harness: None, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every synthesis loses its sample: each experiment fails once, as ``material``, with no retry."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName

    from sdl.flows import run_campaign
    from sdl.repository import Store

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    name = f"lost-{uuid.uuid4().hex[:6]}"
    path = write_campaign(tmp_path, name=name, budget=3, faults="failed_synthesis: 1.0")
    db = f"sqlite:///{tmp_path / 'lost.db'}"
    summary = run_campaign(path, db_url=db)
    assert summary["counts"]["failed"] == 3 and summary["state"] == "completed"
    store = Store.from_url(db)
    try:
        experiments = store.experiments(summary["campaign_id"])
        assert len({e.candidate_key for e in experiments}) == 3  # a lost candidate is not proposed again
        assert not store.measurements(campaign_id=summary["campaign_id"])
        journal = (tmp_path / "state" / name / f"{name}.robot0.journal.jsonl").read_text().splitlines()
        assert sum('"event":"started"' in line for line in journal) == 3
        with get_client(sync_client=True) as client:
            for e in experiments:
                assert e.state == "failed" and e.failure_kind == "material" and "sample lost" in e.failure_reason
                deadline = time.monotonic() + 30  # the server records task runs in batches
                while True:
                    runs = client.read_task_runs(task_run_filter=TaskRunFilter(
                        name=TaskRunFilterName(any_=[f"experiment-{e.idempotency_key}"])))
                    if (runs and runs[0].state.is_final()) or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert len(runs) == 1 and runs[0].run_count == 1 and runs[0].state.is_completed()
                logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[runs[0].id])))
                assert not [g for g in logs if "; retry " in g.message], "a material failure was retried"
    finally:
        store.close()
