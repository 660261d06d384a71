"""``RepositoryWriter``: a Bluesky ``(name, doc)`` subscriber that files every document in the repository.

Why a subscriber and not a post-processing step: measurements must be in the repository as soon as
the instrument produced them, so a crash between two experiments loses nothing.

The writer follows the "Bluesky document convention" of ``docs/ARCHITECTURE.md``: the start
document's ``md["sdl"]`` names the experiment, the instrument, the event data keys that are
measurements (with property, unit and uncertainty key) and the data key holding the quality flag.
It stores *every* document (start, descriptor, event, event_page, stop, resource, datum, ...),
validates each against ``event_model``'s JSON schemas, derives one measurement per mapped data key
per event, and flags a run's measurements ``invalid`` when its stop document says it did not
succeed.

It never raises into the RunEngine (a raising callback aborts the run): a failure is logged, kept
in :attr:`RepositoryWriter.errors`, recorded as an event when the database allows, and the
document is kept in :attr:`RepositoryWriter.pending` for :meth:`RepositoryWriter.retry`.
Non-finite or non-numeric values are never stored as measurements (an event says so instead).

Batched writes: documents are routed at once (which run, which experiment, which measurements)
but written in one transaction (:meth:`~sdl.repository.store.Store.unit_of_work`) when it matters
for a crash: at a run's stop, and at an event that carries measurements (with everything queued
before it), so a measurement is committed as soon as the instrument produced it. A kill -9 in the
middle of a run loses only that run's not yet committed documents (start, descriptor), never a
measurement or an experiment's state change (those are the ``Store``'s own transactions).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sdl.exceptions import RepositoryError
from sdl.repository.store import Store

__all__ = ["RepositoryWriter", "WriterError"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WriterError:
    """One problem the writer met; ``stored`` says whether the document itself reached the database."""

    name: str
    run_uid: str | None
    doc_uid: str | None
    message: str
    stored: bool


_Row = tuple[str | None, str, dict[str, Any], Sequence[tuple[int, dict[str, Any]]]]
"""One document for ``Store.record_documents``: run uid, name, document, derived measurements."""
_Write = Callable[[], object] | _Row


@dataclasses.dataclass
class _Run:
    experiment_id: int | None
    campaign_id: int | None
    instrument: str | None
    measurements: dict[str, dict[str, Any]]
    quality_key: str | None


def _epoch(t: Any) -> dt.datetime | None:
    try:
        value = float(t)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value):
        return None
    return dt.datetime.fromtimestamp(value, dt.UTC)


def _number(value: Any) -> float | None:
    """``float(value)`` for real numbers (python or numpy scalars), None for anything else or non-finite."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        return None
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", ()) == ():
        value = item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


