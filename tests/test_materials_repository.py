"""Materials de-duplicated across campaigns on SQLite and PostgreSQL: crystals, recipes, samples, queries."""

from __future__ import annotations

import csv
import gzip
import io
import json
import multiprocessing
import random
from pathlib import Path
from typing import Any

import pytest
from pymatgen.core import Lattice, Structure
from typer.testing import CliRunner

from sdl.exceptions import RepositoryError
from sdl.repository import MaterialMeasurementRecord, Store

WORLD = Path(__file__).resolve().parents[1] / "simulators/worlds/perovskites_demo.csv.gz"
SRWN3 = ("perov_15400", "perov_16144")  # two perovskite polymorphs of SrWN3 in the shipped world




def _rock_salt() -> Structure:
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(4.21), ["Mg", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def _zinc_blende() -> Structure:
    return Structure.from_spacegroup("F-43m", Lattice.cubic(4.60), ["Mg", "O"], [[0, 0, 0], [0.25, 0.25, 0.25]])


def _supercell_shuffled(s: Structure, seed: int = 0) -> Structure:
    """The same crystal in a 2x1x1 supercell, shifted, with its sites in another order."""
    big = s.copy()
    big.make_supercell([2, 1, 1])
    big.translate_sites(list(range(len(big))), [0.137, 0.29, 0.41])
    sites = list(big)
    random.Random(seed).shuffle(sites)
    return Structure.from_sites(sites)


def _world_cifs(ids: tuple[str, ...]) -> dict[str, str]:
    with gzip.open(WORLD, "rt") as fh:
        return {r["id"]: r["cif"] for r in csv.DictReader(fh) if r["id"] in ids}


def _campaign(store: Store, name: str) -> int:
    snapshot = {"objective": {"property": "band_gap", "goal": "maximize"}}
    return store.get_or_create_campaign(name, snapshot=snapshot, config_hash=name, seed=0, budget=5).id


def _measure(store: Store, cid: int, key: str, mid: int, values: dict[str, float], *, sample: str | None) -> int:
    eid = store.propose_experiment(cid, idempotency_key=f"{cid}:{key}", candidate_key=key, params={"k": key},
                                   material_id=mid)
    store.start_experiment(eid, instruments=["robot", "uv"])
    if sample is not None:
        store.add_sample(eid, instrument="robot", sample_uid=sample)
    for prop, value in values.items():
        store.add_measurement(eid, property=prop, value=value, unit="eV", instrument="uv")
    store.complete_experiment(eid)
    return eid


def test_one_crystal_one_material_any_cell_or_site_order(store: Store) -> None:
    rock = _rock_salt()
    mid = store.material_for_structure(rock, source_id="mp-1265")
    assert store.material_for_structure(_supercell_shuffled(rock)) == mid
    assert store.material_for_structure(_supercell_shuffled(rock, seed=1)) == mid
    assert store.material_for_structure(Structure.from_str(rock.to(fmt="cif"), fmt="cif")) == mid
    primitive = rock.get_primitive_structure()
    assert len(primitive) == 2 and store.material_for_structure(primitive) == mid
    zb = store.material_for_structure(_zinc_blende(), cif=_zinc_blende().to(fmt="cif"))
    assert zb != mid
    assert store.material_for_structure(_supercell_shuffled(_zinc_blende())) == zb

    (a, b) = store.materials("OMg")  # any element order names the formula
    assert (a.id, b.id) == (mid, zb) and a.formula == b.formula == "MgO"
    assert a.source_id == "mp-1265" and a.cif is None and b.cif is not None and b.cif.startswith("# generated")
    assert Structure.from_dict(a.structure) == rock  # type: ignore[arg-type]
    assert a.canonical_key.startswith("struct:MgO:sg225:") and b.canonical_key.startswith("struct:MgO:sg216:")
    assert store.materials("SrTiO3") == [] and len(store.materials()) == 2

    # a brand-new Store (empty cache, new connections) finds the same rows in the database
    other = Store.from_url(store.engine.url.render_as_string(hide_password=False))
    try:
        assert other.material_for_structure(_supercell_shuffled(rock, seed=2), source_id="ignored") == mid
        assert other.material_for_structure(_zinc_blende(), source_id="mp-1933") == zb
    finally:
        other.close()
    assert store.get_material(mid).source_id == "mp-1265"  # type: ignore[union-attr]  # never overwritten
    assert store.get_material(zb).source_id == "mp-1933"  # type: ignore[union-attr]  # filled in when missing


def test_real_perovskite_polymorphs_are_two_materials(store: Store) -> None:
    cifs = _world_cifs(SRWN3)
    first, second = (Structure.from_str(cifs[i], fmt="cif") for i in SRWN3)
    assert first.composition.reduced_formula == second.composition.reduced_formula == "SrWN3"
    m1 = store.material_for_structure(first, source_id=SRWN3[0], cif=cifs[SRWN3[0]])
    m2 = store.material_for_structure(second, source_id=SRWN3[1], cif=cifs[SRWN3[1]])
    assert m1 != m2
    assert store.material_for_structure(_supercell_shuffled(first)) == m1
    assert store.material_for_structure(_supercell_shuffled(second, seed=3)) == m2
    assert [m.source_id for m in store.materials("SrWN3")] == list(SRWN3)


def test_a_stored_crystal_is_found_by_its_cif_text(store: Store) -> None:
    cifs = _world_cifs(SRWN3)
    first = Structure.from_str(cifs[SRWN3[0]], fmt="cif")
    assert store.material_of_cif(cifs[SRWN3[0]], formula="SrWN3") is None  # nothing stored yet
    mid = store.material_for_structure(first, cif=cifs[SRWN3[0]])
    assert store.material_of_cif(cifs[SRWN3[0]], formula="N3SrW", source_id=SRWN3[0]) == mid  # any element order
    assert store.get_material(mid).source_id == SRWN3[0]  # type: ignore[union-attr]  # filled in when missing
    assert store.material_of_cif(cifs[SRWN3[0]], formula="SrWN3", source_id="other") == mid
    assert store.get_material(mid).source_id == SRWN3[0]  # type: ignore[union-attr]  # never overwritten
    assert store.material_of_cif(cifs[SRWN3[1]], formula="SrWN3") is None  # the other polymorph's text
    assert store.material_of_cif(cifs[SRWN3[0]], formula="MgO") is None  # a formula that is not the crystal's
    # another text of the same crystal is not found by text: the matcher decides (and keeps the first text)
    other_text = first.to(fmt="cif")
    assert store.material_of_cif(other_text, formula="SrWN3") is None
    assert store.material_for_structure(Structure.from_str(other_text, fmt="cif"), cif=other_text) == mid
    assert store.get_material(mid).cif == cifs[SRWN3[0]]  # type: ignore[union-attr]


def test_crystals_the_matcher_tells_apart_get_their_own_row_even_on_a_shared_key(store: Store) -> None:
    from sdl.materials import canonical_key

    zb = _zinc_blende()
    wurtzite = Structure.from_spacegroup(
        "P6_3mc", Lattice.hexagonal(3.25, 5.21), ["Mg", "O"], [[1 / 3, 2 / 3, 0], [1 / 3, 2 / 3, 0.375]]
    )
    key = canonical_key(structure=zb)
    squatter = store.upsert_material(key, formula="MgO", structure=wurtzite.as_dict())  # the key, another crystal
    mid = store.material_for_structure(zb)
    assert mid != squatter and store.get_material(mid).canonical_key == f"{key}~2"  # type: ignore[union-attr]
    assert store.material_for_structure(_supercell_shuffled(zb)) == mid
    assert store.material_for_structure(wurtzite) == squatter


def test_a_key_held_under_another_formula_still_gets_a_suffix(store: Store) -> None:
    """A new crystal of an empty formula takes its key unchecked; a hand-made row that holds the
    key under another formula makes that insert fail, and the retry finds a free key."""
    from sdl.materials import canonical_key

    rock_salt = _rock_salt()
    key = canonical_key(structure=rock_salt)
    squatter = store.upsert_material(key, formula="NaCl")  # no MgO row: the MgO bucket is empty
    mid = store.material_for_structure(rock_salt)
    assert mid != squatter and store.get_material(mid).canonical_key == f"{key}~2"  # type: ignore[union-attr]
    assert store.material_for_structure(_supercell_shuffled(rock_salt)) == mid


def test_recipes_with_float_noise_or_key_order_are_one_material(store: Store) -> None:
    mid = store.material_for_params({"t": 1.0, "a": 0.1 + 0.2, "gas": "Ar"})
    assert store.material_for_params({"gas": "Ar", "a": 0.3, "t": 1}) == mid
    assert store.material_for_params({"gas": "Ar", "a": 0.31, "t": 1}) != mid
    material = store.get_material(mid)
    assert material is not None and material.params == {"a": 0.3, "gas": "Ar", "t": 1}
    assert material.canonical_key == 'params:{"a":0.3,"gas":"Ar","t":1}' and material.formula is None
    with pytest.raises(RepositoryError, match="not finite"):
        store.material_for_params({"a": float("nan")})


def test_material_measured_by_two_campaigns(store: Store) -> None:
    rock = _rock_salt()
    mid = store.material_for_structure(rock)
    other = store.material_for_structure(_zinc_blende())
    a, b = _campaign(store, "alpha"), _campaign(store, "beta")
    ea = _measure(store, a, "MgO-a", mid, {"band_gap": 7.8, "density": 3.58}, sample="S-1")
    eb = _measure(store, b, "MgO-b", store.material_for_structure(_supercell_shuffled(rock)), {"band_gap": 7.6},
                  sample=None)
    _measure(store, b, "MgO-zb", other, {"band_gap": 5.0}, sample="S-2")
    drift = store.propose_experiment(b, idempotency_key="drift", candidate_key="MgO-c", params={}, material_id=mid)
    store.start_experiment(drift, instruments=["uv"])
    store.add_measurement(drift, property="band_gap", value=99.0, quality="drift")

    gaps = store.material_measurements(mid, "band_gap")
    assert all(isinstance(m, MaterialMeasurementRecord) for m in gaps)
    assert [(m.campaign, m.experiment_id, m.value) for m in gaps] == [("alpha", ea, 7.8), ("beta", eb, 7.6)]
    assert {m.material_id for m in gaps} == {mid} and gaps[0].unit == "eV" and gaps[0].instrument == "uv"
    assert gaps[0].timestamp.tzinfo is not None and gaps[0].quality == "ok" and gaps[0].campaign_id == a
    # the measurement without a sample_id points to its experiment's sample; none when there is none
    (sample,) = store.samples(ea)
    assert (gaps[0].sample_id, gaps[0].sample_uid) == (sample.id, "S-1") and gaps[1].sample_id is None
    assert [m.property for m in store.material_measurements(mid)] == ["band_gap", "density", "band_gap"]
    assert [m.value for m in store.material_measurements(mid, "band_gap", quality=None)] == [7.8, 7.6, 99.0]
    assert [m.value for m in store.material_measurements(mid, quality="drift")] == [99.0]
    assert [m.campaign for m in store.material_measurements(other)] == ["beta"]
    assert store.material_measurements(10_000) == []

    rows = {r["candidate_key"]: r for r in store.export_rows("beta")}
    assert (rows["MgO-b"]["material_id"], rows["MgO-b"]["formula"], rows["MgO-b"]["sample_uid"]) == (mid, "MgO", None)
    assert (rows["MgO-zb"]["material_id"], rows["MgO-zb"]["sample_uid"]) == (other, "S-2")
    assert rows["MgO-zb"]["band_gap"] == 5.0

    from sdl.cli.main import app

    url = store.engine.url.render_as_string(hide_password=False)
    out = CliRunner().invoke(app, ["export", "alpha", "--db", url, "--format", "csv"])
    assert out.exit_code == 0, out.output
    (row,) = list(csv.DictReader(io.StringIO(out.stdout)))
    assert (row["material_id"], row["formula"], row["sample_uid"], row["band_gap"]) == (str(mid), "MgO", "S-1", "7.8")
    out = CliRunner().invoke(app, ["export", "alpha", "--db", url, "--format", "json"])
    assert json.loads(out.stdout)[0]["formula"] == "MgO"


def test_record_document_links_measurements_to_the_sample(store: Store) -> None:
    cid = _campaign(store, "docs")
    eid = store.propose_experiment(cid, idempotency_key="d1", candidate_key="x", params={})
    store.start_experiment(eid, instruments=["robot"])
    first = store.add_sample(eid, instrument="robot", sample_uid="S-1")
    latest = store.add_sample(eid, instrument="robot", sample_uid="S-2")
    store.record_run_start("run-1", experiment_id=eid, plan_name="characterize")
    store.record_document("run-1", "event", {"uid": "ev-1"}, measurements=[
        (eid, {"property": "p", "value": 1.0, "event_uid": "ev-1"}),
        (eid, {"property": "q", "value": 2.0, "event_uid": "ev-1", "sample_id": first}),
    ])
    assert [(m.property, m.sample_id) for m in store.measurements(experiment_id=eid)] == [("p", latest), ("q", first)]


def _material_racer(url: str, seed: int, barrier: Any, results: Any) -> None:
    store = Store.from_url(url)
    try:
        structure = _supercell_shuffled(_rock_salt(), seed=seed)
        barrier.wait(timeout=60)
        results.put(store.material_for_structure(structure))
    finally:
        store.close()


def test_racing_processes_make_one_material(store: Store) -> None:
    url = store.engine.url.render_as_string(hide_password=False)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_material_racer, args=(url, seed, barrier, results)) for seed in (0, 1)]
    for p in procs:
        p.start()
    ids = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert ids[0] == ids[1] and [m.id for m in store.materials("MgO")] == [ids[0]]
