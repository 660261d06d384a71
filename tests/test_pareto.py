"""Several objectives without a model: the YAML, utilities, constraints, the front and its hypervolume."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from sdl.config import CampaignConfigError, load_campaign
from sdl.engine.objectives import Objective
from sdl.engine.pareto import Constraint, MultiObjective, hypervolume, pareto_mask
from sdl.lab.pareto import ParetoProgress

REPO = Path(__file__).resolve().parent.parent
CAMPAIGN = REPO / "campaigns" / "perovskite-pareto.yaml"
WORLD = REPO / "simulators" / "worlds" / "perovskites_2k.csv.gz"


def campaign_objectives() -> MultiObjective:
    return MultiObjective.from_campaign(load_campaign(CAMPAIGN))


# ---------------------------------------------------------------------------------------- the YAML
def test_example_campaign_loads_with_two_objectives_a_constraint_and_a_reference_point() -> None:
    cfg = load_campaign(CAMPAIGN)
    assert [o.property for o in cfg.all_objectives] == ["e_form", "gap_gllbsc"]
    assert cfg.objective.property == "e_form"  # the primary: what single-value views show
    assert [str(c) for c in cfg.constraints] == ["gap_gllbsc >= 0.5"]
    assert cfg.reference_point == [1.0, 1.5] and cfg.modelled_properties == ["e_form", "gap_gllbsc"]
    snap = cfg.snapshot()
    assert "objective" not in snap and snap["objectives"][1]["target_range"] == [1.5, 3.0]


def test_a_single_objective_campaign_keeps_its_snapshot_and_hash() -> None:
    cfg = load_campaign(REPO / "campaigns" / "demo.yaml")
    snap = cfg.snapshot()
    assert not {"objectives", "constraints", "reference_point"} & set(snap)
    assert cfg.config_hash().startswith("a73916c4d610")  # the hash main computes for demo.yaml


def _write(tmp_path: Path, edit: dict[str, object], drop: tuple[str, ...] = ()) -> Path:
    data = yaml.safe_load(CAMPAIGN.read_text())
    for key in drop:
        data.pop(key)
    data.update(edit)
    data["search_space"]["candidates"]["file"] = str(WORLD)
    for inst in data["instruments"]:
        inst["world"] = str(WORLD)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(("edit", "drop", "field", "message"), [
    ({"reference_point": [1.0]}, (), "reference_point", r"needs one value per objective \(2: \['e_form', "
     r"'gap_gllbsc'\]\), got 1"),
    ({"constraints": ["gap ~ 1.5"]}, (), r"constraints\[0\]", "must look like 'PROPERTY >= NUMBER'"),
    ({"constraints": ["band_gap >= 1.5"]}, (), "instruments", "no characterization instrument measures the "
     "constrained property 'band_gap'"),
    ({"objective": {"property": "e_form", "unit": "eV", "goal": "minimize"}}, (), "objectives",
     "give exactly one of 'objective'"),
    ({}, ("objectives",), "objective", "required field is missing"),
    ({"stopping": {"goal_value": 0.0}}, (), "stopping", "goal_value needs one objective"),
])
def test_bad_objectives_are_one_line_naming_file_and_field(tmp_path: Path, edit: dict[str, object],
                                                           drop: tuple[str, ...], field: str, message: str) -> None:
    path = _write(tmp_path, edit, drop)
    with pytest.raises(CampaignConfigError) as info:
        load_campaign(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}:")
    assert re.search(rf"{field}: .*{message}", text), text


def test_an_objective_naming_an_unmeasured_property_is_refused(tmp_path: Path) -> None:
    data = yaml.safe_load(CAMPAIGN.read_text())
    objectives = data["objectives"]
    objectives[1]["property"] = "gap_hse"
    path = _write(tmp_path, {"objectives": objectives})
    with pytest.raises(CampaignConfigError, match=r"instruments: no characterization instrument measures the "
                       r"objective 'gap_hse' \(measured: \['e_form', 'gap_gllbsc'\]\)"):
        load_campaign(path)


# ---------------------------------------------------------------------------------------- the maths
def test_front_and_hypervolume_on_a_hand_example() -> None:
    U = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [np.nan, 2.0], [0.5, 0.5]])
    assert pareto_mask(U).tolist() == [True, True, True, False, False, True]
    # staircase above (-1, -1): 2 x 1 (from (1, 0)) + 1.5 x 0.5 (from (0.5, 0.5)) + 1 x 0.5 (from (0, 1))
    assert hypervolume(U, -np.ones(2)) == pytest.approx(2.0 + 0.75 + 0.5)
    assert hypervolume(U, np.zeros(2)) == pytest.approx(0.25)  # only (0.5, 0.5) strictly dominates (0, 0)


def test_hypervolume_matches_botorch_on_real_data() -> None:
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    mo = campaign_objectives()
    df = pd.read_csv(WORLD, usecols=["e_form", "gap_gllbsc"])
    Y = df.to_numpy()[:400]
    ref = mo.reference_utility(Y)
    U = mo.utilities(Y[mo.feasible(Y)])
    expected = Hypervolume(ref_point=torch.as_tensor(ref)).compute(torch.as_tensor(U[pareto_mask(U)]))
    assert mo.hypervolume(Y, ref) == pytest.approx(float(expected), rel=1e-9) and expected > 0


def test_utilities_constraints_and_the_pool_front_of_the_example() -> None:
    mo = campaign_objectives()
    Y = np.array([[-0.5, 0.0], [0.2, 2.0], [0.2, 4.0], [0.3, 1.0]])
    assert mo.utilities(Y).tolist() == [[0.5, -1.5], [-0.2, 0.0], [-0.2, -1.0], [-0.3, -0.5]]
    assert mo.feasible(Y).tolist() == [False, True, True, True]  # gap 0: a metal
    assert mo.front(Y).tolist() == [False, True, False, False]
    assert mo.reference_utility().tolist() == [-1.0, -1.5]
    df = pd.read_csv(WORLD, usecols=["id", "e_form", "gap_gllbsc"])
    front = df[mo.front(df[["e_form", "gap_gllbsc"]].to_numpy())]
    assert sorted(front["id"]) == ["perov_15501", "perov_17979", "perov_1830", "perov_8713"]


def test_hypervolume_curve_grows_only_with_feasible_points_on_the_front() -> None:
    mo = campaign_objectives()
    ref = mo.reference_utility()
    Y = np.array([[0.5, 0.0], [0.5, 2.0], [0.6, 2.1], [0.1, 1.4], [0.1, 2.0]])
    curve = mo.hypervolume_curve(Y, ref, scale=1.0)
    assert curve[0] == 0.0 and curve[1] == pytest.approx(0.5 * 1.5) and curve[2] == curve[1]
    assert curve[3] > curve[2] and curve[4] == pytest.approx(0.9 * 1.5)
    assert np.all(np.diff(curve) >= 0)


def test_pareto_progress_counts_a_new_point_on_the_front_only() -> None:
    mo = campaign_objectives()
    rows = {1: [0.5, 2.0], 2: [0.6, 2.0], 3: [0.5, 0.0], 4: [0.1, 1.0], 5: [0.4, 2.5]}
    progress = ParetoProgress(mo, lambda i: rows[i])
    assert [progress(i, rows[i][0]) for i in sorted(rows)] == [True, False, False, True, True]
    assert len(progress.front) == 2  # 5 (dominates 1) and 4


def test_constraint_slack_and_validation() -> None:
    c = Constraint("gap", ">=", 1.5)
    assert c.slack(np.array([1.0, 2.0])).tolist() == [0.5, -0.5] and str(c) == "gap >= 1.5"
    with pytest.raises(ValueError, match="reference_point: needs 2 values"):
        MultiObjective([Objective(property="a"), Objective(property="b")], reference_point=[1.0])
    with pytest.raises(ValueError, match="each property once"):
        MultiObjective([Objective(property="a"), Objective(property="a")])


def test_patience_counts_experiments_since_the_front_last_grew() -> None:
    from sdl.lab.ledger import ExperimentLedger, StoppingPolicy

    mo = campaign_objectives()
    rows = {1: [0.5, 2.0], 2: [0.6, 2.0], 3: [0.1, 1.0], 4: [0.7, 1.8], 5: [0.9, 0.0], 6: [0.8, 2.0]}
    ledger = ExperimentLedger(mo.objectives[0], StoppingPolicy(budget=100, patience=3),
                              improvement=ParetoProgress(mo, lambda i: rows[i]))
    ledger.load([(i, f"k{i}", "completed") for i in rows], [(i, rows[i][0]) for i in list(rows)[:5]])
    ledger.check_rules()
    assert ledger.stop_reason is None  # 4 and 5 add nothing, 3 grew the front: 2 experiments since
    ledger.load([], [(6, rows[6][0])])
    ledger.check_rules()
    assert ledger.stop_reason == "no improvement in 3 rounds (3 experiments)"
    assert ledger.best_value == 0.1  # best so far stays the first objective's
