"""Periodic crystal graphs: invariance to cell choice, origin and atom order; batching; cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pymatgen.core import Structure

from sdl.engine.graphs import CrystalGraph, CrystalGraphConverter, PackedGraphs, collate
from sdl.engine.models.gnn import CrystalGNN

WORLD = Path(__file__).resolve().parents[1] / "simulators" / "worlds" / "perovskites_2k.csv.gz"


@pytest.fixture(scope="module")
def structures() -> list[Structure]:
    """Six real CMR perovskites: the first ideal cubic cells and the first with displaced atoms."""
    df = pd.read_csv(WORLD)
    cubic_cells: list[Structure] = []
    displaced: list[Structure] = []
    for cif in df["cif"]:
        s = Structure.from_str(cif, fmt="cif")
        ideal = np.allclose(np.round(s.frac_coords * 2) / 2, s.frac_coords, atol=1e-6)
        is_cubic = ideal and np.allclose(s.lattice.abc, s.lattice.a) and np.allclose(s.lattice.angles, 90.0)
        group = cubic_cells if is_cubic else displaced
        if len(group) < 3:
            group.append(s)
        if len(cubic_cells) == 3 and len(displaced) == 3:
            break
    assert len(cubic_cells) == 3 and len(displaced) == 3
    return cubic_cells + displaced


def site_environments(s: Structure, conv: CrystalGraphConverter) -> list[tuple]:
    """Per site: (Z, sorted (distance, Z_neighbour) multiset, images expanded), sorted over sites."""
    g = conv.convert(s)
    envs = []
    for i in range(g.num_atoms):
        mask = g.edge_index[0] == i
        items = []
        for j, d, w in zip(g.edge_index[1][mask], g.distances[mask], g.edge_weight[mask], strict=True):
            items += [(round(float(d), 3), int(g.atomic_numbers[j]))] * round(float(w))
        envs.append((int(g.atomic_numbers[i]), tuple(sorted(items))))
    return sorted(envs)


def variants(s: Structure) -> dict[str, Structure]:
    """The same crystal written differently."""
    shifted = s.copy()
    shifted.translate_sites(list(range(len(s))), [0.137, 0.271, 0.413], frac_coords=True, to_unit_cell=True)
    permuted = Structure.from_sites(list(reversed(s.sites)))
    return {
        "supercell_2x1x1": s.make_supercell([2, 1, 1], in_place=False),
        "supercell_2x2x2": s.make_supercell([2, 2, 2], in_place=False),
        "sheared_vectors": s.make_supercell([[1, 1, 0], [0, 1, 0], [0, 0, 1]], in_place=False),
        "origin_shift": shifted,
        "atom_order": permuted,
    }


def test_repr_states_cutoffs() -> None:
    text = repr(CrystalGraphConverter(cutoff=5.0, max_neighbors=8, num_rbf=32))
    assert "cutoff=5.0" in text and "max_neighbors=8" in text and "num_rbf=32" in text


def test_graph_content_of_a_real_perovskite(structures: list[Structure]) -> None:
    conv = CrystalGraphConverter(cutoff=6.0, max_neighbors=12)
    g = conv.convert(structures[0])
    assert isinstance(g, CrystalGraph)
    assert g.num_atoms == 5
    assert g.edge_index.shape == (2, g.num_edges)
    assert g.distances.min() > 0.5 and g.distances.max() <= 6.0
    # every atom has at least k neighbours (images counted), ties may add more
    per_site = torch.zeros(5).index_add_(0, g.edge_index[0], g.edge_weight)
    assert (per_site >= 12).all()
    assert g.atomic_numbers.tolist() == [site.specie.Z for site in structures[0]]


def test_ties_in_cubic_cell_keep_whole_shells(structures: list[Structure]) -> None:
    # In a cubic ABX3 cell an X site has 2 B at a/2 and 4 A + 8 X at a/sqrt(2): 14 neighbours, not 12.
    s = structures[0]
    conv = CrystalGraphConverter(cutoff=6.0, max_neighbors=12)
    g = conv.convert(s)
    per_site = torch.zeros(5).index_add_(0, g.edge_index[0], g.edge_weight)
    assert sorted(per_site.tolist()) == [12.0, 14.0, 14.0, 14.0, 14.0]


@pytest.mark.parametrize("index", range(6))
def test_neighbourhoods_invariant_to_cell_origin_and_order(structures: list[Structure], index: int) -> None:
    conv = CrystalGraphConverter(cutoff=6.0, max_neighbors=12)
    s = structures[index]
    reference = site_environments(s, conv)
    for name, variant in variants(s).items():
        envs = site_environments(variant, conv)
        repeat = len(variant) // len(s)
        expected = sorted(reference * repeat)
        assert envs == expected, f"{name} changed the site environments of {s.composition.reduced_formula}"


def test_predictions_invariant_per_atom(structures: list[Structure]) -> None:
    torch.manual_seed(0)
    net = CrystalGNN(hidden=16, layers=2).eval()
    conv = CrystalGraphConverter()
    with torch.no_grad():
        for s in structures:
            ref = net(collate([conv.convert(s)])).item()  # mean per-atom output
            for name, variant in variants(s).items():
                got = net(collate([conv.convert(variant)])).item()
                assert got == pytest.approx(ref, abs=1e-5), name


def test_batching_equals_one_by_one(structures: list[Structure]) -> None:
    torch.manual_seed(1)
    net = CrystalGNN(hidden=16, layers=2).eval()
    conv = CrystalGraphConverter()
    graphs = conv.convert_many([*structures, structures[0].make_supercell([1, 1, 2], in_place=False)])
    with torch.no_grad():
        together = net(collate(graphs))
        alone = torch.cat([net(collate([g])) for g in graphs])
        packed = PackedGraphs(graphs)
        picked = net(packed.batch([5, 0, 6]))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(picked, together[[5, 0, 6]], atol=1e-5, rtol=1e-5)
    batch = collate(graphs)
    assert batch.num_graphs == 7
    assert batch.num_atoms.tolist() == [5] * 6 + [10]
    assert int(batch.edge_index.max()) < int(batch.num_atoms.sum())


def test_cache_is_keyed_and_bounded(structures: list[Structure]) -> None:
    conv = CrystalGraphConverter(cache_size=2)
    first = conv.convert_many(structures[:2], keys=["a", "b"])
    again = conv.convert_many(structures[:2], keys=["a", "b"])
    assert first[0] is again[0] and first[1] is again[1]
    conv.convert_many(structures[2:3], keys=["c"])
    assert "a" not in conv._cache and "c" in conv._cache  # least recently used dropped
    with pytest.raises(ValueError, match="len"):
        conv.convert_many(structures[:2], keys=["a"])


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="cutoff"):
        CrystalGraphConverter(cutoff=0.0)
    with pytest.raises(ValueError, match="collate"):
        collate([])
    disordered = Structure([[4, 0, 0], [0, 4, 0], [0, 0, 4]], [{"Fe": 0.5, "Co": 0.5}], [[0, 0, 0]])
    with pytest.raises(ValueError, match="disordered"):
        CrystalGraphConverter().convert(disordered)
