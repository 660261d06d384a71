"""Candidate generation on real Materials Project perovskites: substitution, dedup, CHGNet, hull, CLI.

Real pymatgen substitution probabilities, the real ``StructureMatcher``, the real CHGNet 0.3.0
weights (relaxations of a couple of 5-atom cells) and the real ``sdl generate`` command.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pymatgen.core import Composition, Species, Structure
from typer.testing import CliRunner

from sdl.cli.main import app
from sdl.generation import GenerationError
from sdl.generation.dedup import KnownStructures
from sdl.generation.hull import ConvexHull, ElementCorrection
from sdl.generation.pipeline import CANDIDATE_COLUMNS, GenerationOptions, generate
from sdl.generation.relax import CHGNetEnergies
from sdl.generation.sources import read_known
from sdl.generation.substitution import (
    OxidationStateError,
    apply_substitution,
    decorate,
    substitutions_from,
)

DATA = Path(__file__).resolve().parent / "data" / "mp_perovskites_12.csv"


@pytest.fixture(scope="module")
def known() -> pd.DataFrame:
    return pd.read_csv(DATA)


def structure_of(frame: pd.DataFrame, mp_id: str) -> Structure:
    return Structure.from_str(frame.set_index("id").at[mp_id, "cif"], fmt="cif")


@pytest.fixture(scope="module")
def chgnet() -> CHGNetEnergies:
    return CHGNetEnergies(steps=60)


def test_substitutions_are_pymatgens_and_charge_balanced(known: pd.DataFrame) -> None:
    from pymatgen.analysis.structure_prediction.substitution_probability import SubstitutionPredictor

    parent = decorate(structure_of(known, "mp-5827"))  # CaTiO3 -> Ca2+ Ti4+ O2-
    subs = substitutions_from(parent, "mp-5827")
    theirs = SubstitutionPredictor(threshold=1e-3).composition_prediction(parent.composition,
                                                                          to_this_composition=False)
    expected = {tuple(sorted((str(a), str(b)) for a, b in d["substitutions"].items() if a != b)) for d in theirs}
    assert {tuple(sorted(s.mapping)) for s in subs} == expected - {()}
    assert len(subs) > 10
    assert [s.probability for s in subs] == sorted((s.probability for s in subs), reverse=True)
    for s in subs[:15]:
        new = dict(s.mapping)
        charge = sum(Species.from_str(new.get(str(sp), str(sp))).oxi_state * amt  # type: ignore[operator]
                     for sp, amt in parent.composition.items())
        assert charge == pytest.approx(0.0)
        assert s.formula != "CaTiO3"
        made = apply_substitution(parent, s)
        assert made.composition.reduced_formula == s.formula and len(made) == 5


def test_oxidation_states_that_cannot_be_guessed_are_refused(known: pd.DataFrame) -> None:
    with pytest.raises(OxidationStateError, match="Nd3SnN"):
        decorate(structure_of(known, "mp-1094085"))


def test_dedup_removes_a_regenerated_known_structure(known: pd.DataFrame) -> None:
    parent = decorate(structure_of(known, "mp-5827"))  # cubic CaTiO3
    to_sr = [s for s in substitutions_from(parent, "mp-5827") if s.mapping == (("Ca2+", "Sr2+"),)]
    assert len(to_sr) == 1
    regenerated = apply_substitution(parent, to_sr[0])
    srtio3 = KnownStructures([structure_of(known, "mp-5229")])  # cubic SrTiO3 from the table
    assert srtio3.contains(regenerated)
    assert not srtio3.keep_if_new(regenerated)
    assert not srtio3.contains(structure_of(known, "mp-5020"))  # another formula
    table = read_known(DATA)
    result = generate(table, GenerationOptions(n=500, energy="none"))
    made = {(c.substitution.parent_id, c.substitution.formula) for c in result.candidates}
    assert ("mp-5827", "SrTiO3") not in made  # substituted but a duplicate of mp-5229
    # Cubic CaZrO3 comes from SrZrO3 (Sr->Ca) and from CaTiO3 (Ti->Zr): one crystal, kept once.
    assert any(s.mapping == (("Ti4+", "Zr4+"),) for s in substitutions_from(parent, "mp-5827"))
    assert [c.substitution.formula for c in result.candidates].count("CaZrO3") == 1
    assert any(pid == "mp-5827" for pid, _ in made)  # new compositions of that parent survive
    assert len({c.id for c in result.candidates}) == len(result.candidates)
    again = KnownStructures()
    assert all(again.keep_if_new(c.structure) for c in result.candidates)  # no twins among them


def test_chgnet_relaxation_runs_on_small_cells(known: pd.DataFrame, chgnet: CHGNetEnergies) -> None:
    for mp_id in ("mp-5229", "mp-3448"):
        relaxed = structure_of(known, mp_id)
        strained = relaxed.copy()
        strained.scale_lattice(relaxed.volume * 1.15)
        before = chgnet.static([strained])[0]
        after = chgnet.relax(strained)
        assert after.error is None and after.steps > 1
        assert math.isfinite(after.energy_per_atom)
        assert after.energy_per_atom < before.energy_per_atom - 1e-3  # relaxing lowered the energy
        assert abs(after.structure.volume - relaxed.volume) < abs(strained.volume - relaxed.volume)


def test_hull_puts_known_stable_phases_on_it(known: pd.DataFrame) -> None:
    comps = [Composition(f) for f in known["formula"]]
    energies = known["formation_energy"].tolist()
    hull = ConvexHull(comps, energies)
    for _, row in known[known["energy_above_hull"] == 0].iterrows():
        assert hull.e_above_hull(Composition(row["formula"]), row["formation_energy"]) == pytest.approx(0, abs=1e-6)
    srtio3 = Composition("SrTiO3")
    e = known.set_index("id").at["mp-5229", "formation_energy"]
    assert hull.e_above_hull(srtio3, e + 0.1) == pytest.approx(0.1, abs=1e-6)
    assert hull.e_above_hull(srtio3, e - 0.05) == pytest.approx(-0.05, abs=1e-6)  # a new stable phase
    assert hull.e_above_hull(Composition("CaZrO3"), -1.0) == pytest.approx(-1.0)  # only elements known there
    shifted = [x - 0.3 * Composition(f).get_atomic_fraction("O") for f, x in zip(known["formula"], energies,
                                                                               strict=True)]
    correction = ElementCorrection(comps, shifted, energies, ridge=1e-9)
    assert correction(Composition("CaZrO3"), 0.0) == pytest.approx(0.3 * 0.6, abs=1e-3)


def test_ranking_by_hull_distance_on_the_chgnet_scale() -> None:
    table = read_known(DATA)
    result = generate(table, GenerationOptions(n=6, energy="static", score_top=12))
    assert result.hull_scale == "chgnet" and len(result.candidates) == 6 and result.n_scored >= 6
    e_hull = [c.e_above_hull for c in result.candidates]
    assert all(math.isfinite(x) for x in e_hull) and e_hull == sorted(e_hull)
    assert "mp-1094085" in result.skipped


def _tiny_input(tmp_path: Path, known: pd.DataFrame) -> Path:
    rows = known[known["id"].isin(["mp-5229", "mp-3448", "mp-1094085"])].copy()
    bad = pd.DataFrame([{"id": "broken-cif", "formula": "X", "cif": "data_x\n_cell_length_a 3\n"}])
    path = tmp_path / "tiny.csv"
    pd.concat([rows, bad], ignore_index=True).to_csv(path, index=False)
    return path


def test_cli_generates_a_pool_a_campaign_accepts(tmp_path: Path, known: pd.DataFrame) -> None:
    from sdl.config import validate_campaign_dict
    from sdl.engine.space import CandidatePool

    src = _tiny_input(tmp_path, known)
    out = tmp_path / "candidates.csv"
    res = CliRunner().invoke(app, ["generate", "--from", str(src), "--structure-column", "cif", "--id-column", "id",
                                   "--n", "2", "--out", str(out), "--energy", "relax", "--score-top", "2",
                                   "--relax-steps", "30", "--energy-column", "formation_energy"])
    assert res.exit_code == 0, res.output
    summary = [line for line in res.output.splitlines() if line.startswith("skipped")]
    assert len(summary) == 1 and "broken-cif" in summary[0] and "mp-1094085" in summary[0]
    frame = pd.read_csv(out)
    assert list(frame.columns) == CANDIDATE_COLUMNS and len(frame) == 2
    assert frame["relax_steps"].min() >= 1 and frame["e_above_hull"].notna().all()
    assert set(frame["parent_id"]) <= {"mp-5229", "mp-3448"}
    cfg = validate_campaign_dict({
        "name": "grown", "search_space": {"candidates": {"file": str(out), "structure_column": "cif",
                                                         "formula_column": "formula"}},
        "objective": {"property": "e_form", "unit": "eV", "goal": "minimize"},
        "model": {"name": "random"}, "acquisition": {"function": "qucb"}, "budget": {"experiments": 2},
        "initial_design": {"strategy": "random", "size": 1},
        "instruments": [{"name": "r", "role": "synthesis", "url": "socket://127.0.0.1:9"},
                        {"name": "s", "role": "characterization", "url": "socket://127.0.0.1:9",
                         "measures": ["e_form"]}],
    })
    pool = CandidatePool.from_config(cfg.search_space.candidates)
    assert len(pool) == 2 and all(len(s) == 5 for s in pool.structures())


def test_cli_says_when_fewer_candidates_exist(tmp_path: Path, known: pd.DataFrame) -> None:
    src = _tiny_input(tmp_path, known)
    out = tmp_path / "all.csv.gz"
    res = CliRunner().invoke(app, ["generate", "--from", str(src), "--n", "100000", "--out", str(out),
                                   "--energy", "none", "--workers", "2"])  # structures built in 2 processes
    assert res.exit_code == 0, res.output
    written = pd.read_csv(out)
    assert 0 < len(written) < 100000
    assert f"only {len(written)} unique candidates could be generated (asked for 100000)" in res.output


@pytest.mark.parametrize(("args", "message"), [
    (["--from", "{tmp}/missing.csv"], "missing.csv: file not found"),
    (["--from", "{src}", "--structure-column", "structure"], "no column 'structure' (--structure-column)"),
    (["--from", "{src}", "--energy-column", "e_hull"], "no column 'e_hull' (--energy-column)"),
    (["--from", "{src}", "--id-column", "mp_id"], "no column 'mp_id' (--id-column)"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    src = tmp_path / "src.csv"
    shutil.copy(DATA, src)
    out = tmp_path / "out.csv"
    argv = ["generate", *[a.format(tmp=tmp_path, src=src) for a in args], "--n", "3", "--out", str(out)]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0]
    assert not out.exists()


def test_read_known_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match=r"nothing\.csv: file not found"):
        read_known(tmp_path / "nothing.csv")


def test_generate_in_yaml_needs_a_crystal_pool(tmp_path: Path) -> None:
    from sdl.config import CampaignConfigError, validate_campaign_dict

    table = tmp_path / "recipes.csv"
    table.write_text("id,x,y\na,1,2\nb,2,3\n")
    campaign = {
        "name": "no-crystals",
        "search_space": {"candidates": {"file": str(table), "parameter_columns": ["x"]}, "generate": {}},
        "objective": {"property": "y", "unit": "", "goal": "maximize"}, "model": {"name": "random"},
        "acquisition": {"function": "qucb"}, "budget": {"experiments": 2},
        "initial_design": {"strategy": "random", "size": 1},
        "instruments": [{"name": "r", "role": "synthesis", "url": "socket://127.0.0.1:9"},
                        {"name": "s", "role": "characterization", "url": "socket://127.0.0.1:9", "measures": ["y"]}],
    }
    with pytest.raises(CampaignConfigError, match="generate: needs candidates with a structure_column"):
        validate_campaign_dict(campaign)
    campaign["search_space"]["candidates"] = {"file": str(DATA), "structure_column": "cif"}  # type: ignore[index]
    campaign["search_space"]["generate"] = {"n_per_round": 4, "energy": "relax"}  # type: ignore[index]
    cfg = validate_campaign_dict(campaign)
    assert cfg.search_space.generate is not None and cfg.search_space.generate.n_per_round == 4
    assert "generate" in cfg.snapshot()["search_space"]


def test_engine_scores_generated_candidates_with_the_pretrained_backbone(tmp_path: Path) -> None:
    from sdl.engine import Engine, Observation
    from sdl.engine.models.embedding_store import EmbeddingStore
    from sdl.engine.space import CandidatePool

    frame = pd.read_csv(DATA)
    pool = CandidatePool.from_frame(frame, structure_column="cif", formula_column="formula")
    store = EmbeddingStore(tmp_path / "emb.sqlite")
    engine = Engine(objective={"property": "formation_energy", "goal": "minimize"},
                    model={"name": "gnn-ensemble", "options": {"head": "gp"}},
                    acquisition={"function": "qucb", "batch_size": 2}, seed=0, pool=pool,
                    initial_design={"strategy": "random", "size": 2}, embedding_store=store)
    engine.prepare()
    engine.observe([Observation(key=r.id, params={}, value=r.formation_energy) for r in frame.head(6).itertuples()])
    engine.propose(q=2)
    result = generate(read_known(DATA), GenerationOptions(n=3, energy="none"))
    added = engine.extend_pool([c.id for c in result.candidates], [c.row()["cif"] for c in result.candidates],
                               [c.substitution.formula for c in result.candidates])
    assert added == 3 and engine.pool is not None and len(engine.pool) == 15
    assert engine.extend_pool([result.candidates[0].id], ["x"], ["y"]) == 0  # already there
    assert engine.n_observed == 6  # observations keep their rows
    picks = engine.propose(q=2)
    assert len(picks) == 2 and not {p.key for p in picks} & set(frame.head(6)["id"])
    mean, std = engine.predict_pool()
    assert all(math.isfinite(float(mean[i])) and float(std[i]) > 0 for i in range(12, 15))
    assert engine.head_inputs is not None and engine.head_inputs.shape[0] == 15
