"""Bulk ingest on real SQLite and PostgreSQL: event pages, imports of earlier results, ``sdl tell --csv``.

Each bulk path is one transaction per batch: thousands of rows round-trip exactly, and one bad
row writes nothing and is named in one line. No timing here (``benchmarks/repository_ingest.py``).
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bluesky.plans as bp
import pytest
import sqlalchemy as sa
from bluesky import RunEngine
from event_model import pack_event_page
from ophyd.sim import SynSignal
from typer.testing import CliRunner

from sdl.cli.main import app
from sdl.config import load_campaign
from sdl.exceptions import RepositoryError
from sdl.lab.documents import RepositoryWriter
from sdl.repository import HandResult, Store

OBJECTIVE = {"property": "toughness", "unit": "J", "goal": "maximize"}


@pytest.fixture(scope="module")
def RE() -> Iterator[RunEngine]:
    engine = RunEngine(context_managers=[])  # one per module: each RunEngine leaks a thread
    yield engine




def _campaign(
    store: Store, name: str, n: int, *, state: str = "completed", source: str | None = None
) -> tuple[int, list[int]]:
    """A campaign with ``n`` experiments driven to ``state`` through the ordinary state-change methods."""
    c = store.get_or_create_campaign(name, snapshot={"objective": OBJECTIVE}, config_hash=name, seed=0, budget=n)
    ids = []
    for i in range(n):
        eid = store.propose_experiment(c.id, idempotency_key=f"{name}:{i}", candidate_key=f"{name}-k{i}",
                                       params={"i": i}, provenance={"source": source} if source else {})
        if state in ("running", "completed"):
            store.start_experiment(eid, instruments=["robot"])
        if state == "completed":
            store.complete_experiment(eid)
        ids.append(eid)
    return c.id, ids


def _count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())


def sdl(*args: str | Path) -> tuple[int, str, str]:
    """Run the real CLI; returns exit code, stdout, stderr."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------- Store.add_measurements_bulk


def test_bulk_measurements_round_trip_and_link_samples(store: Store) -> None:
    cid, ids = _campaign(store, "bulk", 50)
    sample = store.add_sample(ids[3], instrument="robot", sample_uid="S-3")
    t0 = dt.datetime(2026, 1, 5, 10, 0, tzinfo=dt.UTC)
    rows: list[tuple[int, dict[str, Any]]] = [
        (ids[i % 50], {"property": "toughness" if i % 2 else "density", "value": 0.001 * i - 1.5,
                       "unit": "J" if i % 2 else "g/cm3", "uncertainty": 0.01 * (i % 7) if i % 3 else None,
                       "instrument": "earlier-lab", "quality": "ok" if i % 11 else "drift",
                       "timestamp": t0 + dt.timedelta(seconds=i)})
        for i in range(5000)
    ]
    assert store.add_measurements_bulk(rows, campaign_id=cid, source="notebook.csv") == 5000
    got = store.measurements(campaign_id=cid)
    assert len(got) == 5000
    for (eid, want), m in zip(rows, got, strict=True):  # insertion order is id order
        assert (m.experiment_id, m.property, m.unit, m.instrument, m.quality) == (
            eid, want["property"], want["unit"], "earlier-lab", want["quality"])
        assert m.value == pytest.approx(want["value"], abs=0, rel=1e-15)
        assert m.uncertainty == want["uncertainty"] or math.isclose(m.uncertainty, want["uncertainty"])
        assert m.timestamp == want["timestamp"]
        assert m.sample_id == (sample if eid == ids[3] else None)
    events = store.events(campaign_id=cid, kind="measurements.bulk")
    assert len(events) == 1 and events[0].payload == {"count": 5000, "source": "notebook.csv"}
    # the engine's view: observations are the ok means of completed experiments
    obs = {o.experiment_id: o for o in store.observations(cid, "toughness")}
    assert len(obs) == 25


@pytest.mark.parametrize("bad", ["nan", "text", "unknown experiment", "other campaign", "twice", "no run",
                                 "naive time", "long unit", "unknown sample"])
