"""Periodic crystal graphs: pymatgen ``Structure`` -> nodes, k-nearest edges, distances; batching; cache.

Why this shape: a crystal is infinite, so edges must reach across periodic images
(``Structure.get_neighbor_list``), and a graph must not depend on how the cell was written
(unit cell vs supercell, lattice vectors, origin, atom order). Nodes carry atomic numbers
(the network learns an element embedding), edges carry interatomic distances, and the
network expands distances in a Gaussian radial basis (:class:`GaussianBasis`).

Ties at the k-th neighbour: high-symmetry cells (cubic perovskites) have shells of equal
distance that straddle the k-th slot, e.g. an X site of a cubic ABX3 cell sees 2 B + 12
(4 A + 8 X) atoms at ``a/2`` and ``a/sqrt(2)``. Picking "the first k" would depend on atom
order and cell choice. We keep *every* neighbour whose distance is within ``tie_tolerance``
(1e-3 Å by default) of the k-th distance, so a site keeps a whole shell or none of it and the
graph is a function of the crystal, not of its cell.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = [
    "CrystalGraph",
    "GraphBatch",
    "CrystalGraphConverter",
    "GaussianBasis",
    "PackedGraphs",
    "collate",
]

logger = logging.getLogger(__name__)

MERGE_RESOLUTION = 1e-4  # Å: distances closer than this count as equal when merging images


@dataclass(frozen=True)
class CrystalGraph:
    """One periodic crystal graph.

    Attributes:
        atomic_numbers: ``[num_atoms]`` long, Z of each site.
        edge_index: ``[2, num_edges]`` long; row 0 = centre atom i, row 1 = neighbour j
            (the image's original site index); messages flow j -> i.
        distances: ``[num_edges]`` float32, Å.
        cutoff: Radius used to find neighbours, Å.
        edge_weight: ``[num_edges]`` float32, how many periodic images of j at that distance the
            edge stands for (1 unless ``merge_images``); messages are multiplied by it.
        cutoff: Radius used to find neighbours, Å.
        max_neighbors: k of the k-nearest selection (ties kept, see module docstring).
    """

    atomic_numbers: torch.Tensor
    edge_index: torch.Tensor
    distances: torch.Tensor
    edge_weight: torch.Tensor
    cutoff: float
    max_neighbors: int

    @property
    def num_atoms(self) -> int:
        """Number of sites in the cell."""
        return int(self.atomic_numbers.shape[0])

    @property
    def num_edges(self) -> int:
        """Number of directed edges."""
        return int(self.distances.shape[0])


@dataclass(frozen=True)
class GraphBatch:
    """Many graphs as one disjoint graph (node and edge indices offset per graph).

    Attributes:
        atomic_numbers: ``[N]`` long over all atoms of the batch.
        edge_index: ``[2, E]`` long, indices into the batch's atoms.
        distances: ``[E]`` float32.
        edge_weight: ``[E]`` float32 image multiplicities.
        graph_index: ``[N]`` long, the graph each atom belongs to.
        num_atoms: ``[B]`` long, atoms per graph.
    """

    atomic_numbers: torch.Tensor
    edge_index: torch.Tensor
    distances: torch.Tensor
    edge_weight: torch.Tensor
    graph_index: torch.Tensor
    num_atoms: torch.Tensor

    @property
    def num_graphs(self) -> int:
        """Number of crystals in the batch."""
        return int(self.num_atoms.shape[0])


def collate(graphs: Sequence[CrystalGraph]) -> GraphBatch:
    """Join graphs into one :class:`GraphBatch` (order kept).

    Args:
        graphs: Graphs to join; at least one.
    """
    if len(graphs) == 0:
        raise ValueError("collate: got no graphs (len(graphs)=0)")
    return PackedGraphs(graphs).batch()


class GaussianBasis(torch.nn.Module):
    """Expand distances ``[E]`` into ``[E, num_rbf]`` Gaussians on ``[0, cutoff]``.

    Args:
        cutoff: Largest distance, Å (centre of the last Gaussian).
        num_rbf: Number of Gaussians.
    """

    centers: torch.Tensor  # a buffer (moves with the module)

    def __init__(self, cutoff: float, num_rbf: int) -> None:
        super().__init__()
        if num_rbf < 1:
            raise ValueError(f"GaussianBasis needs at least 1 function, got {num_rbf=}")
        centers = torch.linspace(0.0, float(cutoff), int(num_rbf))
        self.register_buffer("centers", centers)
        spacing = float(cutoff) / max(1, int(num_rbf) - 1)
        self.gamma = 1.0 / spacing**2

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        """Return ``[E, num_rbf]`` basis values."""
        diff = distances.unsqueeze(-1) - self.centers
        return torch.exp(-self.gamma * diff * diff)


class PackedGraphs:
    """Graphs concatenated in flat tensors, so that any subset becomes a batch without a Python loop.

    Training selects random mini-batches hundreds of times per epoch; gathering from packed
    tensors costs a few vectorised index operations instead of one ``cat`` per graph.

    Args:
        graphs: The graphs, in order; index ``i`` of :meth:`batch` refers to ``graphs[i]``.
    """

    def __init__(self, graphs: Sequence[CrystalGraph]) -> None:
        n_nodes = torch.tensor([g.num_atoms for g in graphs], dtype=torch.long)
        n_edges = torch.tensor([g.num_edges for g in graphs], dtype=torch.long)
        self.node_ptr = torch.zeros(len(graphs) + 1, dtype=torch.long)
        self.node_ptr[1:] = torch.cumsum(n_nodes, 0)
        self.edge_ptr = torch.zeros(len(graphs) + 1, dtype=torch.long)
        self.edge_ptr[1:] = torch.cumsum(n_edges, 0)
        self.n_nodes = n_nodes
        self.n_edges = n_edges
        self.atomic_numbers = (
            torch.cat([g.atomic_numbers for g in graphs]) if graphs else torch.zeros(0, dtype=torch.long)
        )
        # Edge indices local to their own graph (0..num_atoms-1).
        self.local_edges = (
            torch.cat([g.edge_index for g in graphs], dim=1) if graphs else torch.zeros(2, 0, dtype=torch.long)
        )
        self.distances = torch.cat([g.distances for g in graphs]) if graphs else torch.zeros(0)
        self.edge_weight = torch.cat([g.edge_weight for g in graphs]) if graphs else torch.zeros(0)

    def __len__(self) -> int:
        return int(self.n_nodes.shape[0])

    def batch(self, indices: torch.Tensor | Sequence[int] | None = None) -> GraphBatch:
        """Return the graphs at ``indices`` (all when None) as one :class:`GraphBatch`."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        nn_ = self.n_nodes[idx]
        ne = self.n_edges[idx]
        b = idx.shape[0]
        new_node_start = torch.zeros(b, dtype=torch.long)
        if b > 1:
            new_node_start[1:] = torch.cumsum(nn_, 0)[:-1]
        node_graph = torch.repeat_interleave(torch.arange(b), nn_)
        node_src = self.node_ptr[idx][node_graph] + (
            torch.arange(int(nn_.sum())) - new_node_start[node_graph]
        )
        edge_graph = torch.repeat_interleave(torch.arange(b), ne)
        new_edge_start = torch.zeros(b, dtype=torch.long)
        if b > 1:
            new_edge_start[1:] = torch.cumsum(ne, 0)[:-1]
        edge_src = self.edge_ptr[idx][edge_graph] + (torch.arange(int(ne.sum())) - new_edge_start[edge_graph])
        edge_index = self.local_edges[:, edge_src] + new_node_start[edge_graph]
        return GraphBatch(
            atomic_numbers=self.atomic_numbers[node_src],
            edge_index=edge_index,
            distances=self.distances[edge_src],
            edge_weight=self.edge_weight[edge_src],
            graph_index=node_graph,
            num_atoms=nn_,
        )


class CrystalGraphConverter:
    """Turn pymatgen structures into :class:`CrystalGraph` objects, with a bounded per-key cache.

    Args:
        cutoff: Neighbour search radius across periodic images, Å.
        max_neighbors: Keep the k nearest neighbours of each atom (plus ties, see module docstring).
        num_rbf: Gaussians in the distance expansion (kept here so graphs and network agree).
        tie_tolerance: Neighbours within this many Å of the k-th distance are all kept.
        cache_size: Most graphs kept in the in-memory LRU cache (keyed by candidate id).
        merge_images: Merge edges to periodic images of the same neighbour at the same distance
            into one weighted edge (exact for the sum aggregation of :mod:`sdl.engine.models.gnn`).
    """

    def __init__(
        self,
        *,
        cutoff: float = 6.0,
        max_neighbors: int = 12,
        num_rbf: int = 40,
        tie_tolerance: float = 1e-3,
        cache_size: int = 200_000,
        merge_images: bool = True,
    ) -> None:
        if cutoff <= 0:
            raise ValueError(f"CrystalGraphConverter: cutoff must be > 0 Å, got {cutoff=}")
        if max_neighbors < 1:
            raise ValueError(f"CrystalGraphConverter: max_neighbors must be >= 1, got {max_neighbors=}")
        self.cutoff = float(cutoff)
        self.max_neighbors = int(max_neighbors)
        self.num_rbf = int(num_rbf)
        self.tie_tolerance = float(tie_tolerance)
        self.cache_size = int(cache_size)
        self.merge_images = bool(merge_images)
        self._cache: OrderedDict[Hashable, CrystalGraph] = OrderedDict()

    def __repr__(self) -> str:
        return (
            f"CrystalGraphConverter(cutoff={self.cutoff} Å, max_neighbors={self.max_neighbors}, "
            f"num_rbf={self.num_rbf}, tie_tolerance={self.tie_tolerance} Å, "
            f"merge_images={self.merge_images}, cached={len(self._cache)})"
        )

    def as_dict(self) -> dict[str, Any]:
        """Constructor arguments (for checkpoints)."""
        return {
            "cutoff": self.cutoff,
            "max_neighbors": self.max_neighbors,
            "num_rbf": self.num_rbf,
            "tie_tolerance": self.tie_tolerance,
            "cache_size": self.cache_size,
            "merge_images": self.merge_images,
        }

    def convert(self, structure: Structure) -> CrystalGraph:
        """Build the graph of one structure (not cached).

        Args:
            structure: A periodic pymatgen ``Structure`` (ordered sites).
        """
        if not structure.is_ordered:
            raise ValueError(f"CrystalGraphConverter: disordered structure {structure.composition.reduced_formula}")
        z = torch.tensor([site.specie.Z for site in structure], dtype=torch.long)
        centers, neighbors, _images, dists = structure.get_neighbor_list(r=self.cutoff)
        centers = np.asarray(centers, dtype=np.int64)
        neighbors = np.asarray(neighbors, dtype=np.int64)
        dists = np.asarray(dists, dtype=np.float64)
        keep = dists > 1e-8
        centers, neighbors, dists = centers[keep], neighbors[keep], dists[keep]
        if centers.size:
            order = np.lexsort((neighbors, dists, centers))
            centers, neighbors, dists = centers[order], neighbors[order], dists[order]
            n = len(structure)
            counts = np.bincount(centers, minlength=n)
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            kth_pos = starts + np.minimum(counts, self.max_neighbors) - 1
            kth = np.full(n, np.inf)
            has = counts > 0
            kth[has] = dists[kth_pos[has]]
            sel = dists <= kth[centers] + self.tie_tolerance
            centers, neighbors, dists = centers[sel], neighbors[sel], dists[sel]
        weights = np.ones(centers.shape[0])
        if self.merge_images and centers.size:
            # Images of the same neighbour at the same distance send identical messages:
            # keep one edge with a multiplicity weight (exact, ~3x fewer edges in cubic cells).
            qd = np.round(dists / MERGE_RESOLUTION).astype(np.int64)
            keys = np.stack([centers, neighbors, qd], axis=1)
            uniq, inverse, counts_u = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
            inverse = inverse.reshape(-1)
            dsum = np.zeros(uniq.shape[0])
            np.add.at(dsum, inverse, dists)
            centers, neighbors = uniq[:, 0], uniq[:, 1]
            dists = dsum / counts_u
            weights = counts_u.astype(np.float64)
        isolated = len(structure) - len(np.unique(centers))
        if isolated:
            logger.warning(
                "%d of %d sites of %s have no neighbour within %.2f Å",
                isolated,
                len(structure),
                structure.composition.reduced_formula,
                self.cutoff,
            )
        return CrystalGraph(
            atomic_numbers=z,
            edge_index=torch.from_numpy(np.stack([centers, neighbors])).long(),
            distances=torch.from_numpy(dists).float(),
            edge_weight=torch.from_numpy(weights).float(),
            cutoff=self.cutoff,
            max_neighbors=self.max_neighbors,
        )

    def convert_many(
        self,
        structures: Sequence[Structure | CrystalGraph],
        keys: Sequence[Hashable] | None = None,
    ) -> list[CrystalGraph]:
        """Graphs of many structures; with ``keys``, reuse and fill the LRU cache.

        Args:
            structures: Structures (or ready graphs, passed through).
            keys: One hashable id per structure (candidate id); None disables the cache.
        """
        if keys is not None and len(keys) != len(structures):
            raise ValueError(f"convert_many: {len(keys)=} differs from {len(structures)=}")
        out: list[CrystalGraph] = []
        for i, s in enumerate(structures):
            if isinstance(s, CrystalGraph):
                out.append(s)
                continue
            if keys is None:
                out.append(self.convert(s))
                continue
            key = keys[i]
            g = self._cache.get(key)
            if g is None:
                g = self.convert(s)
                self._cache[key] = g
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            out.append(g)
        return out

    def clear_cache(self) -> None:
        """Forget every cached graph."""
        self._cache.clear()
