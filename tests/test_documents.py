"""RepositoryWriter on a real RunEngine with ophyd.sim devices, on SQLite and PostgreSQL."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import bluesky.plan_stubs as bps
import bluesky.plans as bp
import pytest
import sqlalchemy as sa
from bluesky import RunEngine
from bluesky.preprocessors import run_decorator
from ophyd.sim import SynSignal

from sdl.lab.documents import RepositoryWriter
from sdl.repository import Store


@pytest.fixture(scope="module")
def RE() -> Iterator[RunEngine]:
    engine = RunEngine(context_managers=[])  # one per module: each RunEngine leaks a thread
    yield engine
    engine.halt() if engine.state != "idle" else None




def _experiment(store: Store) -> tuple[int, int]:
    c = store.get_or_create_campaign("docs", snapshot={"objective": {"property": "e_form", "goal": "minimize"}},
                                     config_hash="h", seed=0, budget=5)
    eid = store.propose_experiment(c.id, idempotency_key=f"docs:{len(store.experiments(c.id))}",
                                   candidate_key="SrTiO3", params={}, provenance={})
    store.start_experiment(eid, instruments=["station"])
    return c.id, eid


def _md(campaign_id: int | None, experiment_id: int | None) -> dict:
    return {
        "sdl": {
            "campaign_id": campaign_id,
            "experiment_id": experiment_id,
            "recipe": {"A": "Sr", "B": "Ti"},
            "instrument": "station",
            "measurements": {"e_form": {"property": "e_form", "unit": "eV/atom", "uncertainty_key": "e_form_std"},
                             "gap": {"property": "band_gap", "unit": "eV", "uncertainty_key": None}},
            "quality_key": "quality",
        }
    }


def _devices(values: list, qualities: list[str]) -> list[SynSignal]:
    # SynSignal calls its func once at construction: the first item is that initial read
    vals, quals = iter([0.0, *values]), iter(["ok", *qualities])
    gaps = itertools.count(0.0)
    return [
        SynSignal(name="e_form", func=lambda: next(vals)),
        SynSignal(name="e_form_std", func=lambda: 0.05),
        SynSignal(name="gap", func=lambda: next(gaps)),
        SynSignal(name="quality", func=lambda: next(quals)),
    ]


def test_count_plan_stores_documents_and_measurements(RE: RunEngine, store: Store) -> None:
    cid, eid = _experiment(store)
    writer = RepositoryWriter(store)
    token = RE.subscribe(writer)
    try:
        (uid,) = RE(bp.count(_devices([-1.25, -1.5, -1.0], ["ok", "drift", "ok"]), num=3, md=_md(cid, eid)))
    finally:
        RE.unsubscribe(token)
    assert writer.errors == [] and writer.pending == []
    docs = store.documents(uid)
    assert [d.name for d in docs] == ["start", "descriptor", "event", "event", "event", "stop"]
    assert [d.sequence for d in docs] == [1, 2, 3, 4, 5, 6]
    assert docs[0].document["sdl"]["recipe"] == {"A": "Sr", "B": "Ti"} and docs[0].doc_uid == uid
    (run,) = store.runs(eid)
    assert (run.uid, run.plan_name, run.exit_status) == (uid, "count", "success")
    assert run.stop_time is not None and run.stop_time >= run.start_time

    meas = store.measurements(experiment_id=eid)
    assert [(m.property, m.value, m.quality) for m in meas] == [
        ("e_form", -1.25, "ok"), ("band_gap", 1.0, "ok"),
        ("e_form", -1.5, "drift"), ("band_gap", 2.0, "drift"),
        ("e_form", -1.0, "ok"), ("band_gap", 3.0, "ok"),
    ]
    e_form = [m for m in meas if m.property == "e_form"]
    assert all(m.uncertainty == 0.05 and m.unit == "eV/atom" and m.instrument == "station" for m in e_form)
    assert all(m.run_uid == uid and m.event_uid for m in meas)
    assert [m.event_uid for m in e_form] == [d.doc_uid for d in docs if d.name == "event"]
    assert meas[1].unit == "eV" and meas[1].uncertainty is None
    assert all(m.timestamp.tzinfo is not None for m in meas)
    store.complete_experiment(eid)
    (obs,) = store.observations(cid, "e_form")
    assert obs.value == pytest.approx(-1.125) and obs.n_measurements == 2  # the drift one is left out
    kinds = [e.kind for e in store.events(experiment_id=eid)]
    assert "run.start" in kinds and "run.stop" in kinds


def test_failed_run_flags_its_measurements_invalid(RE: RunEngine, store: Store) -> None:
    cid, eid = _experiment(store)
    writer = RepositoryWriter(store)
    dets = _devices([-2.0], ["ok"])

    @run_decorator(md=_md(cid, eid))
    def plan():  # type: ignore[no-untyped-def]
        yield from bps.trigger_and_read(dets)
        raise RuntimeError("station lost the sample")

    token = RE.subscribe(writer)
    try:
        with pytest.raises(RuntimeError, match="lost the sample"):
            RE(plan())
    finally:
        RE.unsubscribe(token)
    assert writer.errors == []
    (run,) = store.runs(eid)
    assert run.exit_status == "fail" and "lost the sample" in (run.reason or "")
    meas = store.measurements(experiment_id=eid)
    assert len(meas) == 2 and {m.quality for m in meas} == {"invalid"}
    assert store.measurements_of("e_form") == []
    (inv,) = store.events(experiment_id=eid, kind="measurements.invalidated")
    assert inv.payload["count"] == 2 and inv.level == "warning"  # type: ignore[index]


def test_non_finite_and_non_numeric_values_are_never_measurements(RE: RunEngine, store: Store) -> None:
    cid, eid = _experiment(store)
    writer = RepositoryWriter(store)
    token = RE.subscribe(writer)
    try:
        RE(bp.count(_devices([math.nan, math.inf, -0.5], ["ok", "ok", "ok"]), num=3, md=_md(cid, eid)))
    finally:
        RE.unsubscribe(token)
    e_form = [m for m in store.measurements(experiment_id=eid) if m.property == "e_form"]
    assert [m.value for m in e_form] == [-0.5]
    rejected = store.events(experiment_id=eid, kind="measurement.rejected")
    assert [e.payload["value"] for e in rejected] == ["nan", "inf"]  # type: ignore[index]
    assert writer.errors == []
    # a string where a number belongs, fed straight to the writer: stored as a document, not a measurement
    run = store.runs(eid)[0]
    docs = store.documents(run.uid)
    writer2 = RepositoryWriter(store)
    start = dict(docs[0].document, uid="start-x")
    desc = dict(docs[1].document, uid="desc-x", run_start="start-x")
    event = dict(docs[2].document, uid="event-x", descriptor="desc-x",
                 data={"e_form": "garbled", "e_form_std": 0.1, "gap": 1.0, "quality": "ok"})
    for name, doc in (("start", start), ("descriptor", desc), ("event", event)):
        writer2(name, doc)
    assert [m.property for m in store.measurements(experiment_id=eid) if m.run_uid == "start-x"] == ["band_gap"]
    assert store.events(experiment_id=eid, kind="measurement.rejected")[-1].payload["value"] == "'garbled'"  # type: ignore[index]


def test_invalid_documents_are_stored_and_reported(store: Store) -> None:
    cid, eid = _experiment(store)
    writer = RepositoryWriter(store)
    writer("start", {"uid": "s-1", "sdl": _md(cid, eid)["sdl"]})  # no 'time': not a valid start document
    writer("stop", {"uid": "p-1", "run_start": "s-1", "time": 1.0, "exit_status": "success"})  # no num_events is ok
    assert [e.name for e in writer.errors] == ["start"] and writer.errors[0].stored
    assert "time" in writer.errors[0].message
    assert [d.name for d in store.documents("s-1")] == ["start", "stop"]
    (bad,) = store.events(kind="document.invalid")
    assert bad.level == "error" and bad.payload["uid"] == "s-1"  # type: ignore[index]
    # a document that is not even a mapping, or names an unknown run: recorded, never raised
    writer("event", None)  # type: ignore[arg-type]
    writer("stop", {"uid": "p-2", "run_start": "nope", "time": 2.0, "exit_status": "success"})
    assert len(writer.errors) >= 3


def test_storage_failure_never_reaches_the_run_and_is_retried(RE: RunEngine, sqlite_url: str) -> None:
    store = Store.from_url(sqlite_url, create=True)
    cid, eid = _experiment(store)
    writer = RepositoryWriter(store)
    with store.engine.begin() as conn:  # the documents table disappears mid-campaign
        conn.execute(sa.text("ALTER TABLE bluesky_documents RENAME TO bluesky_documents_away"))
    token = RE.subscribe(writer)
    try:
        (uid,) = RE(bp.count(_devices([-3.0, -3.5], ["ok", "ok"]), num=2, md=_md(cid, eid)))  # the run still succeeds
    finally:
        RE.unsubscribe(token)
    assert len(writer.pending) == 5 and all(not e.stored for e in writer.errors)
    assert store.measurements(experiment_id=eid) == []
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE bluesky_documents_away RENAME TO bluesky_documents"))
    assert writer.retry() == 0
    assert [d.name for d in store.documents(uid)] == ["start", "descriptor", "event", "event", "stop"]
    assert [m.value for m in store.measurements(experiment_id=eid) if m.property == "e_form"] == [-3.0, -3.5]
    assert store.runs(eid)[0].exit_status == "success"
    store.close()


def test_run_without_sdl_metadata_is_stored_unlinked(RE: RunEngine, store: Store) -> None:
    writer = RepositoryWriter(store)
    token = RE.subscribe(writer)
    try:
        (uid,) = RE(bp.count([SynSignal(name="x", func=lambda: 1.0)], num=1))
    finally:
        RE.unsubscribe(token)
    assert writer.errors == []
    assert [d.name for d in store.documents(uid)] == ["start", "descriptor", "event", "stop"]
    assert store.runs()[0].experiment_id is None