def test_one_bad_row_writes_nothing_and_is_named(store: Store, bad: str) -> None:
    cid, ids = _campaign(store, "bulk", 20)
    _, other = _campaign(store, "other", 1)
    store.record_run_start("run-1", experiment_id=ids[0], plan_name="count")
    rows: list[tuple[int, dict[str, Any]]] = [
        (ids[i % 20], {"property": "toughness", "value": float(i), "run_uid": "run-1", "event_uid": f"ev-{i}",
                       "origin": f"old.csv line {i + 2}"})
        for i in range(3000)
    ]
    fields = dict(rows[2499][1])
    eid = rows[2499][0]
    if bad == "nan":
        fields["value"] = float("nan")
    elif bad == "text":
        fields["value"] = "12 J"
    elif bad == "unknown experiment":
        eid = 999_999
    elif bad == "other campaign":
        eid = other[0]
    elif bad == "twice":
        fields["event_uid"] = "ev-7"
    elif bad == "naive time":
        fields["timestamp"] = dt.datetime(2026, 1, 5, 10, 0)  # naive: the mistake under test
    elif bad == "long unit":
        fields["unit"] = "J" * 51
    elif bad == "unknown sample":
        fields["sample_id"] = store.add_sample(ids[0], instrument="robot", sample_uid="S-0")  # another experiment's
    else:
        fields["run_uid"] = "run-never"
    rows[2499] = (eid, fields)
    before = _count(store, "measurements"), _count(store, "events")
    with pytest.raises(RepositoryError) as err:
        store.add_measurements_bulk(rows, campaign_id=cid, source="old.csv")
    message = str(err.value)
    assert message.startswith("old.csv line 2501: ") and "\n" not in message
    expected = {"nan": "not finite", "text": "not a number", "unknown experiment": "no experiment with id=999999",
                "other campaign": f"has no experiment {other[0]}", "twice": "of event ev-7 is already stored",
                "no run": "no Bluesky run 'run-never'", "naive time": "is not a timezone-aware datetime",
                "long unit": "unit 'JJJ", "unknown sample": "has no sample with id="}[bad]
    assert expected in message
    assert (_count(store, "measurements"), _count(store, "events")) == before


def test_a_row_already_in_the_repository_is_refused(store: Store) -> None:
    _, ids = _campaign(store, "bulk", 2)
    rows = [(ids[0], {"property": "toughness", "value": 1.0, "event_uid": f"e{i}"}) for i in range(10)]
    store.add_measurements_bulk(rows)
    with pytest.raises(RepositoryError, match=r"^row 4: 'toughness' of event e3 is already stored$"):
        store.add_measurements_bulk([(ids[1], {"property": "toughness", "value": 2.0, "event_uid": f"n{i}"})
                                     for i in range(3)] + [rows[3]])
    assert _count(store, "measurements") == 10


# ---------------------------------------------------------------------------- Bluesky event pages


class PagingSubscriber:
    """Hands a run's events to ``target`` as one ``event_page`` per descriptor, just before the stop.

    What a bulk stream (a flyer, a fast detector) delivers: pages, not single events.
    """

    def __init__(self, target: RepositoryWriter) -> None:
        self.target = target
        self.events: dict[str, list[dict[str, Any]]] = {}

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "event":
            self.events.setdefault(doc["descriptor"], []).append(doc)
            return
        if name == "stop":
            for events in self.events.values():
                self.target("event_page", dict(pack_event_page(*events)))
            self.events = {}
        self.target(name, doc)


def test_event_page_from_a_real_run_engine_lands_as_measurements(RE: RunEngine, store: Store) -> None:
    cid, ids = _campaign(store, "pages", 1, state="running")
    values = iter([0.0, *(0.5 + 0.001 * i for i in range(400))])  # SynSignal reads once at construction
    detectors = [SynSignal(name="toughness", func=lambda: next(values)),
                 SynSignal(name="toughness_std", func=lambda: 0.02)]
    md = {"sdl": {"campaign_id": cid, "experiment_id": ids[0], "recipe": {}, "instrument": "tester",
                  "measurements": {"toughness": {"property": "toughness", "unit": "J",
                                                 "uncertainty_key": "toughness_std"}},
                  "quality_key": None}}
    writer = RepositoryWriter(store)
    token = RE.subscribe(PagingSubscriber(writer))
    try:
        (uid,) = RE(bp.count(detectors, num=400, md=md))
    finally:
        RE.unsubscribe(token)
    assert writer.errors == [] and writer.pending == []
    docs = store.documents(uid)
    assert [d.name for d in docs] == ["start", "descriptor", "event_page", "stop"]
    page = docs[2].document
    got = store.measurements(experiment_id=ids[0])
    assert len(got) == 400
    assert [m.event_uid for m in got] == page["uid"]
    assert [m.value for m in got] == pytest.approx([0.5 + 0.001 * i for i in range(400)])
    assert {(m.property, m.unit, m.uncertainty, m.instrument, m.quality, m.run_uid) for m in got} == {
        ("toughness", "J", 0.02, "tester", "ok", uid)}
    assert [m.timestamp for m in got] == [dt.datetime.fromtimestamp(t, dt.UTC) for t in page["timestamps"]["toughness"]]


