"""Cheap fidelities: computed sources of the objective's property, their costs, and the cost-aware choice.

A source is a computation that needs no instrument: a column another database computed for the
same candidates (OQMD's DFT formation energy beside CMR's), or a pretrained backbone's zero-shot
prior (CHGNet's energy per atom). Each has a cost in the units of ``fidelities.measured_cost`` (what
one experiment costs). A computed value is recorded as a :class:`Computation`, never as an
experiment, so nothing counts it towards the experiment budget or the discoveries.

The choice (:func:`cost_aware_choice`), per round, in the spirit of MF-GP-UCB / BOCA (Kandasamy et
al. 2016, 2017): *where* to look comes from the ordinary acquisition on the measured property (the
multi-task GP's task 0); *what to do there* is the option with the most information about the
measured property at that candidate per unit cost, ``Cov(f_0, f_s)^2 / (Var f_s + noise_s) / cost_s``,
among measuring it (``s = 0``) and every source not yet computed for it. An informative cheap
source is computed first, and the candidate is made only if it still ranks first afterwards; a
source the model found uncorrelated carries no information and is never paid for.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sdl.engine.engine import Proposal
from sdl.exceptions import EngineError

if TYPE_CHECKING:
    from sdl.engine.models.backbones import Backbone
    from sdl.engine.models.embedding_store import EmbeddingStore
    from sdl.engine.space import CandidatePool

__all__ = [
    "MEASURED", "ColumnSource", "ComputedSource", "Computation", "FidelityProposal", "PretrainedSource",
    "build_sources", "cost_aware_choice",
]

logger = logging.getLogger(__name__)

MEASURED = "measured"
"""The source name of a real experiment (the objective's property as the lab measures it)."""


@dataclass(frozen=True)
class Computation:
    """One computed value of a cheap source for a candidate (not an experiment).

    Args:
        key: Candidate id.
        source: Name of the :class:`ComputedSource`.
        value: The computed value, in the source's own units.
    """

    key: str
    source: str
    value: float


@dataclass(frozen=True)
class FidelityProposal(Proposal):
    """A :class:`~sdl.engine.engine.Proposal` that says which source to run and what it costs.

    Attributes:
        source: ``measured`` (make and measure it) or the name of a computed source.
        cost: Cost of running it, in the units of ``fidelities.measured_cost``.
    """

    source: str = MEASURED
    cost: float = 1.0

    @property
    def is_computation(self) -> bool:
        """True when no instrument is needed: the engine computes it (:meth:`ComputedSource.compute`)."""
        return self.source != MEASURED


class ComputedSource(ABC):
    """A cheap source of the objective's property over the pool's candidates.

    Args:
        name: Name recorded with each value.
        cost: Cost of one value (units of the measured cost).
    """

    def __init__(self, name: str, cost: float) -> None:
        if not cost > 0:
            raise EngineError(f"fidelity source {name!r}: cost must be > 0, got {cost=}")
        self.name = str(name)
        self.cost = float(cost)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, cost={self.cost:g})"

    @abstractmethod
    def compute(self, pool: CandidatePool, rows: Sequence[int]) -> np.ndarray:
        """Values for pool ``rows`` (NaN where the source has none for a candidate)."""


class ColumnSource(ComputedSource):
    """A column of the candidates table computed elsewhere (another code's DFT value for the same crystal).

    Args:
        name: Source name.
        cost: Cost of one value.
        column: Column of the pool's table.
    """

    def __init__(self, name: str, cost: float, column: str) -> None:
        super().__init__(name, cost)
        self.column = column
        self._values: np.ndarray | None = None

    def compute(self, pool: CandidatePool, rows: Sequence[int]) -> np.ndarray:
        """The column's values at ``rows`` (read once per pool)."""
        if self._values is None or len(self._values) != len(pool):
            try:
                self._values = pool.values(self.column, reduce="first")
            except ValueError as exc:
                raise EngineError(f"fidelity source {self.name!r}: {exc}") from exc
        return self._values[np.asarray(rows, dtype=np.int64)]


