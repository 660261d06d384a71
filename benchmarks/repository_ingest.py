"""Write throughput of the knowledge repository on SQLite and PostgreSQL.

Prints experiments/s (a full life: propose → start → complete, three committed transactions with
their event rows), measurements/s (one committed transaction each, as the document writer does
for a plain ``add_measurement``) and event documents/s (one document plus two derived
measurements per transaction, as ``RepositoryWriter`` files an event).

Usage::

    python benchmarks/repository_ingest.py [--experiments 300] [--measurements 1000] [--postgres URL]

The PostgreSQL server URL defaults to ``$SDL_TEST_POSTGRES_URL`` or the CI server; a scratch
database is created there and dropped afterwards.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sdl.repository import Store


def bench(url: str, n_exp: int, n_meas: int) -> dict[str, float]:
    """Time the three write paths on one fresh database."""
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
    store.close()
    return {"experiments/s": n_exp / t_exp, "measurements/s": n_meas / t_meas, "event documents/s": n_meas / t_doc}


def main() -> None:
    """Run the benchmark on both backends and print one line per figure."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=300)
    parser.add_argument("--measurements", type=int, default=1000)
    parser.add_argument(
        "--postgres",
        default=os.environ.get("SDL_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
    )
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["sqlite"] = bench(f"sqlite:///{tmp}/bench.db", args.experiments, args.measurements)
    name = f"sdl_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(args.postgres).set(database=name).render_as_string(hide_password=False)
        results["postgresql"] = bench(url, args.experiments, args.measurements)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(f"repository ingest: {args.experiments} experiments, {args.measurements} measurements / event documents")
    for backend, figures in results.items():
        print(f"  {backend:10s} " + "  ".join(f"{v:8.1f} {k}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
