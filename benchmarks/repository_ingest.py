"""Write throughput of the knowledge repository on SQLite and PostgreSQL.

Figures, per backend:

* experiments/s: a full life (propose → start → complete), three committed transactions with
  their event rows; this path stays one transaction per state change on purpose.
* single measurements/s: one committed transaction each (``add_measurement``).
* event documents/s: one event document plus two derived measurements per transaction (what
  ``RepositoryWriter`` does for a plain ``event``).
* measurements/s (bulk): ``Store.add_measurements_bulk`` in batches of ``--batch`` rows, one
  transaction per batch (imports of earlier results, ``sdl import-results``).
* event page measurements/s: ``Store.record_event_page``, pages of ``--page`` events with two
  measurements each, one transaction per page (Bluesky bulk streams).
* told results/s: ``Store.record_hand_results_bulk`` (``sdl tell --csv``), one file of
  ``--tell`` results in one transaction (each result is two state changes and a measurement).
* legacy event page measurements/s, legacy told results/s: the same pages and file through the
  paths they took before the bulk ones (``record_document``, ``record_hand_results``).

Usage::

    python benchmarks/repository_ingest.py [--experiments 300] [--measurements 1000] [--bulk 20000]
        [--batch 1000] [--page 500] [--tell 1000] [--postgres URL] [--json FILE]

The PostgreSQL server URL defaults to ``$SDL_TEST_POSTGRES_URL`` or the CI server; a scratch
database is created there and dropped afterwards. ``--json`` writes ``sqlite_measurements_per_s``
and ``postgres_measurements_per_s`` (the bulk path) and every other figure under the same
``<backend>_<figure>`` names.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sdl.repository import HandResult, Store


def bench(url: str, args: argparse.Namespace) -> dict[str, float]:
    """Time every write path on one fresh database."""
    n_exp, n_meas = args.experiments, args.measurements
    store = Store.from_url(url, create=True)
    c = store.get_or_create_campaign("bench", snapshot={}, config_hash="h", seed=0, budget=n_exp)
    t0 = time.perf_counter()
    ids = []
    for i in range(n_exp):
        eid = store.propose_experiment(c.id, idempotency_key=f"b:{i}", candidate_key=f"k{i}", params={"i": i},
                                       provenance={"batch_id": "b", "predicted_mean": 0.1 * i})
        store.start_experiment(eid, instruments=["robot", "station"])
        store.complete_experiment(eid)
        ids.append(eid)
    t_exp = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(n_meas):
        store.add_measurement(ids[i % len(ids)], property="y", value=float(i), unit="eV", quality="ok")
    t_meas = time.perf_counter() - t0
    store.record_run_start("run-bench", experiment_id=ids[0], plan_name="count")
    t0 = time.perf_counter()
    for i in range(n_meas):
        doc = {"uid": f"ev-{i}", "time": 1.0 * i, "seq_num": i + 1, "data": {"y": float(i), "q": "ok"},
               "timestamps": {"y": 1.0 * i}, "descriptor": "d", "filled": {}}
        rows = [(ids[0], {"property": "y", "value": float(i), "run_uid": "run-bench", "event_uid": f"ev-{i}"}),
                (ids[0], {"property": "z", "value": -float(i), "run_uid": "run-bench", "event_uid": f"ev-{i}"})]
        store.record_document("run-bench", "event", doc, measurements=rows)
    t_doc = time.perf_counter() - t0

    # bulk: batches of rows, one transaction each
    t0 = time.perf_counter()
    done = 0
    while done < args.bulk:
        n = min(args.batch, args.bulk - done)
        store.add_measurements_bulk(
            [(ids[(done + j) % len(ids)], {"property": "imported", "value": 0.5 * (done + j), "unit": "eV",
                                          "uncertainty": 0.01, "instrument": "earlier-lab", "quality": "ok"})
             for j in range(n)],
            campaign_id=c.id, source="benchmark",
        )
        done += n
    t_bulk = time.perf_counter() - t0

    # event pages: the document plus 2 measurements per event, one transaction per page
    store.record_run_start("run-page", experiment_id=ids[1], plan_name="count")
    n_pages = max(1, args.bulk // (2 * args.page))
    t0 = time.perf_counter()
    for p in range(n_pages):
        uids = [f"pg-{p}-{j}" for j in range(args.page)]
        page = {"descriptor": "d2", "uid": uids, "time": [float(j) for j in range(args.page)],
                "seq_num": [p * args.page + j + 1 for j in range(args.page)],
                "data": {"y": [float(j) for j in range(args.page)], "z": [-float(j) for j in range(args.page)]},
                "timestamps": {"y": [float(j) for j in range(args.page)], "z": [float(j) for j in range(args.page)]},
                "filled": {}}
        rows = [(ids[1], {"property": prop, "value": float(j), "run_uid": "run-page", "event_uid": uid,
                          "quality": "ok"})
                for j, uid in enumerate(uids) for prop in ("y", "z")]
        store.record_event_page("run-page", page, measurements=rows)
    t_page = time.perf_counter() - t0
    # the same pages through the per-document path they took before (ORM objects, record_document)
    t0 = time.perf_counter()
    for p in range(n_pages):
        uids = [f"old-{p}-{j}" for j in range(args.page)]
        rows = [(ids[1], {"property": prop, "value": float(j), "run_uid": "run-page", "event_uid": uid,
                          "quality": "ok"})
                for j, uid in enumerate(uids) for prop in ("y", "z")]
        store.record_document("run-page", "event_page", {"descriptor": "d2", "uid": uids}, measurements=rows)
    t_page_legacy = time.perf_counter() - t0

    # sdl tell --csv: proposed experiments told in one file
    tell_ids = [store.propose_experiment(c.id, idempotency_key=f"t:{i}", candidate_key=f"t{i}", params={"t": i},
                                         provenance={"source": "hands"})
                for i in range(args.tell)]
    results = [HandResult(eid, value=0.25 * i, origin=f"bench.csv line {i + 2}") for i, eid in enumerate(tell_ids)]
    t0 = time.perf_counter()
    store.record_hand_results_bulk(c.id, results, by="bench", property="y", unit="eV")
    t_tell = time.perf_counter() - t0
    # the same file through the one-row-at-a-time path it took before
    tell_ids = [store.propose_experiment(c.id, idempotency_key=f"o:{i}", candidate_key=f"o{i}", params={"o": i},
                                         provenance={"source": "hands"})
                for i in range(args.tell)]
    results = [HandResult(eid, value=0.25 * i, origin=f"old.csv line {i + 2}") for i, eid in enumerate(tell_ids)]
    t0 = time.perf_counter()
    store.record_hand_results(c.id, results, by="bench", property="y", unit="eV")
    t_tell_legacy = time.perf_counter() - t0
    store.close()
    return {
        "experiments_per_s": n_exp / t_exp,
        "single_measurements_per_s": n_meas / t_meas,
        "event_documents_per_s": n_meas / t_doc,
        "measurements_per_s": args.bulk / t_bulk,
        "event_page_measurements_per_s": n_pages * args.page * 2 / t_page,
        "told_results_per_s": args.tell / t_tell,
        "legacy_event_page_measurements_per_s": n_pages * args.page * 2 / t_page_legacy,
        "legacy_told_results_per_s": args.tell / t_tell_legacy,
    }


def main() -> None:
    """Run the benchmark on both backends and print one line per figure (and ``--json``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--experiments", type=int, default=300)
    parser.add_argument("--measurements", type=int, default=1000, help="single measurements and event documents")
    parser.add_argument("--bulk", type=int, default=20000, help="measurements through the bulk path")
    parser.add_argument("--batch", type=int, default=1000, help="rows per bulk transaction")
    parser.add_argument("--page", type=int, default=500, help="events per event page")
    parser.add_argument("--tell", type=int, default=1000, help="results in the told file")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("SDL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = bench(f"sqlite:///{tmp}/bench.db", args)
    name = f"sdl_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        results["postgres"] = bench(url, args)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(f"repository ingest: {args.experiments} experiments, {args.measurements} single measurements / event "
          f"documents, {args.bulk} bulk measurements in batches of {args.batch}, pages of {args.page} events, "
          f"{args.tell} told results")
    for backend, figures in results.items():
        print(f"  {backend}")
        for k, v in figures.items():
            print(f"    {v:10.1f} {k.removesuffix('_per_s').replace('_', ' ')}/s")
    if args.json is not None:
        flat: dict[str, object] = {f"{backend}_{k}": round(v, 1) for backend, figures in results.items()
                                   for k, v in figures.items()}
        flat["postgres_slowdown_vs_sqlite"] = round(results["sqlite"]["measurements_per_s"]
                                                    / results["postgres"]["measurements_per_s"], 2)
        flat["parameters"] = vars(args) | {"postgres": "(server)", "json": str(args.json)}
        args.json.write_text(json.dumps(flat, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
