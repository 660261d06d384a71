"""The engine's guarantees on real data: crossed-barrel designs and cubic perovskites.

``BootstrapRidgeEnsemble`` is a small real model (bootstrap ridge regressions on composition
descriptors) with the GNN ensemble's interface, so the pool-ensemble path is tested in seconds;
one test runs the real ``sdl.engine.models.ensemble.GNNEnsemble`` with tiny settings.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from sdl.engine import Engine, Observation, Proposal
from sdl.engine.models.composition import composition_features
from sdl.engine.space import CandidatePool, ParameterSpace
from sdl.exceptions import EngineError

WORLDS = Path(__file__).resolve().parent.parent / "simulators" / "worlds"
BARREL_COLUMNS = ["n", "theta", "r", "t"]


class BootstrapRidgeEnsemble:
    """M ridge regressions on bootstrap resamples, over composition descriptors of structures."""

    def __init__(self, options: Any, seed: int) -> None:
        self.members = int((options or {}).get("members", 4))
        self.seed = seed
        self.coefs: list[np.ndarray] = []

    def _Z(self, structures: list[Any]) -> np.ndarray:
        F = composition_features([s.composition.formula for s in structures])
        return np.hstack([F / 100.0, np.ones((F.shape[0], 1))])

    def fit(self, structures: list[Any], y: Any, keys: list[str] | None = None) -> None:
        Z, y = self._Z(structures), np.asarray(y, dtype=np.float64)
        rng = np.random.default_rng(self.seed)
        self.coefs = []
        for _ in range(self.members):
            b = rng.integers(0, len(y), len(y))
            self.coefs.append(np.linalg.solve(Z[b].T @ Z[b] + 0.1 * np.eye(Z.shape[1]), Z[b].T @ y[b]))

    def predict_members(
        self, structures: list[Any], keys: list[str] | None = None, batch_size: int = 1024
    ) -> torch.Tensor:
        Z = self._Z(structures)
        return torch.as_tensor(np.stack([Z @ c for c in self.coefs]))


@pytest.fixture(scope="module")
def barrel() -> CandidatePool:
    return CandidatePool.from_csv(WORLDS / "crossed_barrel.csv", id_column=None, parameter_columns=BARREL_COLUMNS)


@pytest.fixture(scope="module")
def perov() -> CandidatePool:
    frame = pd.read_csv(WORLDS / "perovskites_2k.csv.gz").iloc[:300]
    return CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula",
                                    source="perovskites_2k[:300]")


def engine(pool: CandidatePool | None = None, model: str = "gp", acq: str = "qlognei", seed: int = 0,
           size: int = 6, goal: str = "maximize", target: tuple[float, float] | None = None,
           space: ParameterSpace | None = None, **kw: Any) -> Engine:
    options: dict[str, Any] = {"members": 4}
    if "ensemble_factory" in kw:  # a stand-in for the graph network trained from scratch
        options["backbone"] = "scratch"
    return Engine(
        objective=NS(goal=goal, target_range=target, property="y", unit=None),
        model=NS(name=model, options=options), acquisition=NS(function=acq, batch_size=3, beta=2.0),
        seed=seed, pool=pool, space=space, initial_design=NS(strategy="random", size=size), **kw,
    )


def run(eng: Engine, truth: dict[str, float], rounds: int, q: int, pending_every: int = 0) -> list[list[Proposal]]:
    """Rounds of propose/observe; every ``pending_every``-th round leaves one proposal pending."""
    batches, pending = [], []
    for r in range(rounds):
        batch = eng.propose(q, pending=pending)
        batches.append(batch)
        keep = batch[:1] if pending_every and r % pending_every == 0 else []
        pending += [p.key for p in keep]
        eng.observe([Observation(p.key, p.params, truth[p.key]) for p in batch if p not in keep])
    return batches


@pytest.mark.parametrize("acq", ["qlognei", "qucb", "thompson"])
def test_gp_pool_never_repeats_and_only_proposes_table_rows(barrel: CandidatePool, acq: str) -> None:
    truth = dict(zip(barrel.keys, barrel.values("toughness"), strict=True))
    eng = engine(barrel, "gp", acq)
    seen: set[str] = set()
    for batch in run(eng, truth, rounds=4, q=3, pending_every=2):
        keys = [p.key for p in batch]
        assert len(keys) == len(set(keys)) == 3
        assert not seen & set(keys)
        seen |= set(keys)
        for p in batch:
            assert p.key in barrel and barrel.key_for_params(p.params) == p.key  # a row of the table
    assert batch[0].strategy == "gp" and batch[0].predicted_std is not None and batch[0].predicted_std > 0
    assert batch[0].model_version == eng.model_version and eng.model_version.startswith("gp-")


def test_pool_exhaustion_returns_fewer_then_raises(barrel: CandidatePool) -> None:
    rows = sorted(r for group in barrel.replicates[:10] for r in group)
    small = CandidatePool.from_frame(barrel.source_frame.iloc[rows], id_column=None, parameter_columns=BARREL_COLUMNS)
    assert len(small) == 10
    truth = dict(zip(small.keys, small.values("toughness"), strict=True))
    eng = engine(small, "gp", "qucb", size=4)
    b1 = eng.propose(4)
    eng.observe([Observation(p.key, p.params, truth[p.key]) for p in b1])
    b2 = eng.propose(8, pending=[b1[0].key, "n=12;theta=200;r=2.5;t=1.4"])
    assert len(b2) == 6 and not {p.key for p in b2} & {p.key for p in b1}
    with pytest.raises(EngineError, match="pool exhausted"):
        eng.propose(1, pending=[p.key for p in b2])


def test_proposals_are_reproducible_and_designs_shared(barrel: CandidatePool) -> None:
    truth = dict(zip(barrel.keys, barrel.values("toughness"), strict=True))
    keys = lambda bs: [[p.key for p in b] for b in bs]  # noqa: E731
    a = run(engine(barrel, "gp", "qlogei", seed=1), truth, rounds=4, q=3)
    b = run(engine(barrel, "gp", "qlogei", seed=1), truth, rounds=4, q=3)
    assert keys(a) == keys(b) and [x.batch_id for x in a[-1]] == [x.batch_id for x in b[-1]]
    c = run(engine(barrel, "random", seed=1), truth, rounds=4, q=3)
    assert keys(c)[:2] == keys(a)[:2]  # same initial design (6 points) whatever the strategy
    assert keys(c)[2:] != keys(a)[2:]
    assert a[0][0].strategy == "initial-design" and a[2][0].strategy == "gp" and c[2][0].strategy == "random"
    d = run(engine(barrel, "gp", "qlogei", seed=2), truth, rounds=1, q=3)
    assert keys(d)[0] != keys(a)[0]


def test_ensemble_pool_mode_with_pending_and_target(perov: CandidatePool) -> None:
    truth = dict(zip(perov.keys, perov.values("gap_gllbsc"), strict=True))
    for acq in ["qucb", "qlognei", "max-variance", "thompson"]:
        # Design of 8 with one of each batch left pending: two full design batches (4 + 4), then the model.
        eng = engine(perov, "gnn-ensemble", acq, goal="target", target=(1.1, 1.7), size=8,
                     ensemble_factory=BootstrapRidgeEnsemble)
        seen: set[str] = set()
        for batch in run(eng, truth, rounds=4, q=4, pending_every=1):
            keys = {p.key for p in batch}
            assert len(keys) == 4 and not keys & seen
            seen |= keys
        assert batch[0].strategy == "gnn-ensemble" and batch[0].predicted_std is not None
        again = run(engine(perov, "gnn-ensemble", acq, goal="target", target=(1.1, 1.7), size=8,
                           ensemble_factory=BootstrapRidgeEnsemble), truth, rounds=4, q=4, pending_every=1)
        assert [p.key for p in again[-1]] == [p.key for p in batch]


def test_target_range_campaign_finds_in_range_materials(perov: CandidatePool) -> None:
    gaps = perov.values("gap_gllbsc")
    truth = dict(zip(perov.keys, gaps, strict=True))
    in_range = lambda k: 1.1 <= truth[k] <= 1.7  # noqa: E731
    base_rate = float(np.mean([in_range(k) for k in perov.keys]))
    eng = engine(perov, "gp", "qlogei", goal="target", target=(1.1, 1.7), size=10)
    batches = run(eng, truth, rounds=10, q=4)
    model_picks = [p.key for b in batches[3:] for p in b]
    hit_rate = float(np.mean([in_range(k) for k in model_picks]))
    assert hit_rate > 1.5 * base_rate, (hit_rate, base_rate)
    assert 1.1 <= eng.best_value() <= 1.7


def test_composition_gp_uncertainty_metrics(perov: CandidatePool) -> None:
    truth = dict(zip(perov.keys, perov.values("e_form"), strict=True))
    eng = engine(perov, "gp", "qucb", size=20)
    run(eng, truth, rounds=3, q=10)
    assert eng.uncertainty_metrics()["n_train"] == 20  # the model that made the last proposals
    eng.fit()
    m = eng.uncertainty_metrics()
    assert m["n"] == 30 and m["n_train"] == 30 and m["held_out"] == "leave-one-out" and m["strategy"] == "gp"
    for name in ("mae", "rmse", "spearman_abs_error_std", "miscalibration_area", "coverage_68", "coverage_95"):
        assert name in m
    assert m["mae"] < np.abs(np.array(list(truth.values())) - np.mean(list(truth.values()))).mean() * 1.5
    assert engine(perov, "random").uncertainty_metrics() == {}


def test_real_gnn_ensemble_integrates(perov: CandidatePool) -> None:
    truth = dict(zip(perov.keys, perov.values("e_form"), strict=True))
    eng = Engine(objective=NS(goal="minimize"), acquisition=NS(function="qucb", batch_size=2, beta=2.0),
                 model=NS(name="gnn-ensemble", options={"backbone": "scratch", "members": 2, "hidden": 16, "layers": 1,
                                                   "epochs": 3}),
                 seed=0, pool=perov, initial_design=NS(strategy="random", size=8))
    batches = run(eng, truth, rounds=5, q=2)
    keys = [p.key for b in batches for p in b]
    assert len(keys) == len(set(keys)) == 10
    assert batches[-1][0].strategy == "gnn-ensemble" and batches[-1][0].predicted_std is not None


def test_continuous_mixed_space_mode(barrel: CandidatePool) -> None:
    space = ParameterSpace([
        {"name": "n", "type": "categorical", "choices": [6, 8, 10, 12]},
        {"name": "theta", "type": "integer", "low": 0, "high": 200},
        {"name": "r", "type": "continuous", "low": 1.5, "high": 2.5},
        {"name": "t", "type": "continuous", "low": 0.7, "high": 1.4},
    ])
    # The world: the measured toughness of the nearest recorded design (real values, no model).
    Xt = barrel.space.encode(barrel.frame[BARREL_COLUMNS].to_dict("records"))
    yt = barrel.values("toughness")
    world = lambda p: float(yt[int(torch.cdist(barrel.space.encode([p]), Xt).argmin())])  # noqa: E731
    eng = engine(None, "gp", "qlogei", space=space, size=6)
    seen: set[str] = set()
    for _ in range(3):
        batch = eng.propose(3, pending=sorted(seen)[:1])
        for p in batch:
            assert p.key == space.key_of(p.params) and p.key not in seen
            assert p.params["n"] in (6, 8, 10, 12) and isinstance(p.params["theta"], int)
            seen.add(p.key)
        eng.observe([Observation(p.key, p.params, world(p.params)) for p in batch])
    assert batch[0].strategy == "gp"
    with pytest.raises(EngineError, match="needs a candidate pool"):
        engine(None, "gnn-ensemble", space=space)


def _designed(barrel: CandidatePool, acq: str) -> Engine:
    """A GP engine on the crossed-barrel table after its 6-point design was measured."""
    truth = dict(zip(barrel.keys, barrel.values("toughness"), strict=True))
    eng = engine(barrel, "gp", acq, size=6)
    for _ in range(2):
        eng.observe([Observation(p.key, p.params, truth[p.key]) for p in eng.propose(3)])
    return eng


def test_pool_scores_are_kept_per_model_version(barrel: CandidatePool) -> None:
    """A later proposal of the same model cuts its shortlist from kept scores: same as scoring afresh."""
    eng = _designed(barrel, "qucb")
    first = eng.propose(3)
    version = eng.surrogate.version
    avail = np.array([i for i, k in enumerate(barrel.keys) if k not in eng.measured_keys
                      and k not in {p.key for p in first}], dtype=np.int64)

    def score(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return -m + 2.0 * s

    kept = eng.surrogate.score_pool(avail, score, 50)
    eng.surrogate.forget_scores()
    fresh = eng.surrogate.score_pool(avail, score, 50)
    assert kept.shortlist.tolist() == fresh.shortlist.tolist() and len(kept.shortlist) == 50
    assert torch.equal(kept.mean, fresh.mean) and torch.equal(kept.std, fresh.std)
    eng.observe([Observation(first[0].key, first[0].params, 1.0)])
    eng.propose(3)  # a new measurement: a refit, and its own scores
    assert eng.surrogate.version != version and eng.surrogate._scored is not None
    assert eng.surrogate._scored[0][0] == eng.surrogate.version


@pytest.mark.parametrize("acq", ["qucb", "qlognei"])
def test_pending_points_change_the_acquisition_and_excluded_ones_do_not(
    barrel: CandidatePool, acq: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sdl.engine.acquisition

    built: list[tuple[Any, torch.Tensor, np.ndarray]] = []  # acquisition, its inputs, their pool rows
    passed: list[list[int]] = []  # the pending rows the engine hands the acquisition (BoTorch X_pending)
    real = sdl.engine.acquisition.pool_acquisition

    def spy(*args: Any, **kwargs: Any) -> Any:
        passed.append(list(kwargs.get("pending_rows", ())))
        acqf, choices = real(*args, **kwargs)
        built.append((acqf, choices, np.asarray(args[4])))
        return acqf, choices

    monkeypatch.setattr(sdl.engine.acquisition, "pool_acquisition", spy)
    eng = _designed(barrel, acq)
    free = eng.propose(3)
    others = [p.key for p in free]  # the three best candidates: strongly correlated with their neighbours
    as_pending = eng.propose(3, pending=others)
    as_excluded = eng.propose(3, exclude=others)
    rows = [i for i, k in enumerate(barrel.keys) if k not in eng.measured_keys and k not in others]
    with torch.no_grad():
        def values(acqf: Any, choices: torch.Tensor, short: np.ndarray) -> torch.Tensor:
            at = {int(r): j for j, r in enumerate(short)}
            X = choices[torch.as_tensor([at[r] for r in rows])]
            return torch.cat([acqf(part) for part in X.unsqueeze(-2).split(256)])

        v_free, v_pending, v_excluded = (values(*b) for b in built)
    # pending experiments are BoTorch X_pending (qLogNEI folds them into its baseline): every
    # remaining candidate is scored jointly with them
    assert passed[1] == sorted(barrel.index_of(k) for k in others)
    assert (v_pending - v_free).abs().max() > 1e-3 * v_free.abs().max()
    # excluded candidates only leave the pool: the others' acquisition values are unchanged (up to
    # float rounding: the GP's joint posterior is computed over a candidate set without them)
    assert passed[0] == [] and passed[2] == []
    torch.testing.assert_close(v_excluded, v_free, rtol=1e-9, atol=1e-12)
    assert as_excluded[0].acquisition_value == pytest.approx(float(v_free.max()))
    for batch in (as_pending, as_excluded):
        assert len(batch) == 3 and not {p.key for p in batch} & set(others)
    # the same state gives the same batch (ids included); exclusion is part of that state
    again = eng.propose(3, exclude=others)
    assert [(p.key, p.batch_id) for p in again] == [(p.key, p.batch_id) for p in as_excluded]


def test_excluded_candidates_are_never_proposed(barrel: CandidatePool) -> None:
    truth = dict(zip(barrel.keys, barrel.values("toughness"), strict=True))
    eng = engine(barrel, "gp", "thompson", size=4)
    excluded: list[str] = []
    proposed: set[str] = set()
    for _ in range(5):  # the first proposal of each batch fails and is excluded from then on
        batch = eng.propose(3, exclude=excluded)
        keys = {p.key for p in batch}
        assert not keys & set(excluded) and not keys & proposed
        proposed |= keys
        excluded.append(batch[0].key)
        eng.observe([Observation(p.key, p.params, truth[p.key]) for p in batch[1:]])
    assert batch[0].strategy == "gp"
    # recipes (mappings) and Proposals name excluded candidates too
    recipe = barrel.params(barrel.index_of(eng.propose(1)[0].key))
    assert eng.propose(1, exclude=[recipe])[0].key != barrel.key_for_params(recipe)
    # parameter-space mode: an excluded recipe is never proposed again, in the design or after it
    space = ParameterSpace([{"name": "n", "type": "integer", "low": 1, "high": 6},
                            {"name": "t", "type": "categorical", "choices": ["a", "b"]}])
    eng = engine(None, "gp", "qucb", space=space, size=4)
    first = eng.propose(2)
    assert first[0].key not in {p.key for p in eng.propose(2, exclude=[first[0]])}
    gone = [first[0].key]
    for _ in range(4):
        batch = eng.propose(2, exclude=gone)
        assert not {p.key for p in batch} & set(gone)
        gone.append(batch[0].key)
        eng.observe([Observation(p.key, p.params, float(p.params["n"]) + (p.params["t"] == "b"))
                     for p in batch[1:]])
    assert batch[0].strategy == "gp"
    with pytest.raises(EngineError, match="pool exhausted"):
        eng.propose(1, exclude=[f"n={n};t={t}" for n in range(1, 7) for t in "ab"])


def test_initial_design_runs_exactly_its_size_with_experiments_in_flight(barrel: CandidatePool) -> None:
    truth = dict(zip(barrel.keys, barrel.values("toughness"), strict=True))
    eng = engine(barrel, "gp", "qucb", size=8)
    running: list[str] = []
    sizes = []
    for _ in range(3):  # nothing measured yet: 8 design experiments in flight, then the design is over
        batch = eng.propose(3, pending=running)
        assert {p.strategy for p in batch} == {"initial-design"}
        sizes.append(len(batch))
        running += [p.key for p in batch]
    assert sizes == [3, 3, 2]  # the batch that straddles the boundary returns only what the design still owes
    failed, done = running[:1], running[1:]
    eng.observe([Observation(k, {}, truth[k]) for k in done])
    batch = eng.propose(3, exclude=failed)  # a failed design experiment still counts: 7 measured + 1 failed
    assert len(batch) == 3 and {p.strategy for p in batch} == {"gp"} and not {p.key for p in batch} & set(running)
    # the same without experiments in flight: measured ones count, straddling batches stop at the size
    eng = engine(barrel, "gp", "qucb", size=8)
    sizes = []
    for _ in range(4):
        batch = eng.propose(3)
        sizes.append((len(batch), batch[0].strategy))
        eng.observe([Observation(p.key, p.params, truth[p.key]) for p in batch])
    assert sizes == [(3, "initial-design"), (3, "initial-design"), (2, "initial-design"), (3, "gp")]
    # space mode follows the same rule
    space = ParameterSpace([{"name": "x", "type": "continuous", "low": 0.0, "high": 1.0}])
    eng = engine(None, "gp", "qucb", space=space, size=4)
    first = eng.propose(3)
    second = eng.propose(3, pending=first)
    assert len(first) == 3 and len(second) == 1 and second[0].strategy == "initial-design"


def test_design_goes_on_until_the_model_has_enough_measurements(barrel: CandidatePool) -> None:
    truth = dict(zip(barrel.keys, barrel.values("toughness"), strict=True))
    for model, need in [("gp", 2), ("random", 1)]:
        eng = engine(barrel, model, "qucb", size=2)
        failed = [p.key for p in eng.propose(2)]  # the whole design fails: nothing to fit on
        extra = eng.propose(3, exclude=failed)
        assert len(extra) == 3 and {p.strategy for p in extra} == {"initial-design"}
        eng.observe([Observation(p.key, p.params, truth[p.key]) for p in extra[:need - 1]])
        assert eng.propose(2, exclude=failed)[0].strategy == "initial-design"  # still one short
        eng.observe([Observation(extra[need - 1].key, {}, truth[extra[need - 1].key])])
        assert eng.propose(2, exclude=failed)[0].strategy == model


def test_surrogate_and_selection_objects_compose_like_their_config(barrel: CandidatePool) -> None:
    from sdl.engine import AcquisitionSelection, RandomSelection, ThompsonSelection, build_selection
    from sdl.engine.models.surrogate import GPSurrogate, RandomSurrogate

    truth = dict(zip(barrel.keys, barrel.values("toughness"), strict=True))
    by_config = engine(barrel, "gp", "qucb")
    by_objects = Engine(objective=NS(goal="maximize"), model=GPSurrogate(pool=barrel, seed=0),
                        acquisition=AcquisitionSelection("qucb", beta=2.0), seed=0, pool=barrel,
                        initial_design=NS(strategy="random", size=6))
    assert by_objects.strategy == "gp" and by_objects.acquisition_name == "qucb"
    a, b = run(by_config, truth, rounds=3, q=3), run(by_objects, truth, rounds=3, q=3)
    assert [[(p.key, p.acquisition_value, p.model_version, p.batch_id) for p in x] for x in a] == \
        [[(p.key, p.acquisition_value, p.model_version, p.batch_id) for p in x] for x in b]
    # the rule is chosen once from the names; the random baseline picks uniformly whatever is asked
    assert isinstance(build_selection(NS(function="thompson"), GPSurrogate(pool=barrel), 0), ThompsonSelection)
    assert isinstance(build_selection(NS(function="qucb"), RandomSurrogate(pool=barrel), 0), RandomSelection)
    assert isinstance(engine(barrel, "random", "qlognei").selection, RandomSelection)


def test_bad_observations_and_config(barrel: CandidatePool) -> None:
    eng = engine(barrel, "gp")
    with pytest.raises(EngineError, match="unknown candidate key"):
        eng.observe([Observation("nope", {}, 1.0)])
    with pytest.raises(EngineError, match="must be finite"):
        eng.observe([Observation(barrel.keys[0], {}, float("nan"))])
    eng.observe([Observation("whatever", {"n": 6, "theta": 0, "r": 1.5, "t": 0.7}, 1.0)])  # matched by recipe
    assert eng.measured_keys == {barrel.keys[0]}
    with pytest.raises(EngineError, match="unknown strategy"):
        engine(barrel, "svm")
    with pytest.raises(EngineError, match=r"acquisition\.function"):
        engine(barrel, "gp", "ei")


def test_from_campaign(tmp_path: Path) -> None:
    cfg = NS(
        seed=3, objective=NS(property="toughness", unit="J", goal="maximize", target_range=None),
        model=NS(name="random", options={}), acquisition=NS(function="qucb", batch_size=2, beta=2.0),
        initial_design=NS(strategy="random", size=2), retrain=NS(every=1),
        search_space=NS(parameters=None, candidates=NS(
            file=WORLDS / "crossed_barrel.csv", id_column=None, structure_column=None, structure_format="cif",
            parameter_columns=BARREL_COLUMNS, formula_column=None)),
    )
    eng = Engine.from_campaign(cfg)
    assert eng.pool is not None and len(eng.pool) == 600 and eng.seed == 3
    assert len(eng.propose()) == 2


def test_from_shipped_campaign_yaml() -> None:
    from sdl.config import load_campaign

    cfg = load_campaign(Path(__file__).resolve().parent.parent / "campaigns" / "demo.yaml")
    eng = Engine.from_campaign(cfg)
    assert eng.strategy == cfg.model.name and eng.pool is not None
    batch = eng.propose()
    assert len(batch) == cfg.acquisition.batch_size and all(p.key in eng.pool for p in batch)
    assert [p.key for p in Engine.from_campaign(cfg).propose()] == [p.key for p in batch]
