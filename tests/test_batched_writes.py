"""Batched repository writes (issue 13): one transaction per step, measurements committed at once.

Real SQL on SQLite and PostgreSQL, real event-model documents, a real Ophyd ``DeviceStatus``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from event_model import compose_run

from sdl.exceptions import RepositoryError
from sdl.lab.documents import RepositoryWriter
from sdl.repository import Store


def _experiment(store: Store) -> tuple[int, int]:
    c = store.get_or_create_campaign("batched", snapshot={"objective": {"property": "e_form", "goal": "minimize"}},
                                     config_hash="h", seed=0, budget=5)
    eid = store.propose_experiment(c.id, idempotency_key=f"batched:{len(store.experiments(c.id))}",
                                   candidate_key="SrTiO3", params={})
    store.start_experiment(eid, instruments=["station"])
    return c.id, eid


def _run(campaign_id: int, experiment_id: int, value: float) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    """The documents of a one-event characterization run, as the RunEngine would emit them."""
    bundle = compose_run(metadata={"sdl": {
        "campaign_id": campaign_id, "experiment_id": experiment_id, "instrument": "station",
        "measurements": {"e_form": {"property": "e_form", "unit": "eV"}}, "quality_key": None}})
    descriptor = bundle.compose_descriptor(
        name="primary", data_keys={"e_form": {"source": "sim", "dtype": "number", "shape": []}})
    now = time.time()
    event = descriptor.compose_event(data={"e_form": value}, timestamps={"e_form": now}, seq_num=1)
    stop = bundle.compose_stop(exit_status="success")
    docs = [("start", dict(bundle.start_doc)), ("descriptor", dict(descriptor.descriptor_doc)),
            ("event", dict(event)), ("stop", dict(stop))]
    return docs, bundle.start_doc["uid"]


def test_unit_of_work_is_all_or_nothing(store: Store) -> None:
    cid, eid = _experiment(store)
    with store.unit_of_work():  # nested units join the outer one; all commit together
        store.log_event("test.one", "first", campaign_id=cid)
        with store.unit_of_work():
            store.log_event("test.two", "second", campaign_id=cid)
    assert {e.kind for e in store.events(cid)} >= {"test.one", "test.two"}

    with pytest.raises(RepositoryError), store.unit_of_work():
        store.log_event("test.three", "rolled back with the failing write", campaign_id=cid)
        store.record_run_start("run-x", experiment_id=eid + 1000, plan_name="p")  # no such experiment
    assert "test.three" not in {e.kind for e in store.events(cid)}
    store.log_event("test.four", "after the unit, a call has its own transaction again", campaign_id=cid)
    assert "test.four" in {e.kind for e in store.events(cid)}


def test_measurement_committed_at_its_event_and_the_run_at_its_stop(store: Store, database_url: str) -> None:
    cid, eid = _experiment(store)
    writer = RepositoryWriter(store, validate=False)
    docs, run_uid = _run(cid, eid, -1.25)
    other = Store.from_url(database_url)  # another connection: sees only what was committed
    try:
        writer(*docs[0])
        writer(*docs[1])
        assert other.runs(eid) == [] and other.documents(run_uid) == []  # queued, not yet written
        writer(*docs[2])  # the event carries a measurement: committed now, with start and descriptor
        assert [m.value for m in other.measurements(experiment_id=eid)] == [-1.25]
        assert [d.name for d in other.documents(run_uid)] == ["start", "descriptor", "event"]
        assert other.runs(eid)[0].exit_status is None
        writer(*docs[3])
        assert [d.name for d in other.documents(run_uid)] == ["start", "descriptor", "event", "stop"]
        assert [d.sequence for d in other.documents(run_uid)] == [1, 2, 3, 4]
        assert other.runs(eid)[0].exit_status == "success"
    finally:
        other.close()
    assert writer.errors == [] and writer.pending == []
    for name, doc in docs:  # documents are idempotent on their uid, also in a batch
        writer(name, doc)
    assert len(store.documents(run_uid)) == 4 and len(store.measurements(experiment_id=eid)) == 1


def test_a_failed_batch_keeps_every_document_for_retry(store: Store) -> None:
    import sqlalchemy as sa

    from sdl.repository.schema import Measurement

    cid, eid = _experiment(store)
    writer = RepositoryWriter(store, validate=False)
    docs, run_uid = _run(cid, eid, 0.5)
    # A row that the event's measurement collides with (unique event_uid + property): a real
    # integrity error in the middle of the batch.
    clash = store.add_measurement(eid, property="e_form", value=9.0, event_uid=docs[2][1]["uid"])
    for name, doc in docs[:3]:
        writer(name, doc)
    assert [name for name, _ in writer.pending] == ["start", "descriptor", "event"]  # rolled back together
    assert {e.name for e in writer.errors} == {"start", "descriptor", "event"}
    assert store.documents(run_uid) == [] and store.runs(eid) == []
    with store.engine.begin() as conn:
        conn.execute(sa.delete(Measurement).where(Measurement.id == clash))
    assert writer.retry() == 0
    writer(*docs[3])
    assert [d.name for d in store.documents(run_uid)] == ["start", "descriptor", "event", "stop"]
    assert [m.value for m in store.measurements(experiment_id=eid)] == [0.5]


def test_one_deadline_thread_fails_overdue_statuses_only() -> None:
    from ophyd import Device
    from ophyd.status import DeviceStatus

    from devices import deadlines
    from sdl.exceptions import InstrumentTimeout

    device = Device(name="slowpoke")
    stopped = threading.Event()
    device.stop = lambda *, success=False: stopped.set()  # DeviceStatus calls it on failure
    late = deadlines.arm(DeviceStatus(device), 0.2)
    prompt = deadlines.arm(DeviceStatus(device), 0.3)
    prompt.set_finished()
    with pytest.raises(InstrumentTimeout, match=r"status timeout of 0\.2 s"):
        late.wait(5)
    assert stopped.wait(5)
    prompt.wait(1)
    assert prompt.success and not late.success
    time.sleep(0.3)  # past the prompt one's deadline: it stays a success
    assert prompt.success and prompt.exception() is None


def test_a_writer_told_the_campaign_reads_no_experiment(store: Store) -> None:
    """The lab tells the writer each experiment it commits: a run's start then costs no lookup."""
    import sqlalchemy as sa

    cid, eid = _experiment(store)
    statements: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    def write(writer: RepositoryWriter, docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
        statements.clear()
        sa.event.listen(store.engine, "before_cursor_execute", record)
        try:
            for name, doc in docs:
                writer(name, doc)
        finally:
            sa.event.remove(store.engine, "before_cursor_execute", record)
        assert writer.errors == []
        return [s for s in statements if "FROM experiments" in s]

    told = RepositoryWriter(store, validate=False)
    told.link_experiment(eid, cid)
    assert write(told, _run(cid, eid, 0.75)[0]) == []
    assert write(RepositoryWriter(store, validate=False), _run(cid, eid, 0.8)[0]) != []  # an untold one looks
    runs = [e for e in store.events(cid) if e.kind.startswith("run.")]
    assert len(runs) == 4 and {e.campaign_id for e in runs} == {cid}
