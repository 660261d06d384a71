"""A short campaign whose pool grows between rounds (``search_space.generate``), end to end.

Real simulator processes over pyserial, real Ophyd devices and RunEngines, real SQLite and
PostgreSQL. The pool is 12 real Materials Project perovskites; the simulated world knows them and
every crystal a substitution into them can make (ids are deterministic), with CHGNet's energy above
its elemental references as the "measured" value of the generated ones, so the lab can measure a
generated candidate as it would a table row.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from sdl.config import load_campaign
from sdl.generation.growth import GENERATED_EVENT, GROWN_EVENT
from sdl.generation.pipeline import candidate_id
from sdl.generation.relax import CHGNetEnergies
from sdl.generation.substitution import OxidationStateError, apply_substitution, decorate, substitutions_from
from sdl.lab import open_lab, run_plain

DATA = Path(__file__).resolve().parent / "data" / "mp_perovskites_12.csv"
THRESHOLD = 3e-3


def write_world(tmp_path: Path) -> Path:
    """The pool's rows plus every substitution of every row (the simulator's ground truth)."""
    from pymatgen.core import Structure

    pool = pd.read_csv(DATA)
    rows = pool[["id", "formula", "formation_energy", "cif"]].to_dict("records")
    made, subs = [], []
    for r in pool.itertuples():
        try:
            parent = decorate(Structure.from_str(r.cif, fmt="cif"))
        except OxidationStateError:
            continue
        for s in substitutions_from(parent, str(r.id), THRESHOLD):
            made.append(apply_substitution(parent, s))
            subs.append(s)
    energies = CHGNetEnergies().static(made)
    for s, structure, e in zip(subs, made, energies, strict=True):
        rows.append({"id": candidate_id(s), "formula": s.formula, "cif": structure.to(fmt="cif"),
                     "formation_energy": e.energy_per_atom if math.isfinite(e.energy_per_atom) else 0.0})
    path = tmp_path / "world.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def write_campaign(tmp_path: Path, world: Path) -> Path:
    sim = "{time_scale: 0.002}"
    text = f"""
name: growing
seed: 1
search_space:
  candidates: {{file: {DATA}, id_column: id, structure_column: cif, formula_column: formula}}
  generate: {{n_per_round: 3, parents: 2, every: 1, energy: none, threshold: {THRESHOLD}, max_pool_size: 18}}
objective: {{property: formation_energy, unit: eV/atom, goal: minimize}}
model: {{name: gp}}
acquisition: {{function: qucb, batch_size: 2, beta: 4.0}}
initial_design: {{strategy: random, size: 2}}
budget: {{experiments: 8}}
instruments:
  - {{name: robot, role: synthesis, simulated: true, world: {world}, simulator: {sim}, timeout_s: 20}}
  - {{name: station, role: characterization, simulated: true, world: {world}, measures: [formation_energy],
      simulator: {sim}, timeout_s: 20}}
"""
    path = tmp_path / "growing.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_world(tmp_path_factory.mktemp("world"))


def test_campaign_grows_its_pool_with_provenance(tmp_path: Path, world: Path, database_url: str) -> None:
    cfg = load_campaign(write_campaign(tmp_path, world))
    original = set(pd.read_csv(DATA)["id"])
    with open_lab(cfg, database_url, state_dir=tmp_path / "state") as lab:
        assert run_plain(lab) == "completed"
        store, cid, engine = lab.store, lab.campaign_id, lab.engine
        pool = engine.pool
        assert pool is not None and 12 < len(pool) <= 18
        generated = store.events(cid, GENERATED_EVENT)
        grown = store.events(cid, GROWN_EVENT)
        assert len(grown) >= 2 and len(generated) == len(pool) - 12
        measured = {o.key for o in engine.observations}
        for event in generated:
            p = event.payload or {}
            assert p["id"] in pool and p["id"] not in original
            assert p["parent_id"] in original and p["parent_id"] in measured  # a parent is a measured candidate
            assert p["substitution"] and "->" in p["substitution"]
            assert p["substitution_probability"] >= THRESHOLD
            material = store.get_material(int(p["material_id"]))
            assert material is not None and material.source_id == p["id"] and material.cif
            assert material.formula == p["formula"]
            parent = store.get_material(int(p["parent_material_id"]))
            assert parent is not None and parent.source_id == p["parent_id"]
        # The engine scores the new candidates like the table's rows.
        engine.fit()
        mean, std = engine.predict_pool()
        new_rows = [pool.index_of(str((e.payload or {})["id"])) for e in generated]
        assert all(math.isfinite(float(mean[i])) and float(std[i]) > 0 for i in new_rows)
        experiments = store.experiments(cid)
        assert len(experiments) == 8 and all(e.state == "completed" for e in experiments)
        on_generated = [e for e in experiments if e.candidate_key not in original]
        assert on_generated  # the model picked generated crystals, and the lab measured them
        for e in on_generated:  # measured like any other candidate, linked to its generated material
            ids = {int((g.payload or {})["material_id"]) for g in generated
                   if (g.payload or {})["id"] == e.candidate_key}
            assert e.material_id in ids
        size = len(pool)
    # A new process finds the generated candidates again (experiments on them stay resolvable).
    with open_lab(cfg, database_url, state_dir=tmp_path / "state") as again:
        assert again.engine.pool is not None and len(again.engine.pool) == size
        assert again.engine.n_observed == 8
