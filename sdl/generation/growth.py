"""A campaign's crystal pool grown between rounds from the best candidates measured so far.

After every ``every`` completed q-batches, the ``parents`` best measured candidates (by the
objective) go through :func:`sdl.generation.pipeline.generate` with the whole pool as the known
crystals (so nothing already in the pool comes back); up to ``n_per_round`` new crystals (never
beyond ``max_pool_size``) are recorded as materials, each with one ``material.generated`` event
whose payload is its provenance (parent candidate and material, substitution, probability,
CHGNet energy above the hull, CIF), and appended to the engine's pool, which scores them from
the next proposal on. On resume, :meth:`PoolGrowth.restore` rebuilds the grown pool from those
events, so experiments on generated candidates stay resolvable. No schema change: materials keep
structure and CIF, the events' JSON payload keeps the provenance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sdl.generation.pipeline import GenerationOptions, generate
from sdl.generation.sources import KnownTable

if TYPE_CHECKING:
    from sdl.config import PoolGeneration
    from sdl.engine import Engine
    from sdl.repository import Store

__all__ = ["GENERATED_EVENT", "GROWN_EVENT", "Grown", "PoolGrowth"]

logger = logging.getLogger(__name__)

GENERATED_EVENT = "material.generated"
GROWN_EVENT = "pool.grown"


@dataclass(frozen=True)
class Grown:
    """One growth: what was added and from which parents."""

    added: list[str]
    parents: list[str]
    skipped: Mapping[str, str]


class PoolGrowth:
    """Decides when to grow, grows, records, and restores the grown pool of one campaign.

    Args:
        spec: ``search_space.generate``.
        batch_size: The campaign's q-batch size (``every`` counts batches of it).
    """

    def __init__(self, spec: PoolGeneration, *, batch_size: int) -> None:
        self.spec = spec
        self.batch_size = max(1, int(batch_size))
        self._completed_at_last = 0

    def due(self, completed: int) -> bool:
        """True once ``every`` batches completed since the last growth (never before the first result)."""
        return completed > 0 and completed - self._completed_at_last >= self.spec.every * self.batch_size

    def restore(self, engine: Engine, store: Store, campaign_id: int) -> int:
        """Put the candidates this campaign generated earlier back into the engine's pool."""
        keys, texts, formulas, extra = [], [], [], []
        for event in store.events(campaign_id, GENERATED_EVENT):
            p = dict(event.payload or {})
            if "id" in p and "cif" in p:
                keys.append(str(p["id"]))
                texts.append(str(p["cif"]))
                formulas.append(str(p.get("formula", "")))
                extra.append(_columns(p))
        for event in store.events(campaign_id, GROWN_EVENT):
            self._completed_at_last = max(self._completed_at_last, int((event.payload or {}).get("completed", 0)))
        return engine.extend_pool(keys, texts, formulas, extra) if keys else 0

    def grow(self, engine: Engine, store: Store, campaign_id: int, completed: int) -> Grown:
        """Generate from the best measured candidates and add the new ones to the pool and the repository."""
        self._completed_at_last = completed
        pool = engine.pool
        if pool is None:
            return Grown([], [], {})
        room = self.spec.n_per_round
        if self.spec.max_pool_size is not None:
            room = min(room, self.spec.max_pool_size - len(pool))
        parents = self._parents(engine)
        if room <= 0 or not parents:
            return Grown([], parents, {})
        rows = [pool.index_of(k) for k in parents]
        table = KnownTable("best measured", parents, pool.structures(rows), None)
        known = KnownTable(pool.source, list(pool.keys), pool.structures(), None)
        options = GenerationOptions(
            n=room, energy=self.spec.energy,
            score_top=self.spec.score_top, threshold=self.spec.threshold,
            relax_steps=self.spec.relax_steps, workers=self.spec.workers,
        )
        result = generate(table, options, reference=known)
        keys, texts, formulas, extra = [], [], [], []
        for c in result.candidates:
            if c.id in pool:
                continue
            row = c.row()
            material_id = store.material_for_structure(c.structure, source_id=c.id, cif=str(row["cif"]))
            parent_material = store.material_for_structure(
                pool.structures([pool.index_of(c.substitution.parent_id)])[0], source_id=c.substitution.parent_id
            )
            payload: dict[str, Any] = {**_jsonable(row), "material_id": material_id,
                                       "parent_material_id": parent_material, "hull_scale": result.hull_scale}
            store.log_event(GENERATED_EVENT, f"generated {c.substitution.formula} ({c.id}) from "
                            f"{c.substitution.parent_id} by {c.substitution.label}", campaign_id=campaign_id,
                            payload=payload)
            keys.append(c.id)
            texts.append(str(row["cif"]))
            formulas.append(c.substitution.formula)
            extra.append(_columns(payload))
        added = engine.extend_pool(keys, texts, formulas, extra)
        store.log_event(GROWN_EVENT, f"pool grown by {added} generated candidates to {len(engine.pool or [])}",
                        campaign_id=campaign_id,
                        payload={"added": keys, "parents": parents, "completed": completed,
                                 "skipped": dict(result.skipped), "shortfall": result.shortfall})
        return Grown(keys, parents, result.skipped)

    def _parents(self, engine: Engine) -> list[str]:
        """Keys of the best measured candidates (by objective utility), best first, distinct."""
        pool = engine.pool
        assert pool is not None
        best: dict[str, float] = {}
        for ob in engine.observations:
            if ob.key in pool and math.isfinite(ob.value):
                best[ob.key] = max(best.get(ob.key, -math.inf), float(engine.objective.utility([ob.value])[0]))
        ranked = sorted(best, key=lambda k: (-best[k], k))
        return ranked[: self.spec.parents]


def _jsonable(row: Mapping[str, object]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if isinstance(v, (float, np.floating)):
            out[k] = float(v) if math.isfinite(float(v)) else None
        elif isinstance(v, (int, np.integer)):
            out[k] = int(v)
        else:
            out[k] = v
    return out


def _columns(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The provenance columns a grown pool row carries (shown by the engine's pool, never read as inputs)."""
    return {k: payload.get(k) for k in ("parent_id", "substitution", "substitution_probability", "e_above_hull")}
