"""The lab without Prefect: instrument pool, one campaign end to end, resume decisions.

Real simulator processes (through pyserial), real RunEngines on the real Ophyd devices, real
SQLite and PostgreSQL repositories.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import threading
import time
from pathlib import Path

import pytest

from sdl.config import load_campaign
from sdl.exceptions import SDLError
from sdl.lab import InstrumentPool, job_id_for, open_lab, run_plain

REPO = Path(__file__).resolve().parent.parent
WORLD = REPO / "simulators" / "worlds" / "perovskites_demo.csv.gz"


def write_campaign(tmp_path: Path, *, name: str = "lab-test", budget: int = 5, robots: int = 1,
                   stations: int = 1, faults: str = "", model: str = "random", timeout_s: float = 10.0,
                   max_failures: int | None = None, batch_size: int = 2, design_size: int = 2,
                   mode: str = "batch", robot_sim: str = "", robot_url: str | None = None,
                   outage_window_s: float = 60.0) -> Path:
    """A small crystal campaign on the demo world with fast simulators."""
    sim = "{time_scale: 0.002" + (f", faults: {{{faults}}}" if faults else "") + "}"
    rsim = sim[:-1] + (f", {robot_sim}" if robot_sim else "") + "}"
    lines = [
        f"name: {name}",
        "seed: 3",
        "search_space:",
        f"  candidates: {{file: {WORLD}, id_column: id, structure_column: cif, formula_column: formula}}",
        "objective: {property: e_form, unit: eV, goal: minimize}",
        f"model: {{name: {model}}}",
        f"acquisition: {{function: qucb, batch_size: {batch_size}, mode: {mode}}}",
        f"initial_design: {{strategy: random, size: {design_size}}}",
        f"budget: {{experiments: {budget}" + (f", max_failures: {max_failures}" if max_failures is not None else "")
        + "}",
        "retrain: {every: 2}",
        "instruments:",
    ]
    for i in range(robots):
        where = f"url: '{robot_url}'" if robot_url else f"simulated: true, world: {WORLD}, simulator: {rsim}"
        lines.append(f"  - {{name: robot{i}, role: synthesis, {where}, timeout_s: {timeout_s}, "
                     f"outage_window_s: {outage_window_s}}}")
    lines.extend(f"  - {{name: station{i}, role: characterization, simulated: true, world: {WORLD}, "
                 f"measures: [e_form], timeout_s: {timeout_s}, simulator: {sim}}}" for i in range(stations))
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def world_values() -> dict[str, float]:
    with gzip.open(WORLD, "rt", newline="") as handle:
        return {row["id"]: float(row["e_form"]) for row in csv.DictReader(handle)}


def journal(lab, instrument: str) -> list[dict]:
    path = lab.state_dir / f"{lab.cfg.name}.{instrument}.journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pool_lends_each_instrument_to_one_experiment_at_a_time() -> None:
    pool = InstrumentPool({"r1": ("synthesis", object()), "r2": ("synthesis", object()),
                           "s1": ("characterization", object())})
    busy: dict[str, int] = {}
    worst = {"r1": 0, "r2": 0}
    lock = threading.Lock()

    def work() -> None:
        with pool.lease("synthesis") as (name, _):
            with lock:
                busy[name] = busy.get(name, 0) + 1
                worst[name] = max(worst[name], busy[name])
            time.sleep(0.01)
            with lock:
                busy[name] -= 1

    threads = [threading.Thread(target=work) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst == {"r1": 1, "r2": 1}
    assert pool.free("synthesis") == 2 and pool.free("characterization") == 1
    with pool.lease("synthesis", "r2") as (name, _):
        assert name == "r2" and pool.free("synthesis") == 1
    with pytest.raises(Exception, match="role 'nothing'"), pool.lease("nothing"):
        pass


def test_job_ids_are_wire_safe_and_deterministic() -> None:
    assert job_id_for("my campaign:12", "c1-5") == "c1-5.my_campaign:12"
    assert job_id_for("x" * 300)[-3:] == "xxx" and len(job_id_for("x" * 300)) == 128


def test_plain_campaign_runs_to_its_budget(tmp_path: Path, database_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, budget=5))
    truth = world_values()
    with open_lab(cfg, database_url, state_dir=tmp_path / "state") as lab:
        outcomes = []
        run_plain(lab, on_outcome=outcomes.append)
        store, cid = lab.store, lab.campaign_id
        experiments = store.experiments(cid)
        assert [e.state for e in experiments] == ["completed"] * 5
        assert len(outcomes) == 5 and len({e.candidate_key for e in experiments}) == 5
        for e in experiments:
            ok = [m for m in store.measurements(experiment_id=e.id) if m.quality == "ok"]
            assert len(ok) == 1 and ok[0].property == "e_form"
            assert ok[0].value == pytest.approx(truth[e.candidate_key])  # the world's real value
            assert e.instruments == ["robot0"] and e.idempotency_key == f"{cfg.name}:{e.id}"
        started = [r["job_id"] for r in journal(lab, "robot0") if r["event"] == "started"]
        assert len(started) == len(set(started)) == 5
        assert store.get_campaign(cid).state == "completed"
        kinds = {ev.kind for ev in store.events(cid)}
        assert {"experiment.proposed", "experiment.running", "experiment.completed"} <= kinds
        best = lab.best()
        assert best.value == min(truth[e.candidate_key] for e in experiments)
        report = lab.round_report()
        assert report.best_value == best.value and report.plots["best_so_far"].is_file()


@pytest.mark.parametrize(("model", "held_out"), [
    ("gp", "leave-one-out"),
    ("gnn-ensemble", "leave-one-out"),  # pretrained CHGNet features, GP head
    ("gnn-ensemble, options: {head: mlp, members: 10}", "out-of-bag"),  # recalibrated MLP heads
])
def test_each_model_version_is_stored_with_held_out_uncertainty_metrics(tmp_path: Path, sqlite_url: str, model: str,
                                                                        held_out: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, name="metrics", budget=10, model=model))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state") as lab:
        run_plain(lab)
        versions = lab.store.model_versions(lab.campaign_id)
        experiments = lab.store.experiments(lab.campaign_id)
    assert versions and all(v.model == cfg.model.name for v in versions)
    by_id = {v.id: v for v in versions}
    modelled = [e for e in experiments if not (e.model_version or "").startswith("design")]
    assert modelled, "proposals after the initial design come from the model"
    for e in modelled:  # provenance points at the stored model version that made the proposal
        assert by_id[e.model_version_id].info["version"] == e.model_version
    scored = [v for v in versions if "miscalibration_area" in v.metrics]
    assert scored, "once 4+ measurements exist, every model version carries held-out metrics"
    for v in scored:
        m = v.metrics
        assert m["held_out"] == held_out and m["n"] <= m["n_train"] == v.n_train
        assert 0.0 <= m["coverage_68"] <= m["coverage_95"] <= 1.0
        assert m["mae"] >= 0 and -1.0 <= m["spearman_abs_error_std"] <= 1.0 and "prospective" in m


def test_two_robots_work_at_the_same_time(tmp_path: Path, sqlite_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, name="two-robots", budget=6, robots=2, stations=2))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state", time_scale=0.01) as lab:
        run_plain(lab)
        spans = []
        for robot in ("robot0", "robot1"):
            records = journal(lab, robot)
            started = {r["job_id"]: r["started_at"] for r in records if r["event"] == "started"}
            ended = {r["job_id"]: r["t"] for r in records if r["event"] == "finished"}
            spans += [(robot, started[j], ended[j]) for j in started]
        assert {s[0] for s in spans} == {"robot0", "robot1"}
        overlapping = any(a[0] != b[0] and a[1] < b[2] and b[1] < a[2] for a in spans for b in spans)
        assert overlapping, spans
        assert lab.counts()["completed"] == 6


def test_recover_reconciles_each_state_with_the_robot(tmp_path: Path, sqlite_url: str) -> None:
    """Experiments left by a 'crashed' process: proposed, running-unknown, running-done, running-aborted."""
    cfg = load_campaign(write_campaign(tmp_path, name="recover", budget=6))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state") as lab:
        store = lab.store
        robot = lab.pool.devices["robot0"]
        t_proposed, t_unknown, t_done, t_aborted = lab.propose(2) + lab.propose(2)
        for t in (t_unknown, t_done, t_aborted):
            store.start_experiment(t.experiment_id, instruments=["robot0"])
        body = {k: v for k, v in t_done.recipe.items() if k != "job_id"}
        robot.transport.command("SYNTH START", t_done.job_id, body)
        body = {k: v for k, v in t_aborted.recipe.items() if k != "job_id"}
        robot.transport.command("SYNTH START", t_aborted.job_id, body)
        robot.transport.command("SYNTH ABORT", t_aborted.job_id)
        deadline = time.time() + 10
        while robot.transport.command("JOB?", t_done.job_id).data["state"] != "done":
            assert time.time() < deadline
            time.sleep(0.02)

    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state") as lab:
        run_plain(lab)  # resumes first
        store = lab.store
        assert store.get_experiment(t_aborted.experiment_id).state == "abandoned"
        states = [e.state for e in store.experiments(lab.campaign_id)]
        assert len(states) == 6 and states.count("abandoned") == 1 and states.count("completed") == 5
        started = [r["job_id"] for r in journal(lab, "robot0") if r["event"] == "started"]
        assert len(started) == len(set(started)) == 6  # nothing synthesized twice
        decisions = {e.experiment_id: e.payload["decision"]
                     for e in store.events(lab.campaign_id, "experiment.reconciled")}
        assert decisions == {t_unknown.experiment_id: "start", t_done.experiment_id: "characterize",
                             t_aborted.experiment_id: "end"}
        resumed = [e.experiment_id for e in store.events(lab.campaign_id, "experiment.resumed")]
        assert resumed == [t_proposed.experiment_id]


def test_batches_are_proposed_as_written_and_the_design_runs_exactly_its_size(tmp_path: Path,
                                                                            sqlite_url: str) -> None:
    """batch_size 3, design size 4, budget 10: design batches 3 + 1, then model batches 3 + 3."""
    cfg = load_campaign(write_campaign(tmp_path, name="batches", budget=10, model="gp", batch_size=3,
                                       design_size=4, robots=2, stations=2))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state") as lab:
        assert run_plain(lab) == "completed"
        experiments = lab.store.experiments(lab.campaign_id)
    assert [e.state for e in experiments] == ["completed"] * 10
    design = [e for e in experiments if (e.model_version or "").startswith("design")]
    assert len(design) == 4 and design == experiments[:4]
    batches: dict[str, list] = {}
    for e in experiments:
        batches.setdefault(e.batch_id, []).append(e)
    assert [len(b) for b in batches.values()] == [3, 1, 3, 3]
    groups = list(batches.values())
    for earlier, later in itertools.pairwise(groups):  # a batch is proposed once the previous one ended
        assert max(e.finished_at for e in earlier) <= min(e.proposed_at for e in later)
        assert len({e.model_version for e in later}) == 1


def test_asynchronous_mode_proposes_one_experiment_per_free_robot(tmp_path: Path, sqlite_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, name="async", budget=6, batch_size=4, mode="asynchronous"))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state") as lab:
        assert lab.wanted() == 1  # one robot
        run_plain(lab)
        experiments = lab.store.experiments(lab.campaign_id)
    assert [e.state for e in experiments] == ["completed"] * 6
    assert len({e.batch_id for e in experiments}) == 6


def test_failed_and_abandoned_candidates_are_excluded_not_pending(tmp_path: Path, sqlite_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, name="exclusion", budget=8, model="gp", design_size=2))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state") as lab:
        calls: list[tuple[list[str], list[str]]] = []
        propose = lab.engine.propose

        def spy(q, pending=(), exclude=()):
            calls.append((list(pending), list(exclude)))
            return propose(q, pending=pending, exclude=exclude)

        lab.engine.propose = spy  # type: ignore[method-assign]
        first = lab.propose(2)
        lab.store.start_experiment(first[0].experiment_id, instruments=["robot0"])
        lab.ledger.started(first[0].experiment_id)
        lab._fail(first[0], "test: the precursor decomposed")
        second = lab.propose(1)
    assert calls[1] == ([first[1].candidate_key], [first[0].candidate_key])
    assert second[0].candidate_key not in {t.candidate_key for t in first}


def test_a_robot_dead_at_start_fails_the_campaign_before_any_experiment(tmp_path: Path, sqlite_url: str) -> None:
    from sdl.lab import InstrumentOutage

    cfg = load_campaign(write_campaign(tmp_path, name="dead", robot_url="socket://127.0.0.1:1", timeout_s=0.3,
                                       outage_window_s=1.0))
    started = time.monotonic()
    refused = r"instrument robot0 at socket://127.0.0.1:1 did not answer for 1 s"
    with pytest.raises(InstrumentOutage, match=refused), open_lab(cfg, sqlite_url, state_dir=tmp_path / "state"):
        pass
    assert time.monotonic() - started < 30
    from sdl.repository import Store

    with Store.from_url(sqlite_url) as store:
        campaign = store.get_campaign("dead")
        assert campaign.state == "failed" and store.experiments(campaign.id) == []
        assert [e.kind for e in store.events(campaign.id, "instrument.gone")] == ["instrument.gone"]


def test_a_robot_that_stops_answering_and_comes_back_within_its_window_loses_nothing(tmp_path: Path,
                                                                                    sqlite_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, name="blip", budget=6, timeout_s=0.3, outage_window_s=30.0,
                                       robot_sim="outage_after_s: 2.0, outage_s: 3.0"))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state", time_scale=0.05) as lab:
        assert run_plain(lab) == "completed"
        store, cid = lab.store, lab.campaign_id
        states = [e.state for e in store.experiments(cid)]
        kinds = [e.kind for e in store.events(cid) if e.kind.startswith("instrument.")]
    assert states == ["completed"] * 6
    assert "instrument.gone" not in kinds
    # Under load the transport's own retries may bridge part of the outage; either way it was seen.
    assert "instrument.down" in kinds or "instrument.fault" in kinds
    if "instrument.down" in kinds:
        assert "instrument.up" in kinds


def test_a_robot_gone_for_good_fails_the_campaign_without_spending_its_failure_budget(tmp_path: Path,
                                                                                      database_url: str) -> None:
    # The outage clock starts with the simulator process: 6 s leaves a loaded machine time to open the lab.
    cfg = load_campaign(write_campaign(tmp_path, name="gone", budget=20, timeout_s=0.3, outage_window_s=2.0,
                                       max_failures=1, robot_sim="outage_after_s: 6.0"))
    with open_lab(cfg, database_url, state_dir=tmp_path / "state", time_scale=0.05) as lab:
        started = time.monotonic()
        assert run_plain(lab) == "failed"
        elapsed = time.monotonic() - started
        store, cid = lab.store, lab.campaign_id
        experiments = store.experiments(cid)
        campaign = store.get_campaign(cid)
    assert elapsed < 60
    assert campaign.state == "failed"
    assert "robot0" in lab.stop_reason and "socket://127.0.0.1:" in lab.stop_reason
    states = [e.state for e in experiments]
    assert "abandoned" not in states and "failed" not in states and len(states) < 20
    assert any(s in ("running", "proposed") for s in states)  # held for the next run, not thrown away


def test_interrupt_drain_finishes_started_jobs_and_keeps_the_rest_proposed(tmp_path: Path, sqlite_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, name="drain", budget=8, batch_size=4))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state", time_scale=0.05) as lab:
        def interrupt_once_running() -> None:
            while lab.counts()["running"] == 0:
                time.sleep(0.01)
            lab.interrupt("drain", "SIGINT")

        threading.Thread(target=interrupt_once_running, daemon=True).start()
        assert run_plain(lab) == "stopped"
        states = [e.state for e in lab.store.experiments(lab.campaign_id)]
    assert "abandoned" not in states and "completed" in states and "proposed" in states
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state") as lab:  # rerun resumes to the budget
        assert run_plain(lab) == "completed"
        states = [e.state for e in lab.store.experiments(lab.campaign_id)]
    assert states == ["completed"] * 8


def test_interrupt_abort_aborts_jobs_on_the_instrument_and_records_them(tmp_path: Path, sqlite_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, name="abort", budget=4, batch_size=2))
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state", time_scale=0.5) as lab:
        def abort_once_running() -> None:
            while lab.counts()["running"] == 0:
                time.sleep(0.01)
            time.sleep(0.2)
            lab.interrupt("abort", "SIGTERM")

        threading.Thread(target=abort_once_running, daemon=True).start()
        assert run_plain(lab) == "stopped"
        experiments = lab.store.experiments(lab.campaign_id)
        aborted = [r["job_id"] for r in journal(lab, "robot0") if r["event"] == "aborted"]
    states = [e.state for e in experiments]
    assert states.count("abandoned") == 1 and states.count("proposed") == 1, states
    assert len(aborted) == 1


def test_a_second_runner_is_refused_and_a_changed_yaml_needs_amend(tmp_path: Path, database_url: str) -> None:
    from sdl.repository import CampaignConfigChanged, CampaignLocked

    path = write_campaign(tmp_path, name="lease", budget=2)
    cfg = load_campaign(path)
    with open_lab(cfg, database_url, state_dir=tmp_path / "state") as lab:
        with pytest.raises(CampaignLocked, match=r"campaign 'lease' .*pid \d+"), \
                open_lab(cfg, database_url, state_dir=tmp_path / "state2"):
            pass
        run_plain(lab)
    path.write_text(path.read_text().replace("experiments: 2", "experiments: 3"))
    changed = load_campaign(path)
    with pytest.raises(CampaignConfigChanged, match=r"budget.experiments 2 → 3"), \
            open_lab(changed, database_url, state_dir=tmp_path / "state"):
        pass
    with open_lab(changed, database_url, state_dir=tmp_path / "state", amend=True) as lab:
        assert run_plain(lab) == "completed"
        assert lab.counts()["completed"] == 3
        assert [e.kind for e in lab.store.events(lab.campaign_id, "campaign.amended")] == ["campaign.amended"]


def test_every_experiment_links_a_material_and_its_sample(tmp_path: Path, database_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, name="materials", budget=3))
    with open_lab(cfg, database_url, state_dir=tmp_path / "state") as lab:
        run_plain(lab)
        store = lab.store
        for e in store.experiments(lab.campaign_id):
            assert e.material_id is not None
            material = store.get_material(e.material_id)
            assert material.source_id == e.candidate_key and material.formula
            samples = store.samples(e.id)
            assert len(samples) == 1 and samples[0].instrument == "robot0"
            ok = [m for m in store.measurements(experiment_id=e.id) if m.quality == "ok"]
            assert ok and all(m.sample_id == samples[0].id for m in ok)
            history = store.material_measurements(e.material_id, "e_form")
            assert [h.campaign for h in history] == ["materials"]
            assert material.cif == lab.engine.pool.structure_texts([lab.engine.pool.index_of(e.candidate_key)])[0]
        first = {e.candidate_key: e.material_id for e in store.experiments(lab.campaign_id)}
        n_materials = len(store.materials())
    # Another campaign on the same candidates (the same seed picks them again) links the same rows.
    again = load_campaign(write_campaign(tmp_path, name="materials-again", budget=3))
    with open_lab(again, database_url, state_dir=tmp_path / "state") as lab:
        run_plain(lab)
        assert {e.candidate_key: e.material_id for e in lab.store.experiments(lab.campaign_id)} == first
        assert len(lab.store.materials()) == n_materials
        assert not lab.engine.pool._parsed  # no CIF parsed, no matcher: each found by its text


def test_a_driver_named_in_yaml_is_used_without_touching_the_lab(tmp_path: Path, sqlite_url: str) -> None:
    import driver_plugins

    path = write_campaign(tmp_path, name="driver", budget=3)
    text = path.read_text().replace("role: synthesis,", "role: synthesis, driver: 'driver_plugins:CountingRobot',")
    path.write_text(text)
    with open_lab(load_campaign(path), sqlite_url, state_dir=tmp_path / "state") as lab:
        assert type(lab.pool.devices["robot0"]).__name__ == "CountingRobot"
        run_plain(lab)
    assert driver_plugins.CALLS["set"] == 3 and driver_plugins.CALLS["ping"] >= 1
    path.write_text(text.replace("driver_plugins:CountingRobot", "driver_plugins:NoSuchRobot")
                    .replace("name: driver", "name: bad-driver"))
    with pytest.raises(SDLError, match="instrument driver 'driver_plugins:NoSuchRobot' cannot be imported"), \
            open_lab(load_campaign(path), sqlite_url, state_dir=tmp_path / "state"):
        pass