class RepositoryWriter:
    """Store Bluesky documents and derived measurements; never raise into the RunEngine.

    Args:
        store: The repository to write to.
        validate: Check each document against ``event_model.schema_validators``.
    """

    def __init__(self, store: Store, *, validate: bool = True) -> None:
        self.store = store
        self.validate = validate
        self.errors: list[WriterError] = []
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self._runs: dict[str, _Run] = {}
        self._descriptors: dict[str, str] = {}
        self._resources: dict[str, str] = {}
        self._campaigns: dict[int, int] = {}  # experiment id → campaign id (never changes)
        self._queue: list[tuple[str, dict[str, Any], _Write]] = []  # writes not yet committed
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ entry points

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        """Handle one document; any failure is recorded, never raised."""
        with self._lock:
            try:
                self._handle(name, doc)
            except Exception as exc:  # noqa: BLE001 - the RunEngine must never see it
                self._fail(name, doc, f"{exc.__class__.__name__}: {exc}", stored=False)
                self.pending.append((name, doc))
            if name == "stop" or not self._runs:
                self._flush("")

    def link_experiment(self, experiment_id: int, campaign_id: int) -> None:
        """Tell the writer an experiment's campaign, so its runs' documents need no lookup of it.

        Why: whoever just committed the experiment (the lab, at a proposal) knows both, and the
        lookup was one query per experiment. Only committed experiments may be told.
        """
        with self._lock:
            self._campaigns[experiment_id] = campaign_id

    def flush(self) -> int:
        """Commit the queued writes now; returns how many documents are pending after it."""
        with self._lock:
            self._flush("")
            return len(self.pending)

    def retry(self) -> int:
        """Try the documents whose storage failed again, in order; returns how many still fail."""
        with self._lock:
            queue, self.pending = self.pending, []
            for name, doc in queue:
                try:
                    self._handle(name, doc)
                except Exception as exc:  # noqa: BLE001
                    self._fail(name, doc, f"retry: {exc.__class__.__name__}: {exc}", stored=False)
                    self.pending.append((name, doc))
            self._flush("retry: ")
            return len(self.pending)

    # ------------------------------------------------------------------ batching

    def _write(self, name: str, doc: dict[str, Any], write: _Write) -> None:
        """Queue one write of a document: a store call, or a document row for ``Store.record_documents``."""
        self._queue.append((name, doc, write))

    def _document(self, run_uid: str | None, name: str, doc: dict[str, Any],
                  rows: Sequence[tuple[int, dict[str, Any]]] = ()) -> None:
        self._write(name, doc, (run_uid, name, doc, rows))

    def _flush(self, prefix: str) -> None:
        """Commit every queued write in one transaction; on failure each of their documents is pending."""
        queue, self._queue = self._queue, []
        if not queue:
            return
        try:
            with self.store.unit_of_work("repository writer"):
                documents: list[_Row] = []
                for _, _, write in queue:  # consecutive documents in one call, store calls in order
                    if isinstance(write, tuple):
                        documents.append(write)
                        continue
                    if documents:
                        self.store.record_documents(documents)
                        documents = []
                    write()
                if documents:
                    self.store.record_documents(documents)
        except Exception as exc:  # noqa: BLE001 - rolled back as a whole: every document is retried
            seen: set[int] = set()
            for name, doc, _ in queue:
                if id(doc) not in seen:
                    seen.add(id(doc))
                    self._fail(name, doc, f"{prefix}{exc.__class__.__name__}: {exc}", stored=False)
                    self.pending.append((name, doc))

    # ------------------------------------------------------------------ helpers

    def _run_of(self, name: str, doc: Mapping[str, Any]) -> str | None:
        if name == "start":
            uid = doc.get("uid")
            return uid if isinstance(uid, str) else None
        if name in ("stop", "descriptor"):
            uid = doc.get("run_start")
            return uid if isinstance(uid, str) else None
        if name in ("event", "event_page"):
            return self._descriptors.get(doc.get("descriptor", ""))
        if name in ("resource", "stream_resource"):
            uid = doc.get("run_start")
            return uid if isinstance(uid, str) and uid in self._runs else None
        if name in ("datum", "datum_page"):
            return self._resources.get(doc.get("resource", ""))
        if name == "stream_datum":
            return self._resources.get(doc.get("stream_resource", ""))
        return None

    def _fail(self, name: str, doc: object, message: str, *, stored: bool) -> None:
        run_uid = self._run_of(name, doc) if isinstance(doc, Mapping) else None
        doc_uid = doc.get("uid") if isinstance(doc, Mapping) and isinstance(doc.get("uid"), str) else None
        self.errors.append(WriterError(name=name, run_uid=run_uid, doc_uid=doc_uid, message=message, stored=stored))
        logger.error("repository writer: %s document %s of run %s: %s", name, doc_uid, run_uid, message)

    def _log(self, kind: str, message: str, run: _Run | None, level: str, payload: dict[str, Any]) -> None:
        try:
            self.store.log_event(
                kind,
                message,
                campaign_id=run.campaign_id if run else None,
                experiment_id=run.experiment_id if run else None,
                level=level,
                payload=payload,
            )
        except RepositoryError as exc:  # the database is gone: the error list still has it
            logger.error("repository writer: cannot record event %s: %s", kind, exc)

    def _check(self, name: str, doc: Mapping[str, Any]) -> None:
        if not self.validate:
            return
        from event_model import DocumentNames, schema_validators

        try:
            validator = schema_validators[DocumentNames[name]]
        except KeyError:
            message = f"unknown document name {name!r}"
        else:
            try:
                validator.validate(doc)
                return
            except Exception as exc:  # noqa: BLE001 - jsonschema.ValidationError and friends
                message = f"schema: {getattr(exc, 'message', exc)}"
        run_uid = self._run_of(name, doc)
        self._fail(name, doc, message, stored=True)
        self._log(
            "document.invalid",
            f"{name} document of run {run_uid} does not follow event-model's schema: {message}",
            self._runs.get(run_uid or ""),
            "error",
            {"name": name, "run_uid": run_uid, "uid": doc.get("uid") if isinstance(doc.get("uid"), str) else None,
             "error": message},
        )

    # ------------------------------------------------------------------ per document

    def _handle(self, name: str, doc: dict[str, Any]) -> None:
        if not isinstance(doc, Mapping):
            raise RepositoryError(f"{name} document is a {type(doc).__name__}, not a mapping")
        self._check(name, doc)
        handler = getattr(self, f"_on_{name}", None)
        if handler is not None:
            handler(doc)
        else:
            self._document(self._run_of(name, doc), name, doc)

    def _on_start(self, doc: dict[str, Any]) -> None:
        uid = doc.get("uid")
        if not isinstance(uid, str):
            self._document(None, "start", doc)
            return
        raw_md = doc.get("sdl")
        md: Mapping[str, Any] = raw_md if isinstance(raw_md, Mapping) else {}
        experiment_id = md.get("experiment_id")
        if not isinstance(experiment_id, int) or isinstance(experiment_id, bool):
            experiment_id = None
        raw_measurements = md.get("measurements")
        measurements: Mapping[str, Any] = raw_measurements if isinstance(raw_measurements, Mapping) else {}
        quality_key = md.get("quality_key") if isinstance(md.get("quality_key"), str) else None
        instrument = md.get("instrument") if isinstance(md.get("instrument"), str) else None
        campaign_id = None
        if experiment_id is not None and experiment_id in self._campaigns:
            campaign_id = self._campaigns[experiment_id]
        elif experiment_id is not None:
            experiment = self.store.get_experiment(experiment_id)
            if experiment is None:
                self._fail("start", doc, f"md['sdl']['experiment_id']={experiment_id} names no experiment", stored=True)
                self._log(
                    "document.unlinked",
                    f"run {uid}: md['sdl']['experiment_id']={experiment_id} names no experiment; stored unlinked",
                    None,
                    "error",
                    {"run_uid": uid, "experiment_id": experiment_id},
                )
                experiment_id = None
            else:
                campaign_id = self._campaigns[experiment_id] = experiment.campaign_id
        run = _Run(
            experiment_id=experiment_id,
            campaign_id=campaign_id,
            instrument=instrument,
            measurements={str(k): dict(v) for k, v in measurements.items() if isinstance(v, Mapping)},
            quality_key=quality_key,
        )
        plan_name = doc.get("plan_name") if isinstance(doc.get("plan_name"), str) else None
        start_time = _epoch(doc.get("time"))

        self._runs[uid] = run
        self._write("start", doc, lambda: self.store.record_run_start(
            uid, experiment_id=experiment_id, plan_name=plan_name, start_time=start_time, campaign_id=campaign_id))
        self._document(uid, "start", doc)

    def _on_descriptor(self, doc: dict[str, Any]) -> None:
        run_uid = self._run_of("descriptor", doc)
        if isinstance(doc.get("uid"), str) and run_uid is not None:
            self._descriptors[doc["uid"]] = run_uid
        self._document(run_uid, "descriptor", doc)

    def _on_resource(self, doc: dict[str, Any]) -> None:
        run_uid = self._run_of("resource", doc)
        if isinstance(doc.get("uid"), str) and run_uid is not None:
            self._resources[doc["uid"]] = run_uid
        self._document(run_uid, "resource", doc)

    def _on_stream_resource(self, doc: dict[str, Any]) -> None:
        run_uid = self._run_of("stream_resource", doc)
        if isinstance(doc.get("uid"), str) and run_uid is not None:
            self._resources[doc["uid"]] = run_uid
        self._document(run_uid, "stream_resource", doc)

    def _measurements_of(self, run_uid: str | None, event: Mapping[str, Any]) -> list[tuple[int, dict[str, Any]]]:
        run = self._runs.get(run_uid or "")
        if run is None or not run.measurements:
            return []
        raw_data, raw_stamps = event.get("data"), event.get("timestamps")
        data: Mapping[str, Any] = raw_data if isinstance(raw_data, Mapping) else {}
        stamps: Mapping[str, Any] = raw_stamps if isinstance(raw_stamps, Mapping) else {}
        present = [k for k in run.measurements if k in data]
        if not present:
            return []
        if run.experiment_id is None:
            self._log(
                "measurement.rejected",
                f"run {run_uid}: event {event.get('uid')} has measurements but the run names no experiment",
                run,
                "warning",
                {"run_uid": run_uid, "event_uid": event.get("uid"), "keys": present},
            )
            return []
        rows = []
        for key in present:
            spec = run.measurements[key]
            # A measurement may name its own quality key (``None``: always ok), e.g. a value judged
            # by the phase identification of the same event; otherwise the run's key applies.
            quality_key = spec.get("quality_key", run.quality_key)
            quality = "ok"
            if isinstance(quality_key, str):
                flag = data.get(quality_key)
                quality = str(flag) if flag not in (None, "") else "ok"
            raw = data[key]
            value = _number(raw)
            if value is None:
                self._log(
                    "measurement.rejected",
                    f"run {run_uid}: {key}={raw!r} is not a finite number; not stored as a measurement",
                    run,
                    "warning",
                    {"run_uid": run_uid, "event_uid": event.get("uid"), "data_key": key, "value": repr(raw)[:200],
                     "property": spec.get("property")},
                )
                continue
            unc_key = spec.get("uncertainty_key")
            uncertainty = _number(data.get(unc_key)) if isinstance(unc_key, str) else None
            rows.append(
                (
                    run.experiment_id,
                    {
                        "property": spec.get("property") or key,
                        "value": value,
                        "unit": spec.get("unit"),
                        "uncertainty": uncertainty,
                        "instrument": run.instrument,
                        "quality": quality,
                        "run_uid": run_uid,
                        "event_uid": event.get("uid") if isinstance(event.get("uid"), str) else None,
                        "timestamp": _epoch(stamps.get(key)) or _epoch(event.get("time")),
                    },
                )
            )
        return rows

    def _on_event(self, doc: dict[str, Any]) -> None:
        run_uid = self._run_of("event", doc)
        rows = self._measurements_of(run_uid, doc)
        self._document(run_uid, "event", doc, rows)
        if rows:  # a measurement is committed as soon as it exists (with what was queued before it)
            self._flush("")

    def _on_event_page(self, doc: dict[str, Any]) -> None:
        from event_model import unpack_event_page

        run_uid = self._run_of("event_page", doc)
        rows: list[tuple[int, dict[str, Any]]] = []
        for event in unpack_event_page(doc):  # type: ignore[arg-type] # a validated event_page document
            rows.extend(self._measurements_of(run_uid, event))
        # A page is a bulk stream's unit: the document and all its measurements in one transaction.
        self._write("event_page", doc, lambda: self.store.record_event_page(run_uid, doc, measurements=rows))
        if rows:
            self._flush("")

    def _on_stop(self, doc: dict[str, Any]) -> None:
        run_uid = self._run_of("stop", doc)
        run = self._runs.get(run_uid or "")
        if run_uid is None or run is None:
            self._flush("")
            self.store.record_document(None, "stop", doc)
            raise RepositoryError(f"stop document {doc.get('uid')} names unknown run {doc.get('run_start')!r}")
        exit_status = str(doc.get("exit_status") or "unknown")
        reason = doc.get("reason") if isinstance(doc.get("reason"), str) else None
        stop_time = _epoch(doc.get("time"))

        def write() -> None:
            self.store.record_run_stop(run_uid, exit_status=exit_status, reason=reason, stop_time=stop_time,
                                       campaign_id=run.campaign_id)
            if exit_status != "success":
                why = f"run exit status {exit_status}: {reason or ''}".strip()
                self.store.invalidate_run_measurements(run_uid, reason=why)

        self._document(run_uid, "stop", doc)
        self._write("stop", doc, write)
        self._runs.pop(run_uid, None)
        self._descriptors = {d: r for d, r in self._descriptors.items() if r != run_uid}
        self._resources = {d: r for d, r in self._resources.items() if r != run_uid}
