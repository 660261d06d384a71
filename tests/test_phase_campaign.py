"""Campaigns whose samples may not be the target: the loop learns it as a material failure.

A station with ``phase_identification`` reads every sample's XRD pattern; the simulator makes a
seeded share of the samples impure (a real competing phase of the same composition). Those
experiments must fail as ``material`` with the identified phase in their reason, never be retried,
never look like an instrument fault or outage, and their candidates must leave the pool. The
simulators' journals are the ground truth the repository is checked against.
"""

from __future__ import annotations

import csv
import gzip
import json
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "simulators" / "worlds" / "perovskites_demo.csv.gz"
PHASES = ROOT / "simulators" / "worlds" / "competing_phases_demo.csv.gz"


def write_campaign(tmp_path: Path, *, name: str, budget: int, impurity_rate: float, batch_size: int = 2) -> Path:
    """A small crystal campaign (random model) whose station identifies phases."""
    text = f"""
name: {name}
seed: 3
search_space:
  candidates: {{file: {WORLD}, id_column: id, structure_column: cif, formula_column: formula}}
objective: {{property: e_form, unit: eV, goal: minimize}}
model: {{name: random}}
acquisition: {{function: qucb, batch_size: {batch_size}}}
initial_design: {{strategy: random, size: {batch_size}}}
budget: {{experiments: {budget}, max_failures: {budget}}}
instruments:
  - {{name: robot0, role: synthesis, simulated: true, world: {WORLD}, simulator: {{time_scale: 0.002}}}}
  - name: station0
    role: characterization
    simulated: true
    world: {WORLD}
    measures: [e_form]
    simulator: {{time_scale: 0.002, impurity_rate: {impurity_rate}, xrd_strain: 0.005, xrd_intensity_noise: 0.05}}
    phase_identification: {{competing_phases: {PHASES}, threshold: 0.5}}
"""
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


def world_values() -> dict[str, float]:
    with gzip.open(WORLD, "rt", newline="") as handle:
        return {row["id"]: float(row["e_form"]) for row in csv.DictReader(handle)}


def journal(state_dir: Path, name: str, instrument: str) -> list[dict]:
    path = state_dir / name / f"{name}.{instrument}.journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def sample_truths(state_dir: Path, name: str) -> dict[str, dict]:
    """Measurement job id → the phases the station's simulator says the sample held."""
    return {r["job_id"]: r["phases"] for r in journal(state_dir, name, "station0")
            if r["event"] == "finished" and "phases" in r}


def check_against_truth(store, campaign_id: int, truths: dict[str, dict]) -> tuple[int, int, int]:
    """Every experiment ended as its sample's XRD verdict says, and the verdicts match the truth.

    Returns:
        (failed, completed, verdicts that disagree with the simulator's truth). Two CMR variants of
        one composition can be nearly indistinguishable by powder XRD (measured on the demo world:
        about 1 sample in 400 at the strain and noise used here), so the caller allows at most one.
    """
    values = world_values()
    failed = completed = wrong = 0
    for e in store.experiments(campaign_id):
        # measurement job ids are "<campaign token>.<idempotency key>.m<attempt>"
        (truth,) = [t for job, t in truths.items() if job.endswith(f".{e.idempotency_key}.m1")] or [None]
        assert truth is not None, f"experiment {e.id}: no measurement in the station's journal"
        measured = {m.property: m for m in store.measurements(experiment_id=e.id)}
        formed = measured["target_formed"]
        assert formed.quality == "ok" and measured["target_phase_fraction"].quality == "ok"
        if formed.value == 0.0:
            failed += 1
            assert e.state == "failed" and e.failure_kind == "material", (e.state, e.failure_reason)
            assert f"target {e.candidate_key} not formed: XRD identifies" in e.failure_reason
            assert measured["e_form"].quality == "not_target"
            if truth["impure"]:
                (impurity,) = (k for k in truth["fractions"] if k != e.candidate_key)
                wrong += f"XRD identifies {impurity} " not in e.failure_reason
        else:
            completed += 1
            assert formed.value == 1.0 and e.state == "completed", (e.state, e.failure_reason)
            assert measured["e_form"].quality == "ok"
            assert measured["e_form"].value == pytest.approx(values[e.candidate_key])
        wrong += (formed.value == 0.0) != truth["impure"]
    return failed, completed, wrong


def assert_no_instrument_trouble(store, campaign_id: int) -> None:
    for kind in ("instrument.fault", "instrument.down", "experiment.instrument_failure", "measurement.flagged"):
        assert not store.events(campaign_id, kind), f"{kind}: {store.events(campaign_id, kind)[:1]}"


