"""Unknown constraints: the tolerance-factor robot, the feasibility classifier and the weighted acquisition.

Real components throughout: pymatgen's Shannon radii and oxidation-state guesses, a GPyTorch GP
classifier, BoTorch GPs and acquisitions, the real campaign flow with simulated instruments.
"""

from __future__ import annotations

import csv
import gzip
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "simulators" / "worlds" / "perovskites_demo.csv.gz"
BARREL = ROOT / "simulators" / "worlds" / "crossed_barrel.csv"


def _cubic(a: str, b: str, x: str = "O"):
    from pymatgen.core import Lattice, Structure

    return Structure(Lattice.cubic(4.0), [a, b, x, x, x],
                     [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])


def _demo_rows() -> list[dict[str, str]]:
    with gzip.open(DEMO, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


# -- the chemical rule ------------------------------------------------------------------------
def test_tolerance_factor_of_textbook_perovskites() -> None:
    from simulators.synthesis_rules import ToleranceFactorRule

    rule = ToleranceFactorRule()
    srtio3 = rule.judge(_cubic("Sr", "Ti"))
    assert srtio3.ok and srtio3.t == pytest.approx((1.44 + 1.40) / (math.sqrt(2) * (0.605 + 1.40)), abs=1e-3)
    assert rule.judge(_cubic("Ca", "Ti")).ok and rule.judge(_cubic("Ba", "Ti")).ok
    hexagonal = rule.judge(_cubic("Ba", "Ni"))  # Ni4+ is too small for the octahedra of Ba
    assert not hexagonal.ok and hexagonal.t is not None and hexagonal.t > 1.1
    assert "Goldschmidt tolerance factor" in (hexagonal.reason or "")
    ilmenite = rule.judge(_cubic("Ni", "Ti"))  # an A cation too small for the cage
    assert not ilmenite.ok and ilmenite.t is not None and ilmenite.t < 0.8
    # Sites come from the structure: the cation nearer to the anions is B, whatever the order.
    from pymatgen.core import Lattice, Structure

    swapped = Structure(Lattice.cubic(4.0), ["Ti", "Sr", "O", "O", "O"],
                        [[0.5, 0.5, 0.5], [0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    assert rule.judge(swapped).t == pytest.approx(srtio3.t)
    # No charge-balanced Li/Cd nitride exists: unjudged, and the option decides.
    assert ToleranceFactorRule(unjudged="succeed").judge(_cubic("Cd", "Li", "N")).ok
    assert not ToleranceFactorRule(unjudged="fail").judge(_cubic("Cd", "Li", "N")).ok
    with pytest.raises(ValueError, match="low < high"):
        ToleranceFactorRule(1.0, 0.9)


def test_rule_fails_a_substantial_share_of_the_shipped_cmr_world() -> None:
    from simulators.synthesis_rules import ToleranceFactorRule

    rule = ToleranceFactorRule(0.8, 1.07)
    rows = _demo_rows()
    failed = sum(not rule.judge_cif(r["cif"]).ok for r in rows)
    assert 0.25 <= failed / len(rows) <= 0.5, failed


# -- the classifier ---------------------------------------------------------------------------
def _barrel() -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Crossed-barrel designs (unit cube) and a printing rule: struts thinner than half their radius fail."""
    with open(BARREL, newline="") as handle:
        rows = {(float(r["n"]), float(r["theta"]), float(r["r"]), float(r["t"])): float(r["toughness"])
                for r in csv.DictReader(handle)}
    X = torch.tensor(sorted(rows), dtype=torch.float64)
    ok = (X[:, 3] / X[:, 2] >= 0.5).numpy()
    tough = np.array([rows[tuple(x)] for x in X.tolist()])
    Xu = (X - X.min(0).values) / (X.max(0).values - X.min(0).values)
    return Xu, ok, tough


def test_gp_classifier_learns_a_rule_on_a_real_table() -> None:
    from sdl.engine.feasibility import GPClassifier

    X, ok, _ = _barrel()
    perm = np.random.default_rng(0).permutation(len(ok))
    train, test = perm[:120], perm[120:]
    clf = GPClassifier(seed=0, optimism=0.0).fit(X[train], torch.as_tensor(ok[train]))
    p = clf.probability(X[test]).numpy()
    base = max(ok[test].mean(), 1 - ok[test].mean())
    accuracy = ((p > 0.5) == ok[test]).mean()
    assert 0.5 <= base < 0.6 and accuracy >= base + 0.25, (accuracy, base)
    assert p[ok[test]].mean() > 0.7 > 0.3 > p[~ok[test]].mean()


def test_optimistic_p_penalises_only_where_the_classifier_is_sure() -> None:
    """kappa = 0 is the predictive P; kappa > 0 raises P most where the latent GP is unsure."""
    import gpytorch

    from sdl.engine.feasibility import GPClassifier

    X, ok, _ = _barrel()
    train = np.random.default_rng(0).permutation(len(ok))[:120]
    clf = GPClassifier(seed=0, optimism=0.0).fit(X[train], torch.as_tensor(ok[train]))
    assert clf._likelihood is not None and clf._model is not None
    with torch.no_grad(), gpytorch.settings.fast_pred_var():
        reference = clf._likelihood(clf._model(clf._standardise(X))).mean
    plain = clf.probability(X)
    assert torch.allclose(plain, reference.clamp(1e-6, 1.0))
    clf.optimism = 1.0
    optimistic = clf.probability(X)
    assert bool((optimistic >= plain).all())
    # Far outside the data the latent GP is unsure: P tends to Phi(kappa) = 0.84, not the base rate.
    far = torch.full((1, X.shape[1]), 25.0, dtype=torch.float64)
    clf.optimism = 0.0
    p_far = float(clf.probability(far))
    clf.optimism = 1.0
    assert float(clf.probability(far)) > max(p_far, 0.7)
    # Still a classifier: the infeasible designs keep a lower P than the feasible ones.
    assert optimistic[torch.as_tensor(~ok)].mean() < optimistic[torch.as_tensor(ok)].mean() - 0.2


def test_classifier_refuses_a_single_outcome() -> None:
    from sdl.engine.feasibility import GPClassifier
    from sdl.exceptions import EngineError

    X, _, _ = _barrel()
    with pytest.raises(EngineError, match="same outcome"):
        GPClassifier().fit(X[:10], torch.ones(10))


def test_weigh_combines_values_with_p_success() -> None:
    from sdl.engine.feasibility import weigh, weigh_kind

    values = torch.tensor([-1.0, 0.5, 2.0, 1.0])
    p = torch.tensor([0.9, 0.25, 1.0, 0.5])
    w = p
    assert weigh_kind("qlognei") == "log" and weigh_kind("qucb") == "shifted"
    assert torch.allclose(weigh(values, p.log(), "log"), values + w.log())
    assert torch.allclose(weigh(values.abs(), p.log(), "product"), values.abs() * w)
    # qUCB: a failure is worth the floor (the incumbent); below it nothing is gained either way.
    assert torch.allclose(weigh(values, p.log(), "shifted", floor=0.0), torch.tensor([0.0, 0.5 * w[1], 2.0, 0.5]))


# -- the engine -------------------------------------------------------------------------------
def _barrel_engine(tmp_path: Path, feasibility: str, function: str = "qlognei"):
    from sdl import config as cfgmod
    from sdl.engine import Engine
    from sdl.engine.space import CandidatePool

    X, _, _ = _barrel()
    path = tmp_path / "pool.csv"
    path.write_text("id,x0,x1,x2,x3\n" + "".join(f"d{i},{','.join(map(str, x))}\n" for i, x in enumerate(X.tolist())))
    pool = CandidatePool.from_csv(path, id_column="id", parameter_columns=["x0", "x1", "x2", "x3"])
    return Engine(
        objective=cfgmod.ObjectiveSpec(property="toughness", unit="J", goal="maximize"),
        model=cfgmod.GPModel(name="gp"),
        acquisition=cfgmod.Acquisition(function=function, feasibility=feasibility),  # type: ignore[arg-type]
        seed=0, pool=pool, initial_design=cfgmod.InitialDesign(strategy="random", size=2),
    )


def _teach(engine, ok: np.ndarray, tough: np.ndarray, rows: np.ndarray) -> None:
    from sdl.engine import Observation

    engine.observe([Observation(f"d{i}", value=float(tough[i])) for i in rows if ok[i]])
    engine.observe_failures([f"d{i}" for i in rows if not ok[i]])


@pytest.mark.parametrize("function", ["qlognei", "qucb"])
def test_acquisition_is_down_weighted_where_syntheses_fail(tmp_path: Path, function: str) -> None:
    """When the toughest barrels fail to print, blind picks go there and aware ones do not."""
    X, _, tough = _barrel()
    ok = ~(tough > np.quantile(tough, 0.6))  # the rule: the toughest 40 % of the designs fail to print
    seen = np.random.default_rng(1).permutation(len(ok))[:200]
    aware, blind = _barrel_engine(tmp_path, "auto", function), _barrel_engine(tmp_path, "off", function)
    for engine in (aware, blind):
        _teach(engine, ok, tough, seen)
    torch.manual_seed(0)  # the GP fit draws its restarts from the global stream: the same for both
    picks_aware = aware.propose(q=4)
    torch.manual_seed(0)
    picks_blind = blind.propose(q=4)
    assert aware.feasibility_model is not None and blind.feasibility_model is None
    assert all(p.p_success is not None for p in picks_aware) and all(p.p_success is None for p in picks_blind)
    rows_aware = [int(p.key[1:]) for p in picks_aware]
    rows_blind = [int(p.key[1:]) for p in picks_blind]
    p_all = aware.feasibility_model.probability(X)
    assert picks_aware[0].p_success == pytest.approx(float(p_all[rows_aware[0]]), rel=1e-6)
    # First pick: max over x of the weighted value, so between the blind best and the blind pick weighted.
    a_aware, a_blind = picks_aware[0].acquisition_value, picks_blind[0].acquisition_value
    assert a_aware is not None and a_blind is not None
    if function == "qlognei":  # EI times P: log a(x) + log P(x)
        assert a_blind + math.log(float(p_all[rows_blind[0]])) - 1e-9 <= a_aware <= a_blind + 1e-9
    else:  # qUCB: the optimistic improvement over the incumbent times P; here it changes the picks
        assert float(p_all[rows_blind].min()) < 0.5  # the blind batch holds likely failures
        assert float(p_all[rows_aware].mean()) > float(p_all[rows_blind].mean())
        assert ok[rows_aware].all() and sum(ok[rows_aware]) > sum(ok[rows_blind])  # blind walks into failures
    failed = set(aware.failed_keys)  # a failed candidate is never proposed again, and never a label
    assert not failed & {p.key for p in picks_aware} and len(aware.observations) == int(ok[seen].sum())


def test_feasibility_waits_for_a_failure_and_on_is_strict(tmp_path: Path) -> None:
    from sdl.engine import Observation
    from sdl.exceptions import EngineError

    _, ok, tough = _barrel()
    engine = _barrel_engine(tmp_path, "auto")
    good = [i for i in range(len(ok)) if ok[i]][:6]
    engine.observe([Observation(f"d{i}", value=float(tough[i])) for i in good])
    assert all(p.p_success is None for p in engine.propose(q=2))  # no failure yet: the plain acquisition
    strict = _barrel_engine(tmp_path, "on")
    strict.observe_failures([f"d{i}" for i in range(len(ok)) if not ok[i]][:3])
    strict.observe([Observation(f"d{good[0]}", value=float(tough[good[0]]))])
    strict.observe([Observation(f"d{good[1]}", value=float(tough[good[1]]))])
    assert strict.propose(q=1)[0].p_success is not None
    with pytest.raises(EngineError, match="unknown candidate key"):
        strict.observe_failures(["nope"])


# -- configuration ----------------------------------------------------------------------------
def _yaml(tmp_path: Path, robot_sim: str = "", station_sim: str = "", acquisition: str = "") -> Path:
    text = f"""
name: feas-{uuid.uuid4().hex[:6]}
search_space:
  candidates: {{file: {DEMO}, id_column: id, structure_column: cif, formula_column: formula}}
objective: {{property: e_form, unit: eV, goal: minimize}}
model: {{name: gp}}
acquisition: {{function: qlognei, batch_size: 4{acquisition}}}
initial_design: {{strategy: random, size: 4}}
budget: {{experiments: 12, max_failures: 12}}
instruments:
  - {{name: robot0, role: synthesis, simulated: true, world: {DEMO}, simulator: {{time_scale: 0.002{robot_sim}}}}}
  - {{name: station0, role: characterization, simulated: true, world: {DEMO}, measures: [e_form],
      simulator: {{time_scale: 0.002{station_sim}}}}}
"""
    path = tmp_path / "campaign.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"robot_sim": ", tolerance_factor: {low: 1.0, high: 0.9}"}, "tolerance_factor.high"),
    ({"robot_sim": ", tolerance_factor: {low: 0.8, unjudged: maybe}"}, "tolerance_factor.unjudged"),
    ({"station_sim": ", tolerance_factor: {low: 0.8}"}, "set it on the synthesis instrument"),
    ({"acquisition": ", feasibility: sometimes"}, "acquisition.feasibility"),
])
def test_bad_feasibility_yaml_names_the_file_and_field(tmp_path: Path, kwargs: dict[str, str], message: str) -> None:
    from sdl.config import load_campaign
    from sdl.exceptions import CampaignConfigError

    path = _yaml(tmp_path, **kwargs)
    with pytest.raises(CampaignConfigError) as info:
        load_campaign(path)
    text = str(info.value)
    assert str(path.name) in text and message in text, text


def test_shipped_feasibility_campaign_validates() -> None:
    from sdl.config import load_campaign

    cfg = load_campaign(ROOT / "campaigns" / "perovskite-feasibility.yaml")
    robot = next(i for i in cfg.instruments if i.role == "synthesis")
    assert robot.simulator.tolerance_factor is not None and cfg.acquisition.feasibility == "auto"


# -- benchmark replays ------------------------------------------------------------------------
def test_benchmark_counts_failures_and_draws_the_top_set_from_what_forms(tmp_path: Path) -> None:
    from sdl import benchmark as bmk
    from simulators.synthesis_rules import ToleranceFactorRule

    strategies = bmk.parse_strategies("random,gp,gp:blind")
    assert [s.label for s in strategies] == ["random", "gp", "gp:blind"] and strategies[2].feasibility == "off"
    assert bmk.parse_strategies("gp:qucb:blind")[0].label == "gp:qucb:blind"
    with pytest.raises(bmk.BenchmarkError, match="random has no feasibility"):
        bmk.parse_strategies("random:blind")
    ds = bmk.load_crystal_dataset(DEMO, "e_form", "min", work_dir=tmp_path)
    bmk.apply_synthesis_rule(ds, ToleranceFactorRule(0.8, 1.07))
    assert ds.feasible is not None and 0.25 < (~ds.feasible).mean() < 0.5
    results = bmk.run_benchmark(ds, strategies[:2], [0], 16, initial=4, batch_size=4)
    assert results["n_infeasible"] == int((~ds.feasible).sum())
    index = {k: i for i, k in enumerate(ds.ids)}
    for label, s in results["strategies"].items():
        keys = s["keys"][0]
        assert len(keys) == 16
        assert s["failures"] == [sum(not ds.feasible[index[k]] for k in keys)], label
        for k, v in zip(keys, s["measured"][0], strict=True):  # a failed synthesis has no value
            assert math.isnan(v) == (not ds.feasible[index[k]])
    top = {ds.ids[i] for i in np.flatnonzero(ds.feasible)}
    truth = dict(zip(ds.ids, ds.truth, strict=True))
    assert results["best_in_pool"] == min(truth[k] for k in top)


# -- the real flow ----------------------------------------------------------------------------
def test_campaign_with_the_tolerance_factor_robot_records_failures(
        harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdl.flows import run_campaign
    from sdl.repository import Store
    from simulators.synthesis_rules import ToleranceFactorRule

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    db = f"sqlite:///{tmp_path / 'feas.db'}"
    path = _yaml(tmp_path, robot_sim=", tolerance_factor: {low: 0.8, high: 1.07}")
    summary = run_campaign(path, db_url=db)
    counts = summary["counts"]
    assert summary["state"] == "completed" and counts["completed"] + counts["failed"] == 12
    rule = ToleranceFactorRule(0.8, 1.07)
    cifs = {r["id"]: r["cif"] for r in _demo_rows()}
    store = Store.from_url(db)
    try:
        experiments = store.experiments(summary["campaign_id"])
        for e in experiments:  # every experiment ended as the rule says, failures as material ones
            verdict = rule.judge_cif(cifs[e.candidate_key])
            assert (e.state == "completed") == verdict.ok, (e.candidate_key, e.state, verdict)
            if e.state == "failed":
                assert e.failure_kind == "material" and "Goldschmidt tolerance factor" in (e.failure_reason or "")
        first_failure = min((e.id for e in experiments if e.state == "failed"), default=None)
        assert first_failure is not None, "the seeded design meets the rule (37 % of the demo world fails)"
        # Batch mode: a batch whose experiments all come after the failed one's batch was proposed
        # after the failure ended, so the engine's classifier weighted it.
        failed_batch = next(e.batch_id for e in experiments if e.id == first_failure)
        last_of_it = max(e.id for e in experiments if e.batch_id == failed_batch)
        later = [e for e in experiments if e.id > last_of_it]
        assert later, "the failure came in the last batch: nothing to weight"
        assert all((e.provenance_extra or {}).get("strategy") == "gp" for e in later)
        assert all(0.0 < (e.provenance_extra or {}).get("p_success", -1.0) <= 1.0 for e in later)
    finally:
        store.close()


def test_a_resumed_campaign_learns_its_earlier_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Material failures in the repository (from a run, or `sdl tell --failed`) reach the engine on resume."""
    from sdl.config import load_campaign
    from sdl.lab import open_lab, run_plain

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    db = f"sqlite:///{tmp_path / 'resume.db'}"
    path = _yaml(tmp_path, robot_sim=", tolerance_factor: {low: 0.8, high: 1.07}")
    text = path.read_text().replace("model: {name: gp}", "model: {name: random}").replace(
        "experiments: 12, max_failures: 12", "experiments: 8, max_failures: 8")
    path.write_text(text)
    cfg = load_campaign(path)
    with open_lab(cfg, db) as lab:
        assert run_plain(lab) == "completed"
        failed = sorted(e.candidate_key for e in lab.store.experiments(lab.campaign_id) if e.state == "failed")
        assert failed and sorted(lab.engine.failed_keys) == failed
    with open_lab(load_campaign(path), db) as again:
        assert sorted(again.engine.failed_keys) == failed
