"""The computation step of a multi-fidelity campaign: cheap sources run here, without an instrument.

Why in the lab and not in the engine: a computed value is part of the campaign's record (kept in
the repository's ``computed_values``, so a resumed campaign knows it and pays nothing twice) but is
never an experiment: it takes no robot, no sample, no budget. :func:`experiments_only` runs the
computations a round of :class:`~sdl.engine.multifidelity.MultiFidelityEngine` asks for, keeps
them, and asks again until a round names experiments, which alone go on to the instruments.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdl.engine.engine import Engine, Proposal
    from sdl.engine.fidelity import Computation
    from sdl.repository.store import Store

__all__ = ["experiments_only", "restore_computed"]

logger = logging.getLogger(__name__)

MAX_COMPUTE_ROUNDS = 1000  # rounds of computations in a row before the lab gives up asking


def experiments_only(
    engine: Engine, proposals: Sequence[Proposal], again: Callable[[], Sequence[Proposal]], store: Store,
    campaign_id: int, prop: str, on_computed: Callable[[str], None] | None = None,
) -> list[Proposal]:
    """The experiments of ``proposals``, after running (and keeping) the computations the engine asks for.

    Args:
        engine: The campaign's engine (anything but a multi-fidelity engine passes through untouched).
        proposals: Its last round.
        again: Asks the engine for the next round (same pending and excluded keys).
        store: Where the computed values are kept.
        campaign_id: Their campaign.
        prop: The objective's property (what every source stands for).
        on_computed: Called with a one-line summary of each round of computations (the event log).
    """
    from sdl.engine.fidelity import FidelityProposal
    from sdl.engine.multifidelity import MultiFidelityEngine

    if not isinstance(engine, MultiFidelityEngine):
        return list(proposals)
    cost = {s.name: s.cost for s in engine.sources}
    for _ in range(MAX_COMPUTE_ROUNDS):
        todo = [p for p in proposals if isinstance(p, FidelityProposal) and p.is_computation]
        if todo:
            computed: list[Computation] = engine.run_computations(todo)
            engine.observe_computed(computed)
            store.record_computed_values(campaign_id, [(c.key, c.source, c.value, cost[c.source]) for c in computed],
                                         property=prop, model_version=engine.model_version)
            spent = sum(cost[c.source] for c in computed)
            message = f"{len(computed)} value(s) computed ({', '.join(sorted({c.source for c in computed}))}), " \
                      f"cost {spent:g}; campaign cost so far {engine.cost_spent:g}"
            logger.info(message)
            if on_computed is not None:
                on_computed(message)
        experiments = [p for p in proposals if not (isinstance(p, FidelityProposal) and p.is_computation)]
        if experiments:
            return experiments
        proposals = again()
    logger.warning("the engine asked for computations %d rounds in a row; no experiment proposed", MAX_COMPUTE_ROUNDS)
    return []


def restore_computed(engine: Engine, store: Store, campaign_id: int) -> int:
    """Teach a resumed multi-fidelity engine every value kept for the campaign; returns how many."""
    from sdl.engine.fidelity import Computation
    from sdl.engine.multifidelity import MultiFidelityEngine

    if not isinstance(engine, MultiFidelityEngine):
        return 0
    known = {s.name for s in engine.sources}
    rows = [Computation(k, s, v) for k, s, v in store.computed_values(campaign_id) if s in known]
    engine.observe_computed(rows)
    return len(rows)