def test_a_page_with_a_refused_row_stores_nothing_of_it(store: Store) -> None:
    _, ids = _campaign(store, "pages", 1, state="running")
    store.record_run_start("run-p", experiment_id=ids[0], plan_name="count")
    store.add_measurement(ids[0], property="toughness", value=1.0, run_uid="run-p", event_uid="e5")
    events = [{"descriptor": "d", "uid": f"e{i}", "time": float(i), "seq_num": i + 1, "data": {"toughness": 1.0},
               "timestamps": {"toughness": float(i)}, "filled": {}} for i in range(1, 1001)]
    page = dict(pack_event_page(*events))
    rows = [(ids[0], {"property": "toughness", "value": float(i), "run_uid": "run-p", "event_uid": f"e{i}"})
            for i in range(1, 1001)]
    docs_before = _count(store, "bluesky_documents")
    with pytest.raises(RepositoryError, match="row 5: 'toughness' of event e5 is already stored"):
        store.record_event_page("run-p", page, measurements=rows)
    assert _count(store, "bluesky_documents") == docs_before
    assert len(store.measurements(experiment_id=ids[0])) == 1


# ---------------------------------------------------------------------------- sdl tell --csv


def _hand_campaign(tmp_path: Path, store: Store, n: int) -> tuple[int, list[int], str]:
    """A real campaign YAML's snapshot in the repository with ``n`` experiments asked by hand."""
    path = tmp_path / "bench-hands.yaml"
    path.write_text("\n".join([
        "name: bench-hands", "seed: 1", "search_space:", "  parameters:",
        "    - {name: x, type: continuous, low: 0, high: 1}",
        "objective: {property: toughness, unit: J, goal: maximize}", "model: {name: random}",
        f"budget: {{experiments: {n}}}",
    ]) + "\n")
    cfg = load_campaign(path)
    c = store.get_or_create_campaign(cfg.name, snapshot=cfg.snapshot(), config_hash=cfg.config_hash(),
                                     seed=cfg.seed, budget=n)
    ids = [store.propose_experiment(c.id, idempotency_key=f"h:{i}", candidate_key=f"x={i / n:.4f}",
                                    params={"x": i / n}, provenance={"source": "hands"}) for i in range(n)]
    return c.id, ids, cfg.name


def test_tell_csv_with_a_thousand_rows(tmp_path: Path, store: Store, database_url: str) -> None:
    cid, ids, name = _hand_campaign(tmp_path, store, 1000)
    lines = ["experiment,value,failed,notes"]
    for i, eid in enumerate(ids):
        lines.append(f"{eid},,furnace cracked,n{i}" if i % 100 == 7 else f"{eid},{0.01 * i:.2f},,n{i}")
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([*lines[:700], f"{ids[-1] + 5},1.0,,x", *lines[700:]]) + "\n")
    events_before = _count(store, "events")
    code, _, err = sdl("tell", name, "--csv", bad, "--db", database_url, "--by", "alice")
    assert code == 2
    assert _error_line(err) == f"error: {bad} line 701: campaign 'bench-hands' has no experiment {ids[-1] + 5}"
    assert _count(store, "measurements") == 0 and _count(store, "events") == events_before
    good = tmp_path / "good.csv"
    good.write_text("\n".join(lines) + "\n")
    code, out, err = sdl("tell", name, "--csv", good, "--db", database_url, "--by", "alice")
    assert code == 0, err
    assert "campaign bench-hands completed: budget" in out
    experiments = store.experiments(cid)
    assert sum(e.state == "completed" for e in experiments) == 990
    assert sum(e.state == "failed" and e.failure_reason == "furnace cracked" for e in experiments) == 10
    assert {tuple(e.instruments or []) for e in experiments} == {("hands:alice",)}
    got = {m.experiment_id: m for m in store.measurements(campaign_id=cid)}
    assert len(got) == 990
    for i, eid in enumerate(ids):
        if i % 100 != 7:
            assert (got[eid].value, got[eid].unit, got[eid].instrument) == (round(0.01 * i, 2), "J", "hands:alice")
    # one event per state change, as for experiments run by instruments, plus one "told" each
    kinds = [e.kind for e in store.events(campaign_id=cid)]
    assert kinds.count("experiment.running") == 1000 and kinds.count("experiment.completed") == 990
    assert kinds.count("experiment.failed") == 10 and kinds.count("experiment.told") == 1000
    assert store.get_campaign(cid).state == "completed"  # type: ignore[union-attr]


