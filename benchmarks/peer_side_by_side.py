"""The sdl engine as one more strategy of ``../shared/peers/peer_bench.py``: side by side with BayBE and Ax.

Why inside the peer harness and not ``sdl benchmark`` beside it: both follow Liang et al.'s protocol,
but they draw initial rows and replicates with different generators, so a 10-seed median of one
and of the other differ by seed luck as well as by method. Run in the harness, seed ``s`` gives the
engine exactly the initial rows and replicate values that it gives BayBE, Ax and random (common
random numbers), and the results file has the harness's format (``summarize.py`` reads it).

The strategy is the engine with its defaults (``model: gp``, ``acquisition: qlognei``), untuned; the
harness's shared initial rows are observed before the first proposal, so every proposal is the
model's.

    python benchmarks/peer_side_by_side.py --peers ../shared/peers --merge PEER_RESULTS.json \\
        -- --data ../shared/data/liang2021_bo_benchmark/Crossed_barrel_dataset.csv --target toughness \\
        --goal max --params n,theta,r,t --strategies sdl --seeds 10 --budget 110 --out OUT

``--merge`` adds the strategies of a peer results file (run with the same seeds, budget and
data) to OUT/results.json for the seeds both files hold, so one table shows them all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd


def load_peer_bench(peers: Path) -> ModuleType:
    """Import ``peer_bench.py`` from the peers folder (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("peer_bench", peers / "peer_bench.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"--peers: no peer_bench.py in {peers}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["peer_bench"] = mod  # spawn workers re-import it by name
    spec.loader.exec_module(mod)
    return mod


class SDLStrategy:
    """``ask``/``tell`` over :class:`sdl.engine.Engine` in pool mode, engine defaults."""

    name = "sdl"
    acquisition: str | None = None  # None: the engine default; --sdl-acquisition sets it for a variant run
    priors: str | None = None  # None: the engine default; --sdl-gp-priors sets it for a variant run

    def __init__(self, pool: Any, seed: int) -> None:
        from sdl import config as cfgmod
        from sdl.engine import Engine, Observation
        from sdl.engine.space import CandidatePool

        self._obs_cls = Observation
        self.pool = pool
        frame = pd.DataFrame(pool.X, columns=[f"x{j}" for j in range(pool.X.shape[1])])
        frame.insert(0, "id", [f"r{i}" for i in range(pool.N)])
        self._tmp = tempfile.TemporaryDirectory(prefix="sdl-peer-")
        path = Path(self._tmp.name) / "pool.csv"
        frame.to_csv(path, index=False)
        cpool = CandidatePool.from_csv(path, id_column="id", parameter_columns=list(frame.columns[1:]))
        goal = "maximize" if pool.goal == "max" else "minimize"
        self.engine = Engine(
            objective=cfgmod.ObjectiveSpec(property=pool.target, unit="", goal=goal),
            model=cfgmod.GPModel(name="gp") if self.priors is None
            else cfgmod.GPModel(name="gp", options=cfgmod.GPOptions(priors=self.priors)),  # type: ignore[arg-type]
            acquisition=cfgmod.Acquisition() if self.acquisition is None
            else cfgmod.Acquisition(function=self.acquisition),  # type: ignore[arg-type]
            seed=seed,
            pool=cpool,
            initial_design=cfgmod.InitialDesign(strategy="random", size=1),
        )

    def tell(self, idx: int, y: float) -> None:
        self.engine.observe([self._obs_cls(key=f"r{idx}", value=float(y))])

    def ask(self, measured: np.ndarray) -> int:
        (prop,) = self.engine.propose(q=1)
        i = int(prop.key[1:])
        if measured[i]:
            raise RuntimeError(f"sdl proposed the measured row {i}")
        return i


def merge(out: Path, other: Path) -> None:
    """Add ``other``'s strategies to ``out/results.json`` for the seeds both hold (same protocol)."""
    mine = json.loads((out / "results.json").read_text())
    theirs = json.loads(other.read_text())
    for k in ("pool_size", "top_size", "initial", "budget"):
        if mine[k] != theirs[k]:
            raise SystemExit(f"--merge {other}: {k} is {theirs[k]}, here {mine[k]}")
    seeds = [s for s in mine["seed_list"] if s in theirs["seed_list"]]
    pick = {id(mine): [mine["seed_list"].index(s) for s in seeds],
            id(theirs): [theirs["seed_list"].index(s) for s in seeds]}
    strategies: dict[str, Any] = {}
    for res in (theirs, mine):
        for name, acc in res["strategies"].items():
            strategies[name] = {k: [v[i] for i in pick[id(res)]] for k, v in acc.items()}
    mine.update(strategies=strategies, seed_list=seeds, seeds=len(seeds),
                versions={**theirs.get("versions", {}), **{f"sdl:{k}": v for k, v in mine["versions"].items()}},
                merged_from=str(other))
    (out / "results.json").write_text(json.dumps(mine))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", type=Path, default=Path("../shared/peers"), help="folder of peer_bench.py")
    ap.add_argument("--merge", type=Path, help="a peer results.json to add (same data, seeds, budget)")
    ap.add_argument("--merge-only", type=Path, metavar="OUT", help="only merge --merge into OUT/results.json")
    ap.add_argument("--sdl-acquisition", choices=("qlogei", "qlognei", "qucb", "thompson"),
                    help="a non-default acquisition for the engine (a variant run; default: the engine's)")
    ap.add_argument("--sdl-gp-priors", choices=("lognormal", "gamma"),
                    help="the engine GP's model.options.priors for a variant run (default: the engine's)")
    ap.add_argument("rest", nargs=argparse.REMAINDER, help="-- then peer_bench.py's arguments")
    a = ap.parse_args()
    if a.merge_only is not None:
        if a.merge is None:
            ap.error("--merge-only needs --merge")
        merge(a.merge_only, a.merge)
        return 0
    rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
    pb = load_peer_bench(a.peers)
    SDLStrategy.acquisition, SDLStrategy.priors = a.sdl_acquisition, a.sdl_gp_priors  # class level: --jobs 1 only
    pb.STRATEGIES["sdl"] = SDLStrategy
    rc = int(pb.main(rest) or 0)
    if rc == 0 and a.merge is not None:
        out = Path(rest[rest.index("--out") + 1])
        merge(out, a.merge)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
