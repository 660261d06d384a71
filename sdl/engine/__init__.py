"""The engine's room: what proposes the next experiments from the measurements so far.

Pieces: :mod:`sdl.engine.engine` (``Engine.propose/observe`` over one surrogate and one selection
rule), :mod:`sdl.engine.models` (surrogates: GP, pretrained crystal model with heads, from-scratch
ensemble, random), :mod:`sdl.engine.acquisition` and :mod:`sdl.engine.optim` (acquisition and batch
selection), :mod:`sdl.engine.space` (parameters and candidate pools), :mod:`sdl.engine.objectives`
(what "better" means), :mod:`sdl.engine.graphs` (crystal graphs), :mod:`sdl.engine.uq` (uncertainty
quality). Names are loaded lazily, so that ``sdl.engine.objectives`` (used by the lab and the
repository) does not import torch and BoTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdl.engine.engine import (
        GP_HEAD_MAX_LABELS,
        STRATEGIES,
        AcquisitionSelection,
        Engine,
        MaxVarianceSelection,
        Observation,
        PoolRound,
        Proposal,
        RandomSelection,
        Selection,
        SpaceRound,
        ThompsonSelection,
        build_selection,
        build_surrogate,
    )

__all__ = [
    "STRATEGIES", "Engine", "Observation", "Proposal", "Selection", "AcquisitionSelection", "MaxVarianceSelection",
    "ThompsonSelection", "RandomSelection", "PoolRound", "SpaceRound", "build_surrogate", "build_selection",
    "GP_HEAD_MAX_LABELS",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("sdl.engine.engine"), name)
    raise AttributeError(f"module 'sdl.engine' has no attribute {name!r}")
