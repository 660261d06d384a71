"""Parameter spaces and candidate pools on the shipped worlds."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pandas as pd
import pytest
import torch

from sdl.engine.space import CandidatePool, Parameter, ParameterSpace

WORLDS = Path(__file__).resolve().parent.parent / "simulators" / "worlds"
BARREL = WORLDS / "crossed_barrel.csv"
PEROV = WORLDS / "perovskites_2k.csv.gz"


@pytest.fixture(scope="module")
def barrel() -> CandidatePool:
    return CandidatePool.from_csv(BARREL, id_column=None, parameter_columns=["n", "theta", "r", "t"])


def mixed_space() -> ParameterSpace:
    return ParameterSpace([
        Parameter("n", "categorical", choices=(6, 8, 10, 12)),
        {"name": "theta", "type": "integer", "low": 0, "high": 200},
        NS(name="r", type="continuous", low=1.5, high=2.5, choices=None, unit="mm"),
    ])


def test_replicates_collapse_to_one_candidate_with_stable_key(barrel: CandidatePool) -> None:
    frame = pd.read_csv(BARREL)
    assert len(frame) == 1800 and len(barrel) == 600
    assert barrel.keys[0] == "n=6;theta=0;r=1.5;t=0.7"
    assert all(len(r) == 3 for r in barrel.replicates)
    expected = frame.groupby(["n", "theta", "r", "t"], sort=False)["toughness"].mean().to_numpy()
    np.testing.assert_allclose(barrel.values("toughness"), expected)
    again = CandidatePool.from_csv(BARREL, id_column=None, parameter_columns=["n", "theta", "r", "t"])
    assert again.keys == barrel.keys
    assert barrel.key_for_params({"n": 6, "theta": 0, "r": 1.5000000001, "t": 0.7}) == barrel.keys[0]
    X = barrel.parameter_matrix()
    assert X.shape == (600, 4) and float(X.min()) == 0.0 and float(X.max()) == 1.0


def test_space_encode_decode_roundtrip_and_keys() -> None:
    space = mixed_space()
    assert space.dim == 4 + 1 + 1 and space.cardinality() is None
    rows = [{"n": 8, "theta": 75, "r": 2.0}, {"n": 12, "theta": 200, "r": 1.5}]
    X = space.encode(rows)
    assert X.shape == (2, 6) and X[0, :4].tolist() == [0, 1, 0, 0]
    assert space.decode(X) == rows
    assert space.key_of({"n": "8", "theta": 74.6, "r": 2.0000000001}) == "n=8;theta=75;r=2"
    # Any point of the cube decodes to a valid recipe.
    U = torch.rand(50, space.dim, generator=torch.Generator().manual_seed(0))
    for rec in space.decode(U):
        space.canonical(rec)


def test_space_rejects_bad_recipes_by_name() -> None:
    space = mixed_space()
    with pytest.raises(ValueError, match="'r' missing"):
        space.key_of({"n": 6, "theta": 1})
    with pytest.raises(ValueError, match="'n': 7 is not one of"):
        space.key_of({"n": 7, "theta": 1, "r": 2.0})
    with pytest.raises(ValueError, match=r"'theta': 300.0 outside"):
        space.key_of({"n": 6, "theta": 300, "r": 2.0})
    with pytest.raises(ValueError, match="low < high"):
        Parameter("x", "continuous", low=1, high=1)


def test_space_samples_are_reproducible() -> None:
    space = mixed_space()
    for method in ("sobol", "random"):
        a, b, c = space.sample(16, 3, method), space.sample(16, 3, method), space.sample(16, 4, method)
        assert a == b and a != c
        assert space.sample(20, 3, method)[:16] == a  # longer draws extend the same sequence


def test_pool_errors_name_file_and_column(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope.csv"):
        CandidatePool.from_csv(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=r"crossed_barrel.csv: column 'cif' not found"):
        CandidatePool.from_csv(BARREL, id_column=None, structure_column="cif")
    with pytest.raises(ValueError, match="no id column"):
        CandidatePool.from_csv(BARREL, id_column=None)
    dup = tmp_path / "dup.csv"
    pd.DataFrame({"id": ["a", "a"], "formula": ["NaCl", "KCl"]}).to_csv(dup, index=False)
    with pytest.raises(ValueError, match=r"dup.csv: duplicate ids"):
        CandidatePool.from_csv(dup, formula_column="formula")


def test_crystal_pool_parses_structures_lazily_and_once() -> None:
    pool = CandidatePool.from_config(NS(file=PEROV, id_column="id", structure_column="cif",
                                        structure_format="cif", parameter_columns=None, formula_column="formula"))
    assert len(pool) == 2000 and pool.is_crystal and not pool._parsed
    s = pool.structures([0, 1])
    assert len(pool._parsed) == 2 and s[0].composition.reduced_formula == "RuPbO3"
    assert pool.formulas([0]) == ["PbRuO3"] and pool.params(0) == {"formula": "PbRuO3"}
    tiled = pool.tiled(3)
    assert len(tiled) == 6000 and tiled.keys[2000] == "perov_12~1" and len(set(tiled.keys)) == 6000
    assert tiled.structures([2000])[0] is s[0]  # same text, parsed once
    bad = pd.DataFrame({"id": ["x"], "cif": ["not a cif"]})
    with pytest.raises(ValueError, match="candidate 'x': column 'cif': cannot parse structure as cif"):
        CandidatePool.from_frame(bad, structure_column="cif", source="bad.csv").structures()