def test_every_impure_sample_fails_as_material(database_url: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Rate 1: each sample of a candidate with a competing phase is impure; none is retried."""
    from sdl.config import load_campaign
    from sdl.lab import open_lab, run_plain

    state = tmp_path / "state"
    monkeypatch.setenv("SDL_STATE_DIR", str(state))
    name = f"impure-{uuid.uuid4().hex[:6]}"
    cfg = load_campaign(write_campaign(tmp_path, name=name, budget=3, impurity_rate=1.0, batch_size=3))
    with open_lab(cfg, database_url) as lab:
        assert run_plain(lab) == "completed"
        counts = lab.counts()
        excluded = set(lab.ledger.excluded_keys())
        failed, completed, wrong = check_against_truth(lab.store, lab.campaign_id, sample_truths(state, name))
        assert failed >= 2 and failed + completed == 3 and counts["failed"] == failed and wrong <= 1
        experiments = lab.store.experiments(lab.campaign_id)
        assert {e.candidate_key for e in experiments if e.state == "failed"} <= excluded
        assert len({e.candidate_key for e in experiments}) == 3
        assert_no_instrument_trouble(lab.store, lab.campaign_id)
        material = lab.store.events(lab.campaign_id, "experiment.material_failure")
        assert len(material) == failed and all("[station0]" in ev.message for ev in material)
    robot = journal(state, name, "robot0")
    assert sum(r["event"] == "started" for r in robot) == 3  # one synthesis per experiment, no retry
    station = journal(state, name, "station0")
    measured = [r["job_id"] for r in station if r["event"] == "started"]
    assert len(measured) == 3 and all(job.endswith(".m1") for job in measured)  # measured once each


def test_campaign_with_a_seeded_impurity_rate_completes_through_the_flow(
        harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName

    from sdl.flows import run_campaign
    from sdl.repository import Store

    state = tmp_path / "state"
    monkeypatch.setenv("SDL_STATE_DIR", str(state))
    name = f"impurity-{uuid.uuid4().hex[:6]}"
    db = f"sqlite:///{tmp_path / 'impurity.db'}"
    summary = run_campaign(write_campaign(tmp_path, name=name, budget=12, impurity_rate=0.5, batch_size=4),
                           db_url=db)
    assert summary["state"] == "completed"
    counts = summary["counts"]
    assert counts["completed"] + counts["failed"] == 12 and counts["abandoned"] == 0
    store = Store.from_url(db)
    try:
        cid = summary["campaign_id"]
        failed, completed, wrong = check_against_truth(store, cid, sample_truths(state, name))
        assert (failed, completed) == (counts["failed"], counts["completed"]) and wrong <= 1
        assert failed >= 1 and completed >= 1  # P(all 12 alike) at rate 0.5 is 2 × 0.5^12
        assert_no_instrument_trouble(store, cid)
        lost = next(e for e in store.experiments(cid) if e.state == "failed")
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 60  # the server records task runs in batches
            while True:
                runs = client.read_task_runs(task_run_filter=TaskRunFilter(
                    name=TaskRunFilterName(any_=[f"experiment-{lost.idempotency_key}"])))
                if (runs and runs[0].state.is_final()) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert len(runs) == 1 and runs[0].run_count == 1 and runs[0].state.is_completed()
            logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[runs[0].id])))
        assert not [g for g in logs if "; retry " in g.message], "a material failure was retried"
    finally:
        store.close()


def test_demo_xrd_campaign_parses_and_its_snapshot_keeps_relative_paths() -> None:
    from sdl.config import load_campaign

    cfg = load_campaign(ROOT / "campaigns" / "demo-xrd.yaml")
    station = next(i for i in cfg.instruments if i.role == "characterization")
    assert station.phase_identification is not None and station.phase_identification.threshold == 0.5
    assert station.simulator.impurity_rate == 0.2 and station.impurity_phases == PHASES.resolve()
    dumped = next(i for i in cfg.snapshot()["instruments"] if i["name"] == station.name)
    expected = "../simulators/worlds/competing_phases_demo.csv.gz"
    assert dumped["phase_identification"]["competing_phases"] == expected
    assert dumped["simulator"]["impurity_phases"] == expected


def test_a_bad_phase_table_stops_the_campaign_before_anything_is_written(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from sdl.config import load_campaign
    from sdl.exceptions import SDLError
    from sdl.lab import open_lab

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    bad = tmp_path / "phases.csv"
    bad.write_text("id,formula\nperov_1,SrTiO3\n")
    path = write_campaign(tmp_path, name="bad-table", budget=2, impurity_rate=0.0)
    path.write_text(path.read_text().replace(str(PHASES), str(bad)))
    db = tmp_path / "never.db"
    with pytest.raises(SDLError) as info, open_lab(load_campaign(path), f"sqlite:///{db}"):
        pass
    message = str(info.value)
    assert message == f"{bad}: phase table needs column 'cif' (has ['id', 'formula'])"
    assert not db.exists()