def test_bulk_tell_leaves_the_same_rows_as_one_by_one(tmp_path: Path, sqlite_url: str) -> None:
    store = Store.from_url(sqlite_url, create=True)
    try:
        outcomes = {}
        for method in ("record_hand_results", "record_hand_results_bulk"):
            cid, ids = _campaign(store, method, 6, state="proposed", source="hands")
            store.start_experiment(ids[1], instruments=["robot"])
            store.start_experiment(ids[2], instruments=["robot"])
            store.complete_experiment(ids[2])
            store.add_sample(ids[1], instrument="robot", sample_uid=f"{method}-S1")
            store.add_measurement(ids[2], property="toughness", value=3.0)
            results = [HandResult(ids[0], value=1.5, origin="f line 2"),  # proposed → completed
                       HandResult(ids[1], value=2.5, origin="f line 3"),  # running, with a sample
                       HandResult(ids[2], value=4.0, origin="f line 4"),  # completed: amended
                       HandResult(ids[3], failed="cracked")]  # proposed → failed
            told = getattr(store, method)(cid, results, by="bob", property="toughness", unit="J", amend=True)
            outcomes[method] = (
                [(o.state, o.value, o.failed, o.amended) for o in told],
                [(e.state, e.instruments, e.failure_kind, e.failure_reason, e.started_at is not None,
                  e.finished_at is not None) for e in store.experiments(cid)],
                [(ids.index(m.experiment_id), m.value, m.unit, m.instrument, m.quality, m.sample_id is not None)
                 for m in store.measurements(campaign_id=cid)],
                [(e.kind, e.level, re.sub(rf"^experiment {e.experiment_id}\b", "experiment #", e.message), e.payload)
                 for e in store.events(campaign_id=cid) if e.kind not in ("campaign.created", "experiment.proposed")],
            )
        assert outcomes["record_hand_results"] == outcomes["record_hand_results_bulk"]
    finally:
        store.close()


# ---------------------------------------------------------------------------- sdl import-results


def test_import_results_files_earlier_results_all_or_nothing(tmp_path: Path, store: Store, database_url: str) -> None:
    cid, ids = _campaign(store, "earlier", 200)
    lines = ["candidate,experiment,property,value,uncertainty,timestamp"]
    for i in range(2000):
        eid = ids[i % 200]
        by_candidate = i % 2 == 0
        lines.append(f"{'earlier-k' + str(i % 200) if by_candidate else ''},{'' if by_candidate else eid},"
                     f"{'density' if i % 4 == 1 else ''},{1.0 + 0.001 * i},{0.01 if i % 5 else ''},"
                     f"2026-01-05T10:{i // 60 % 60:02d}:{i % 60:02d}Z")
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([*lines[:1234], "earlier-k3,,,1.0,,2026-01-05T10:00:00", *lines[1234:]]) + "\n")
    code, _, err = sdl("import-results", "earlier", "--csv", bad, "--db", database_url)
    assert code == 2
    assert _error_line(err) == (f"error: {bad} line 1235: timestamp '2026-01-05T10:00:00' has no time zone "
                                "(add Z or +01:00)")
    good = tmp_path / "earlier.csv"
    good.write_text("\n".join([*lines[:1500], f"earlier-k{len(ids) + 1},,,1.0,,", *lines[1500:]]) + "\n")
    code, _, err = sdl("import-results", "earlier", "--csv", good, "--db", database_url)
    assert code == 2 and "line 1501: campaign 'earlier' has no experiment of candidate 'earlier-k201'" in err
    assert _count(store, "measurements") == 0
    good.write_text("\n".join(lines) + "\n")
    code, out, err = sdl("import-results", "earlier", "--csv", good, "--db", database_url)
    assert code == 0, err
    assert "2000 measurement(s) of 200 experiment(s) imported into 'earlier'" in out
    got = store.measurements(campaign_id=cid)
    assert len(got) == 2000
    assert sum(m.property == "density" for m in got) == 500
    assert {m.unit for m in got if m.property == "toughness"} == {"J"}
    assert {m.unit for m in got if m.property == "density"} == {None}
    assert {m.instrument for m in got} == {"import:earlier.csv"}
    assert [m.experiment_id for m in got] == [ids[i % 200] for i in range(2000)]
    assert got[61].timestamp == dt.datetime(2026, 1, 5, 10, 1, 1, tzinfo=dt.UTC)
    assert len(store.observations(cid, "toughness")) == 150  # experiments 1, 5, 9, ... got density only
    code, _, err = sdl("import-results", "nowhere", "--csv", good, "--db", database_url)
    assert code == 1 and "no campaign named 'nowhere'" in err
