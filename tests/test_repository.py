"""The knowledge repository on SQLite and PostgreSQL: round trip, state machine, idempotency, queries."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import sys

import pytest
import sqlalchemy as sa

from sdl.exceptions import IllegalTransition, RepositoryError
from sdl.repository import TRANSITIONS, Store

SNAPSHOT = {
    "name": "perov",
    "objective": {"property": "e_form", "unit": "eV/atom", "goal": "minimize", "target_range": None},
    "budget": {"experiments": 10},
}




def _campaign(store: Store, name: str = "perov", snapshot: dict | None = None, **kw):
    return store.get_or_create_campaign(
        name,
        snapshot=snapshot or {**SNAPSHOT, "name": name},
        config_hash=kw.pop("config_hash", "h1"),
        seed=kw.pop("seed", 7),
        budget=kw.pop("budget", 10),
        description=kw.pop("description", "a test campaign"),
        code_version=kw.pop("code_version", "0.1.0"),
    )


def _experiment(store: Store, cid: int, key: str, **prov) -> int:
    return store.propose_experiment(
        cid,
        idempotency_key=f"{cid}:{key}",
        candidate_key=key,
        params={"x": 0.1, "cat": "a"},
        provenance={"model_version": "gp-1", "acquisition_value": 0.5, "predicted_mean": -1.25,
                    "predicted_std": 0.125, "batch_id": "b1", **prov},
    )


def _measured(store: Store, cid: int, key: str, value: float, *, quality: str = "ok") -> int:
    eid = _experiment(store, cid, key)
    store.start_experiment(eid, instruments=["robot1", "xrd1"])
    store.add_measurement(eid, property="e_form", value=value, unit="eV/atom", quality=quality, instrument="xrd1")
    store.complete_experiment(eid)
    return eid


def test_round_trip_everything_reads_back_identically(store: Store) -> None:
    c = _campaign(store)
    assert c.created_at.tzinfo is not None and c.created_at.utcoffset() == dt.timedelta(0)
    assert store.get_campaign("perov") == c == store.get_campaign(c.id)

    structure = {"@module": "pymatgen.core.structure", "lattice": {"a": 3.905}, "sites": [{"xyz": [0.1, 0.2, 0.3]}]}
    mid = store.upsert_material("struct:SrTiO3:sg221:abc", formula="SrTiO3", structure=structure, source_id="mp-5229")
    assert store.upsert_material("struct:SrTiO3:sg221:abc") == mid
    mat = store.get_material(mid)
    assert mat is not None and mat.structure == structure and mat.formula == "SrTiO3" and mat.source_id == "mp-5229"
    cif_id = store.upsert_material("struct:X", structure="data_X\n_cell_length_a 4.0\n")
    assert store.get_material("struct:X").cif.startswith("data_X")  # type: ignore[union-attr]
    assert cif_id != mid

    mv = store.add_model_version(c.id, model="gnn-ensemble", n_train=12,
                                 metrics={"mae": 0.0123456789012345, "spearman": -0.25, "nan": math.nan},
                                 info={"checkpoint": "/tmp/ck.pt", "members": 5})
    params = {"x": 0.1 + 0.2, "n": 3, "cat": "b", "nested": {"y": [1.5, 2.5]}}
    eid = store.propose_experiment(
        c.id, idempotency_key="perov:0:SrTiO3", candidate_key="SrTiO3", params=params, material_id=mid,
        provenance={"model_version_id": mv, "model_version": "gnn-ensemble-1", "acquisition_value": 1 / 3,
                    "predicted_mean": -1.0000000000000002, "predicted_std": 1e-300, "batch_id": "round-1",
                    "acquisition": "qlogei"},
    )
    store.start_experiment(eid, instruments=["robot1", "xrd1"])
    sid = store.add_sample(eid, instrument="robot1", sample_uid="S-0001")
    assert store.add_sample(eid, instrument="robot1", sample_uid="S-0001") == sid
    store.set_sample_state(sid, "measured")
    t_run = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    store.record_run_start("run-1", experiment_id=eid, plan_name="characterize", start_time=t_run)
    doc = {"uid": "ev-1", "time": 1767322800.123456, "data": {"e": -1.2345678901234567, "q": "ok"}, "seq_num": 1}
    store.record_document("run-1", "event", doc, measurements=[(eid, {
        "property": "e_form", "value": -1.2345678901234567, "unit": "eV/atom", "uncertainty": 0.01,
        "instrument": "xrd1", "quality": "ok", "run_uid": "run-1", "event_uid": "ev-1", "sample_id": sid,
        "timestamp": t_run})])
    assert store.record_document("run-1", "event", doc) == store.documents("run-1")[0].id  # idempotent on uid
    store.record_document("run-1", "stop", {"uid": "stop-1", "exit_status": "success"})
    store.record_run_stop("run-1", exit_status="success", stop_time=t_run + dt.timedelta(seconds=3))
    m2 = store.add_measurement(eid, property="band_gap", value=3.25, unit="eV", instrument="uv1")
    store.complete_experiment(eid)
    ev = store.log_event("note", "hello", campaign_id=c.id, experiment_id=eid, level="warning",
                         payload={"a": [1, 2.5, "x"], "b": None})

    # --- read everything back through a brand-new Store (new engine, new connections)
    url = store.engine.url.render_as_string(hide_password=False)
    other = Store.from_url(url)
    try:
        e = other.get_experiment(eid)
        assert e is not None
        assert dataclasses.asdict(e) | {} == dataclasses.asdict(store.get_experiment(eid))  # type: ignore[arg-type]
        assert e.params == params and e.params["x"] == 0.1 + 0.2
        assert e.state == "completed" and e.instruments == ["robot1", "xrd1"] and e.material_id == mid
        assert (e.model_version_id, e.model_version, e.acquisition_value, e.predicted_mean, e.predicted_std,
                e.batch_id) == (mv, "gnn-ensemble-1", 1 / 3, -1.0000000000000002, 1e-300, "round-1")
        assert e.provenance_extra == {"acquisition": "qlogei"}
        for t in (e.proposed_at, e.started_at, e.finished_at):
            assert t is not None and t.utcoffset() == dt.timedelta(0)
        assert e.proposed_at <= e.started_at <= e.finished_at  # type: ignore[operator]

        (sample,) = other.samples(eid)
        assert (sample.id, sample.instrument, sample.sample_uid, sample.state) == (sid, "robot1", "S-0001", "measured")

        meas = other.measurements(experiment_id=eid)
        assert [m.property for m in meas] == ["e_form", "band_gap"] and meas[1].id == m2
        m = meas[0]
        assert m.value == -1.2345678901234567 and m.uncertainty == 0.01 and m.sample_id == sid
        assert m.timestamp == t_run and m.timestamp.tzinfo is not None and m.timestamp.utcoffset() == dt.timedelta(0)
        assert (m.unit, m.instrument, m.quality, m.run_uid, m.event_uid, m.campaign_id, m.candidate_key) == (
            "eV/atom", "xrd1", "ok", "run-1", "ev-1", c.id, "SrTiO3")

        (run,) = other.runs(eid)
        assert run.start_time == t_run and run.stop_time == t_run + dt.timedelta(seconds=3)
        assert (run.plan_name, run.exit_status, run.reason) == ("characterize", "success", None)
        docs = other.documents("run-1")
        assert [(d.name, d.sequence) for d in docs] == [("event", 1), ("stop", 2)]
        assert docs[0].document == doc

        (mvr,) = other.model_versions(c.id)
        assert mvr.id == mv and mvr.version == 1 and mvr.n_train == 12
        assert mvr.metrics == {"mae": 0.0123456789012345, "spearman": -0.25, "nan": None}  # NaN → null on both
        assert mvr.info == {"checkpoint": "/tmp/ck.pt", "members": 5}

        evs = other.events(c.id)
        assert [x.kind for x in evs] == [
            "campaign.created", "model.trained", "experiment.proposed", "experiment.running",
            "run.start", "run.stop", "experiment.completed", "note"]
        note = evs[-1]
        assert (note.id, note.message, note.level, note.payload, note.experiment_id) == (
            ev, "hello", "warning", {"a": [1, 2.5, "x"], "b": None}, eid)
        assert other.events(kind="experiment.*", campaign_id=c.id)[0].kind == "experiment.proposed"
        assert other.get_campaign("perov") == store.get_campaign("perov")
    finally:
        other.close()


def test_state_machine_rejects_illegal_transitions(store: Store) -> None:
    c = _campaign(store)
    eid = _experiment(store, c.id, "a")
    with pytest.raises(IllegalTransition, match="proposed → completed"):
        store.complete_experiment(eid)
    with pytest.raises(IllegalTransition):
        store.fail_experiment(eid, reason="x", kind="instrument")
    store.start_experiment(eid, instruments=["r"])
    with pytest.raises(IllegalTransition, match="running → running"):
        store.start_experiment(eid, instruments=["r"])
    store.fail_experiment(eid, reason="sample burnt", kind="material")
    for call in (lambda: store.complete_experiment(eid), lambda: store.abandon_experiment(eid, reason="x"),
                 lambda: store.start_experiment(eid, instruments=[])):
        with pytest.raises(IllegalTransition, match="failed →"):
            call()
    e = store.get_experiment(eid)
    assert e is not None and (e.state, e.failure_kind, e.failure_reason) == ("failed", "material", "sample burnt")
    # proposed → abandoned is allowed; the table is the one source of the rules
    e2 = _experiment(store, c.id, "b")
    store.abandon_experiment(e2, reason="crash before start")
    assert store.get_experiment(e2).state == "abandoned"  # type: ignore[union-attr]
    assert TRANSITIONS["proposed"] == {"running", "abandoned"}
    with pytest.raises(RepositoryError, match="failure kind"):
        store.fail_experiment(_experiment(store, c.id, "c"), reason="?", kind="cosmic")
    with pytest.raises(RepositoryError, match="no experiment"):
        store.start_experiment(10_000, instruments=[])
    # only legal changes left an event: 3 proposals, 1 running, 1 failed, 1 abandoned
    kinds = [x.kind for x in store.events(c.id, kind="experiment.*")]
    assert sorted(kinds) == sorted(["experiment.proposed"] * 3 + ["experiment.running", "experiment.failed",
                                                                   "experiment.abandoned"])


def test_idempotent_proposal_returns_existing_row(store: Store) -> None:
    c = _campaign(store)
    first = _experiment(store, c.id, "k1")
    again = _experiment(store, c.id, "k1")
    assert first == again
    assert len(store.experiments(c.id)) == 1
    assert len(store.events(c.id, kind="experiment.proposed")) == 1
    with pytest.raises(RepositoryError, match="already names experiment"):
        store.propose_experiment(c.id, idempotency_key=f"{c.id}:k1", candidate_key="other", params={}, provenance={})


def test_campaign_rerun_with_other_budget_is_logged(store: Store) -> None:
    c1 = _campaign(store)
    assert _campaign(store).id == c1.id
    assert store.events(c1.id, kind="campaign.config_changed") == []
    c2 = _campaign(store, budget=20, code_version="0.2.0")  # same config hash: taken, logged
    assert c2.id == c1.id and c2.config_hash == "h1" and c2.budget == 20
    (changed,) = store.events(c1.id, kind="campaign.config_changed")
    assert changed.payload == {"budget": {"old": 10, "new": 20}, "code_version": {"old": "0.1.0", "new": "0.2.0"}}
    store.set_campaign_state(c1.id, "completed", reason="budget spent")
    assert store.get_campaign(c1.id).state == "completed"  # type: ignore[union-attr]
    with pytest.raises(RepositoryError, match="campaign state"):
        store.set_campaign_state(c1.id, "paused")


def test_pending_best_observations_and_cross_campaign(store: Store) -> None:
    a = _campaign(store, "A")
    b = _campaign(store, "B", snapshot={"objective": {"property": "e_form", "goal": "target",
                                                      "target_range": [-1.0, -0.5]}})
    for key, value in [("a1", -0.2), ("a2", -1.7), ("a3", -0.9)]:
        _measured(store, a.id, key, value)
    drift = _measured(store, a.id, "a4", -5.0, quality="drift")  # never the best: not ok
    running = _experiment(store, a.id, "a5")
    store.start_experiment(running, instruments=["r"])
    store.add_measurement(running, property="e_form", value=-9.0)  # running: not learned from yet
    proposed = _experiment(store, a.id, "a6")
    failed = _experiment(store, a.id, "a7")
    store.start_experiment(failed, instruments=["r"])
    store.fail_experiment(failed, reason="timeout", kind="instrument")
    _measured(store, b.id, "b1", -2.0)
    _measured(store, b.id, "b2", -0.7)

    assert [e.id for e in store.pending_experiments(a.id)] == [running, proposed]
    assert [e.state for e in store.pending_experiments(a.id)] == ["running", "proposed"]
    assert store.pending_experiments(b.id) == []
    assert {e.candidate_key for e in store.experiments(a.id, states=["failed"])} == {"a7"}

    obs = store.observations(a.id, "e_form")
    assert [(o.candidate_key, o.value) for o in obs] == [("a1", -0.2), ("a2", -1.7), ("a3", -0.9)]
    assert obs[0].params == {"x": 0.1, "cat": "a"}
    assert store.best_so_far(a.id, "e_form", "minimize").candidate_key == "a2"  # type: ignore[union-attr]
    assert store.best_so_far(a.id, "e_form", "maximize").value == -0.2  # type: ignore[union-attr]
    best_t = store.best_so_far(a.id, "e_form", "target", target_range=(-1.0, -0.5))
    assert best_t is not None and best_t.candidate_key == "a3" and best_t.utility == 0.0
    assert store.best_so_far(a.id, "band_gap", "maximize") is None
    with pytest.raises(RepositoryError, match="target_range"):
        store.best_so_far(a.id, "e_form", "target")

    ok = store.measurements_of("e_form")
    assert sorted((m.campaign_id, m.candidate_key, m.value) for m in ok) == sorted(
        [(a.id, "a1", -0.2), (a.id, "a2", -1.7), (a.id, "a3", -0.9), (a.id, "a5", -9.0),
         (b.id, "b1", -2.0), (b.id, "b2", -0.7)])
    assert [m.experiment_id for m in store.measurements_of("e_form", quality="drift")] == [drift]
    assert len(store.measurements_of("e_form", quality=None)) == 7

    summaries = {s["name"]: s for s in store.campaign_summaries()}
    assert summaries["A"]["counts"] == {"proposed": 1, "running": 1, "completed": 4, "failed": 1, "abandoned": 0}
    assert summaries["A"]["best_value"] == -1.7 and summaries["A"]["n_measurements"] == 5
    assert summaries["B"]["best_value"] == -0.7  # target range [-1, -0.5]
    assert summaries["B"]["counts"]["proposed"] == 0 and summaries["B"]["budget"] == 10

    rows = store.export_rows("A")
    assert [r["candidate_key"] for r in rows] == ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]
    assert rows[1]["e_form"] == -1.7 and rows[3]["e_form"] is None and rows[4]["e_form"] == -9.0  # drift not ok
    assert rows[0]["param.x"] == 0.1 and rows[0]["state"] == "completed" and rows[6]["failure_kind"] == "instrument"
    assert rows[0]["predicted_std"] == 0.125 and rows[0]["started_at"].tzinfo is not None
    with pytest.raises(RepositoryError, match="no campaign named 'Z'"):
        store.export_rows("Z")


def test_bad_measurements_never_stored(store: Store) -> None:
    c = _campaign(store)
    eid = _experiment(store, c.id, "k")
    for bad in (math.nan, math.inf, "1.5", None, True, [1.0]):
        with pytest.raises(RepositoryError):
            store.add_measurement(eid, property="e_form", value=bad)  # type: ignore[arg-type]
    assert store.measurements(experiment_id=eid) == []
    with pytest.raises(RepositoryError, match=r"naive|failed"):
        store.add_measurement(eid, property="e_form", value=1.0, timestamp=dt.datetime(2026, 1, 1))


def test_events_are_append_only(store: Store) -> None:
    store.log_event("k", "m")
    for statement in ("UPDATE events SET message = 'x'", "DELETE FROM events"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"), store.engine.begin() as conn:
            conn.execute(sa.text(statement))
    assert [e.message for e in store.events()] == ["m"]
    assert not any(name.startswith(("update", "delete")) and "event" in name for name in dir(store))


def test_sqlite_connection_pragmas(sqlite_url: str) -> None:
    store = Store.from_url(sqlite_url, create=True)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    with pytest.raises(RepositoryError, match=r"FOREIGN KEY|foreign key|IntegrityError"):
        store.add_measurement(12345, property="p", value=1.0)
    store.close()


def test_repository_does_not_import_torch_or_prefect() -> None:
    import subprocess

    code = ("import sys, sdl.repository, sdl.lab.documents, sdl.materials, sdl.cli.db_commands; "
            "print(sorted(m for m in ('torch', 'prefect', 'pymatgen') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_canonical_material_keys_on_real_perovskites() -> None:
    import csv
    import gzip
    import random

    from pymatgen.core import Structure

    from sdl.materials import canonical_key

    world = __import__("pathlib").Path(__file__).resolve().parents[1] / "simulators/worlds/perovskites_demo.csv.gz"
    with gzip.open(world, "rt") as fh:
        rows = [r for _, r in zip(range(6), csv.DictReader(fh), strict=False)]
    keys = []
    for row in rows:
        s = Structure.from_str(row["cif"], fmt="cif")
        key = canonical_key(structure=s)
        keys.append(key)
        assert key.startswith(f"struct:{s.composition.reduced_formula}:sg")
        assert canonical_key(structure=row["cif"]) == key == canonical_key(structure=s.as_dict())
        # another cell, another origin, another atom order: the same material
        other = s.copy()
        other.make_supercell([[1, 1, 0], [-1, 1, 0], [0, 0, 1]])
        other.translate_sites(list(range(len(other))), [0.137, 0.29, 0.41])
        sites = list(other)
        random.Random(0).shuffle(sites)
        assert canonical_key(structure=Structure.from_sites(sites)) == key
        strained = s.copy()
        strained.scale_lattice(s.volume * 1.03)
        assert canonical_key(structure=strained) != key
    assert len(set(keys)) == len({r["id"] for r in rows})  # distinct compounds, distinct keys
    assert canonical_key(params={"t": 1.0, "a": 0.1 + 0.2}) == canonical_key(params={"a": 0.3, "t": 1}) == (
        'params:{"a":0.3,"t":1}')
    assert canonical_key(formula="O3SrTi") == canonical_key(formula="SrTiO3") == "formula:SrTiO3"
    with pytest.raises(ValueError, match=r"params\.x"):
        canonical_key(params={"x": math.nan})
    with pytest.raises(ValueError, match="needs a structure"):
        canonical_key()


DEMO = {
    "name": "demo",
    "acquisition": {"name": "qlogei", "batch_size": 4},
    "budget": {"experiments": 32},
    "instruments": [{"name": "robot"}, {"name": "xrd"}],
}


def test_config_differences_paths() -> None:
    from sdl.repository import ABSENT, config_differences

    new = {
        "name": "demo",
        "acquisition": {"name": "qlogei", "batch_size": 8, "beta": 0.5},
        "budget": {"experiments": 40},
        "instruments": [{"name": "robot"}, {"name": "xrd2"}, {"name": "uv"}],
        "seed": 1,
    }
    assert config_differences(DEMO, new) == [
        ("acquisition.batch_size", 4, 8),
        ("acquisition.beta", ABSENT, 0.5),
        ("budget.experiments", 32, 40),
        ("instruments[1].name", "xrd", "xrd2"),
        ("instruments[2]", ABSENT, {"name": "uv"}),
        ("seed", ABSENT, 1),
    ]
    assert config_differences(new, DEMO)[-1] == ("seed", 1, ABSENT) and str(ABSENT) == "<absent>"
    assert config_differences(DEMO, DEMO) == []
    assert config_differences({"a": 1}, {"a": 1.0}) == [] and config_differences({"a": 1}, {"a": True}) != []


def test_changed_config_raises_one_line_unless_amended(store: Store) -> None:
    from sdl.repository import CampaignConfigChanged

    c = _campaign(store, "demo", snapshot=DEMO, config_hash="h1")
    changed = {**DEMO, "acquisition": {"name": "qlogei", "batch_size": 8}, "budget": {"experiments": 40}}
    with pytest.raises(CampaignConfigChanged) as info:
        _campaign(store, "demo", snapshot=changed, config_hash="h2")
    assert str(info.value) == (
        "campaign 'demo' already exists with a different configuration: acquisition.batch_size 4 → 8, "
        "budget.experiments 32 → 40; rerun with --amend to change it, or give the campaign a new name"
    )
    assert info.value.differences == [("acquisition.batch_size", 4, 8), ("budget.experiments", 32, 40)]
    assert isinstance(info.value, RepositoryError)
    unchanged = store.get_campaign("demo")
    assert unchanged is not None and unchanged.config_hash == "h1" and unchanged.config_snapshot == DEMO
    assert store.events(c.id, kind="campaign.amended") == []

    amended = store.get_or_create_campaign("demo", snapshot=changed, config_hash="h2", seed=7, budget=40, amend=True)
    assert amended.id == c.id and amended.config_hash == "h2" and amended.config_snapshot == changed
    assert amended.budget == 40
    (event,) = store.events(c.id, kind="campaign.amended")
    assert event.payload == {
        "old": DEMO,
        "new": changed,
        "differences": [["acquisition.batch_size", 4, 8], ["budget.experiments", 32, 40]],
    }
    assert store.get_or_create_campaign("demo", snapshot=changed, config_hash="h2", seed=7, budget=40).id == c.id
    with pytest.raises(CampaignConfigChanged, match=r"acquisition\.batch_size 8 → 4"):
        _campaign(store, "demo", snapshot=DEMO, config_hash="h1")
    # many or long changes still make one line; equal snapshots with another hash name the hashes
    wide = {f"k{i}": {"text": "x" * 100} for i in range(9)}
    with pytest.raises(CampaignConfigChanged) as info:
        _campaign(store, "demo", snapshot=wide, config_hash="h3")
    assert "\n" not in str(info.value) and "and 7 more" in str(info.value) and "…" in str(info.value)
    assert "<absent>" in str(info.value)
    with pytest.raises(CampaignConfigChanged, match=r"config hash h2 → h4"):
        store.get_or_create_campaign("demo", snapshot=changed, config_hash="h4", seed=7, budget=40)
