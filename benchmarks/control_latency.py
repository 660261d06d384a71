"""How long ``sdl pause`` and ``sdl cancel`` take to act on a running ``sdl run`` (ephemeral Prefect).

Runs a small campaign on simulators (3 s syntheses) in a subprocess, then from another process:
``sdl pause`` → the runner's ``campaign.paused`` event; ``sdl resume``; ``sdl cancel`` (which waits
until the runner released its lease) → the ``sdl run`` process exits. Prints the figures (``--json``
for a machine-readable line); nothing is asserted.

    python benchmarks/control_latency.py [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORLD = ROOT / "simulators" / "worlds" / "perovskites_demo.csv.gz"


def campaign_yaml(directory: Path, name: str) -> Path:
    sim = "{time_scale: 0.05}"
    text = f"""name: {name}
seed: 0
search_space:
  candidates: {{file: {WORLD}, id_column: id, structure_column: cif, formula_column: formula}}
objective: {{property: e_form, unit: eV, goal: minimize}}
model: {{name: random}}
acquisition: {{function: qucb, batch_size: 2}}
initial_design: {{strategy: random, size: 2}}
budget: {{experiments: 40}}
instruments:
  - {{name: robot, role: synthesis, simulated: true, world: {WORLD}, simulator: {sim}}}
  - {{name: station, role: characterization, simulated: true, world: {WORLD}, measures: [e_form], simulator: {sim}}}
"""
    path = directory / f"{name}.yaml"
    path.write_text(text)
    return path


def _wait(probe, what: str, timeout: float = 300.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def measure(directory: Path) -> dict[str, float]:
    from sdl.repository import Store

    name = "latency"
    yaml = campaign_yaml(directory, name)
    url = f"sqlite:///{directory / 'lab.db'}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(directory / "prefect")}
    env.pop("PREFECT_API_URL", None)
    sdl = [sys.executable, "-m", "sdl.cli.main"]
    proc = subprocess.Popen([*sdl, "run", str(yaml), "--db", url], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def running() -> bool:
        try:
            store = Store.from_url(url)
            campaign = store.get_campaign(name)
            ok = campaign is not None and any(e.state == "running" for e in store.experiments(campaign.id))
            store.close()
            return ok
        except Exception:  # noqa: BLE001 - the schema may not exist yet
            return False

    _wait(running, "a running experiment")
    store = Store.from_url(url)
    campaign = store.get_campaign(name)
    assert campaign is not None
    start = time.monotonic()
    subprocess.run([*sdl, "pause", name, "--db", url], env=env, check=True, capture_output=True)
    asked = time.monotonic()
    _wait(lambda: store.events(campaign.id, "campaign.paused"), "the pause")
    paused = time.monotonic()
    subprocess.run([*sdl, "resume", name, "--db", url], env=env, check=True, capture_output=True)
    _wait(running, "a running experiment after resume")
    cancel_start = time.monotonic()
    subprocess.run([*sdl, "cancel", name, "--db", url], env=env, check=True, capture_output=True)
    cancelled = time.monotonic()
    proc.wait(timeout=120)
    exited = time.monotonic()
    store.close()
    return {"pause_command_s": asked - start, "pause_acted_s": paused - asked,
            "cancel_command_s": cancelled - cancel_start, "cancel_to_exit_s": exited - cancel_start,
            "run_exit_code": float(proc.returncode)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="Print one JSON line per repeat.")
    args = parser.parse_args()
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="sdl-control-") as tmp:
            result = measure(Path(tmp))
        if args.json:
            print(json.dumps(result))
        else:
            for key, value in result.items():
                print(f"{key:20s} {value:8.2f}")


if __name__ == "__main__":
    main()