class PretrainedSource(ComputedSource):
    """A pretrained backbone's zero-shot prior (CHGNet: predicted energy per atom above its references).

    Only the requested crystals are featurised (cached in the embedding store), so what the campaign
    pays for is what runs.

    Args:
        name: Source name.
        cost: Cost of one value.
        backbone: Backbone name or import path (``chgnet``), or a loaded backbone.
        store: Embedding cache (the default store when None).
    """

    def __init__(self, name: str, cost: float, backbone: str | Backbone = "chgnet",
                 store: EmbeddingStore | None = None) -> None:
        super().__init__(name, cost)
        self.backbone = backbone
        self.store = store

    def compute(self, pool: CandidatePool, rows: Sequence[int]) -> np.ndarray:
        """Featurise the crystals at ``rows`` and return their priors (NaN where featurising failed)."""
        from sdl.engine.models.backbones import BackboneError, load_backbone
        from sdl.engine.models.embedding_store import EmbeddingStore, default_store_path, featurize_texts

        if isinstance(self.backbone, str):
            try:
                self.backbone = load_backbone(self.backbone)
            except BackboneError as exc:
                raise EngineError(f"fidelity source {self.name!r}: {exc}") from exc
        if self.store is None:
            self.store = EmbeddingStore(default_store_path())
        texts = pool.structure_texts(list(rows))
        feats = featurize_texts(self.backbone, texts, self.store, fmt=pool.structure_format,
                                spec=self.backbone.name)
        prior: np.ndarray = np.asarray(feats.prior, dtype=np.float64)
        return prior


def build_sources(fidelities: Any, store: EmbeddingStore | None = None) -> list[ComputedSource]:
    """The computed sources of ``cfg.fidelities`` (``sdl.config.Fidelities``).

    Raises:
        EngineError: A source kind this module does not know.
    """
    out: list[ComputedSource] = []
    for s in fidelities.sources:
        if s.kind == "column":
            out.append(ColumnSource(s.name, s.cost, s.column))
        elif s.kind == "pretrained":
            out.append(PretrainedSource(s.name, s.cost, s.backbone, store=store))
        else:
            raise EngineError(f"fidelities.sources: unknown kind {s.kind!r} of source {s.name!r}")
    return out


def cost_aware_choice(
    ranked: Sequence[int],
    info: np.ndarray,
    costs: Sequence[float],
    computed: np.ndarray,
    *,
    q: int,
    compute_batch: int,
) -> list[tuple[int, int]]:
    """Walk candidates in acquisition order; at each, take the option with the most information per cost.

    Args:
        ranked: Candidate rows, best acquisition value first.
        info: ``len(ranked) x T`` information about the measured property of each option
            (:meth:`sdl.engine.models.multifidelity.MultiFidelityGP.variance_reduction`); column 0 = measure.
        costs: ``T`` costs (``costs[0]`` = the measured cost).
        computed: ``len(ranked) x T`` bool, True where source ``t`` is already known for the candidate
            (column 0 is False: ranked candidates are not measured yet).
        q: Most measurements in the round.
        compute_batch: Most computations in the round.

    Returns:
        ``(row, task)`` pairs, in order; the walk stops once ``q`` measurements or ``compute_batch``
        computations are chosen (so a round is never empty while a candidate is ranked).
    """
    cost = np.asarray(costs, dtype=np.float64)
    out: list[tuple[int, int]] = []
    n_measure = n_compute = 0
    for j, row in enumerate(ranked):
        score = np.where(computed[j], -np.inf, np.asarray(info[j], dtype=np.float64) / cost)
        score[0] = float(info[j][0]) / cost[0]
        t = int(np.argmax(score))
        if t == 0:
            out.append((int(row), 0))
            n_measure += 1
        else:
            out.append((int(row), t))
            n_compute += 1
        if n_measure >= q or n_compute >= compute_batch:
            break
    return out
