"""Two OS processes writing experiments of different campaigns into one database at once lose nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from sdl.repository import Store

N_EXPERIMENTS = 40
N_SHARED_MATERIALS = 8

WORKER = r"""
import json, sys, time
from pathlib import Path
from sdl.repository import Store

url, name, go, n, n_mat = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print("ready", flush=True)
while not go.exists():
    time.sleep(0.005)
store = Store.from_url(url, create=True)          # both processes migrate the empty database at once
c = store.get_or_create_campaign(name, snapshot={"objective": {"property": "y", "goal": "maximize"}},
                                 config_hash="h", seed=1, budget=n)
out = {"campaign_id": c.id, "experiments": [], "measurements": [], "materials": []}
for i in range(n):
    mid = store.upsert_material(f"shared-{i % n_mat}", formula="X")  # both processes hit the same keys
    eid = store.propose_experiment(c.id, idempotency_key=f"{name}:{i}", candidate_key=f"cand-{i}",
                                   params={"i": i}, material_id=mid, provenance={"batch_id": f"b{i // 4}"})
    assert store.propose_experiment(c.id, idempotency_key=f"{name}:{i}", candidate_key=f"cand-{i}",
                                    params={"i": i}, provenance={}) == eid
    store.start_experiment(eid, instruments=[f"robot-{name}"])
    out["measurements"].append(store.add_measurement(eid, property="y", value=i + 0.5))
    store.complete_experiment(eid)
    out["experiments"].append(eid)
    out["materials"].append(mid)
store.close()
print(json.dumps(out), flush=True)
"""


def _run_two_writers(url: str, tmp_path: Path) -> list[dict]:
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, url, name, str(go), str(N_EXPERIMENTS), str(N_SHARED_MATERIALS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name in ("alpha", "beta")
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()  # both start writing at the same moment
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def _check(url: str, results: list[dict]) -> None:
    store = Store.from_url(url)
    try:
        all_ids: list[int] = []
        for name, res in zip(("alpha", "beta"), results, strict=True):
            c = store.get_campaign(name)
            assert c is not None and c.id == res["campaign_id"]
            exps = store.experiments(c.id)
            assert [e.id for e in exps] == res["experiments"]
            assert [e.candidate_key for e in exps] == [f"cand-{i}" for i in range(N_EXPERIMENTS)]
            assert all(e.state == "completed" for e in exps)
            meas = store.measurements(campaign_id=c.id)
            assert [m.id for m in meas] == res["measurements"]
            assert [m.value for m in meas] == [i + 0.5 for i in range(N_EXPERIMENTS)]
            assert [e.material_id for e in exps] == res["materials"]
            kinds = [e.kind for e in store.events(c.id)]
            assert kinds.count("experiment.proposed") == N_EXPERIMENTS
            assert kinds.count("experiment.completed") == N_EXPERIMENTS
            assert kinds.count("campaign.created") == 1
            summary = next(s for s in store.campaign_summaries() if s["name"] == name)
            assert summary["counts"]["completed"] == N_EXPERIMENTS
            all_ids += res["experiments"]
        assert len(set(all_ids)) == 2 * N_EXPERIMENTS
        # the shared materials were created once each, and both processes got the same ids
        shared = {store.get_material(f"shared-{k}").id for k in range(N_SHARED_MATERIALS)}  # type: ignore[union-attr]
        assert set(results[0]["materials"]) == set(results[1]["materials"]) == shared
        assert len(store.measurements_of("y")) == 2 * N_EXPERIMENTS
    finally:
        store.close()


def test_two_processes_on_postgresql_lose_nothing(fresh_postgres_url: str, tmp_path: Path) -> None:
    _check(fresh_postgres_url, _run_two_writers(fresh_postgres_url, tmp_path))


def test_two_processes_on_sqlite_lose_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    _check(url, _run_two_writers(url, tmp_path))
