"""Per-experiment overhead of the full stack, with zero-latency simulators, split by component.

What one experiment costs the software (not the chemistry): Prefect task runs, Bluesky plans on
Ophyd devices, serial round trips to the instruments, SQL writes to the repository. The simulators
run with a time scale of 1e-6, so a synthesis "takes" 60 µs and every millisecond measured is
overhead. Prints a table; nothing is asserted.

    python benchmarks/orchestration_overhead.py [--n 30] [--db sqlite:///PATH | postgresql+psycopg://...] [--json FILE]

Components (each measured on its own, then the whole loop):

* serial: one command / reply through pyserial to the simulator process (``JOB?``);
* sql: the experiment's state machine (propose, start, complete: three transactions with events);
* bluesky: the synthesize and characterize plans on the real devices (their serial polling
  included), first without a subscriber, then with the ``RepositoryWriter`` (documents + measurements);
* prefect: a no-op task run inside a flow run (sequential), against a plain call;
* full loop: ``run_plain`` (threads, no Prefect) and the Prefect flow, per experiment, from the
  first proposal to the last completion (set-up excluded); beside it the process's CPU time per
  experiment between the first and the last completion (what the loop costs whatever the load of
  the machine: on a shared box the wall time also holds the waits for a core), and the CPU of the
  ephemeral Prefect server process (``prefect_server_cpu_ms_per_experiment``, from the first
  completion to the flow run's end), which the process's CPU does not hold.

``--json FILE`` writes every figure (ms) with the machine's load average, for the README and
``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORLD = ROOT / "simulators" / "worlds" / "perovskites_demo.csv.gz"


def campaign_yaml(directory: Path, name: str, budget: int) -> Path:
    sim = "{time_scale: 0.000001}"
    text = f"""name: {name}
seed: 0
search_space:
  candidates: {{file: {WORLD}, id_column: id, structure_column: cif, formula_column: formula}}
objective: {{property: e_form, unit: eV, goal: minimize}}
model: {{name: random}}
acquisition: {{function: qucb, batch_size: 1}}
initial_design: {{strategy: random, size: 1}}
budget: {{experiments: {budget}}}
retrain: {{every: 1000}}
instruments:
  - {{name: robot, role: synthesis, simulated: true, world: {WORLD}, simulator: {sim}}}
  - {{name: station, role: characterization, simulated: true, world: {WORLD}, measures: [e_form], simulator: {sim}}}
"""
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def per_ms(samples: list[float]) -> str:
    return f"{1000 * statistics.median(samples):8.2f} ms (median of {len(samples)})"


def span_per_experiment(store, campaign_id: int) -> float:
    events = store.events(campaign_id)
    first = min(e.ts for e in events if e.kind == "experiment.proposed")
    last = max(e.ts for e in events if e.kind == "experiment.completed")
    n = sum(1 for e in events if e.kind == "experiment.completed")
    return (last - first).total_seconds() / max(n, 1)


def children_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of this process's descendants, by kind (Linux ``/proc``; else empty).

    ``prefect``: the ephemeral Prefect server (uvicorn) that records task runs, logs and events;
    ``simulators``: the instrument simulators (gone, with their CPU, once their lab closes). Their
    work is not in the process's CPU time.
    """
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[str, float] = {}
    todo, seen = [os.getpid()], set()
    while todo:
        pid = todo.pop()
        try:
            kids = [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
                    for c in (t / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            if kid in seen:
                continue
            seen.add(kid)
            todo.append(kid)
            try:
                stat = Path(f"/proc/{kid}/stat").read_text().rsplit(")", 1)[1].split()
                cmd = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            kind = "prefect" if ("prefect" in cmd or "uvicorn" in cmd) else "simulators"
            out[kind] = out.get(kind, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return out


class CpuClock:
    """Process CPU time at each finished experiment (a progress callback of both loops).

    Also the descendants' CPU (:func:`children_cpu_s`) at the first finished experiment and at the
    last call of :meth:`stop`, so the Prefect server's share of the software can be shown too.
    """

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.children: list[dict[str, float]] = []

    def __call__(self, _: object) -> None:
        self.marks.append(time.process_time())
        if len(self.marks) == 1:
            self.children = [children_cpu_s()]

    def stop(self) -> None:
        self.children = [*self.children[:1], children_cpu_s()]

    def per_experiment_ms(self) -> float | None:
        if len(self.marks) < 2:
            return None
        return 1000 * (self.marks[-1] - self.marks[0]) / (len(self.marks) - 1)

    def children_per_experiment_ms(self, kind: str) -> float | None:
        if len(self.marks) < 2 or len(self.children) < 2:
            return None
        first, last = self.children
        return 1000 * (last.get(kind, 0.0) - first.get(kind, 0.0)) / (len(self.marks) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=30, help="experiments per measurement")
    parser.add_argument("--db", default=None, help="repository URL (default: a fresh SQLite file)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures (ms) to this file")
    args = parser.parse_args()
    figures: dict[str, object] = {"n": args.n, "load_average_at_start": list(os.getloadavg())}
    work = Path(tempfile.mkdtemp(prefix="sdl-overhead-"))
    os.environ.setdefault("SDL_STATE_DIR", str(work / "state"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from sdl.prefect_server import prepare_client_environment

    prepare_client_environment(work)
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    db = args.db or f"sqlite:///{work / 'overhead.db'}"

    from devices.plans import characterize, synthesize
    from sdl.config import load_campaign
    from sdl.lab import open_lab, run_plain
    from sdl.lab.documents import RepositoryWriter
    from sdl.lab.runner import run_plan

    rows: list[tuple[str, str]] = []
    n = args.n

    # -- components, on one lab (simulators, devices, repository) ------------------------------------
    cfg = load_campaign(campaign_yaml(work, "overhead-parts", 10 * n))
    with open_lab(cfg, db) as lab:
        robot, station = lab.pool.devices["robot"], lab.pool.devices["station"]
        samples = []
        for _ in range(10 * n):
            t = time.perf_counter()
            robot.transport.command("STATUS?")
            samples.append(time.perf_counter() - t)
        rows.append(("serial round trip (STATUS?)", per_ms(samples)))
        figures["serial_round_trip_ms"] = 1000 * statistics.median(samples)

        store, cid = lab.store, lab.campaign_id
        keys = lab.engine.pool.keys
        samples = []
        for i in range(n):
            t = time.perf_counter()
            eid = store.propose_experiment(cid, idempotency_key=f"bench:{i}", candidate_key=keys[i], params={})
            store.start_experiment(eid, instruments=["robot"])
            store.complete_experiment(eid)
            samples.append(time.perf_counter() - t)
        rows.append(("sql: propose + start + complete (3 tx)", per_ms(samples)))
        figures["sql_state_changes_ms"] = 1000 * statistics.median(samples)

        writer = RepositoryWriter(store)
        eids = [store.propose_experiment(cid, idempotency_key=f"bench-plan:{i}", candidate_key=keys[n + i], params={})
                for i in range(2 * n)]
        for label, subscribers, offset in (("no subscriber", [], 0), ("RepositoryWriter", [writer], n)):
            synth, char = [], []
            for i in range(n):
                recipe = {"job_id": f"bench-{label[:2]}-{i}", "candidate": keys[n + offset + i]}
                md = {"sdl": {"campaign_id": cid, "experiment_id": eids[offset + i]}}
                t = time.perf_counter()
                assert run_plan(synthesize(robot, recipe, md=md), subscribers=subscribers, key="robot").ok
                synth.append(time.perf_counter() - t)
                t = time.perf_counter()
                outcome = run_plan(characterize(station, {**recipe, "measure_job_id": recipe["job_id"] + ".m"}, md=md),
                                   subscribers=subscribers, key="station")
                assert outcome.ok, outcome.exception
                char.append(time.perf_counter() - t)
            rows.append((f"bluesky synthesize plan ({label})", per_ms(synth)))
            rows.append((f"bluesky characterize plan ({label})", per_ms(char)))
            slug = "writer" if subscribers else "bare"
            figures[f"synthesize_plan_{slug}_ms"] = 1000 * statistics.median(synth)
            figures[f"characterize_plan_{slug}_ms"] = 1000 * statistics.median(char)

    # -- the whole loop without Prefect: before Prefect's first run, whose client threads (log and
    # event workers) then stay in the process and share its interpreter lock with any later loop
    cfg = load_campaign(campaign_yaml(work, "overhead-plain", n))
    clock = CpuClock()
    with open_lab(cfg, db) as lab:
        run_plain(lab, on_outcome=clock)
        plain = 1000 * span_per_experiment(lab.store, lab.campaign_id)
    figures["plain_loop_ms_per_experiment"] = plain
    figures["plain_loop_cpu_ms_per_experiment"] = clock.per_experiment_ms()
    rows.append(("full loop without Prefect (run_plain)",
                 f"{plain:8.2f} ms per experiment (CPU {clock.per_experiment_ms() or 0:.2f} ms)"))

    # -- prefect task overhead -------------------------------------------------------------------------
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    @task(cache_policy=NO_CACHE, persist_result=False)
    def noop(i: int) -> int:
        return i

    @flow(persist_result=False)
    def many(k: int) -> list[float]:
        out = []
        for i in range(k):
            t = time.perf_counter()
            noop(i)
            out.append(time.perf_counter() - t)
        return out

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        many(2)  # starts the ephemeral server
        samples = many(5 * n)
    rows.append(("prefect: one no-op task run in a flow", per_ms(samples)))
    figures["prefect_noop_task_ms"] = 1000 * statistics.median(samples)

    # -- the whole loop in the Prefect flow -----------------------------------------------------------
    from sdl.flows import run_campaign
    from sdl.repository import Store

    path = campaign_yaml(work, "overhead-flow", n)
    clock = CpuClock()
    summary = run_campaign(path, db_url=db, on_progress=clock)
    clock.stop()  # after the flow run's end: the server's share includes the campaign's final report
    store = Store.from_url(db)
    flow = 1000 * span_per_experiment(store, summary["campaign_id"])
    store.close()
    figures["prefect_loop_ms_per_experiment"] = flow
    figures["prefect_loop_cpu_ms_per_experiment"] = clock.per_experiment_ms()
    figures["prefect_server_cpu_ms_per_experiment"] = clock.children_per_experiment_ms("prefect")
    rows.append(("full loop in the Prefect flow",
                 f"{flow:8.2f} ms per experiment (CPU {clock.per_experiment_ms() or 0:.2f} ms, "
                 f"Prefect server {clock.children_per_experiment_ms('prefect') or 0:.2f} ms)"))
    figures["load_average_at_end"] = list(os.getloadavg())

    width = max(len(r[0]) for r in rows)
    print(f"\nOrchestration overhead per experiment (zero-latency simulators, n={n}, {db.split(':')[0]})")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    print(f"  load average (1, 5, 15 min) at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
