"""Random proposals: the baseline every benchmark reports beside the models.

Why a module for three lines: the benchmark's enhancement factors are ratios to this strategy,
so its draws must be as reproducible as the models' (a seeded generator per round) and must obey
the same rule (never a measured or pending candidate).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

__all__ = ["random_choice"]

logger = logging.getLogger(__name__)


def random_choice(available: Sequence[int] | np.ndarray, q: int, seed: int, round_index: int) -> list[int]:
    """``min(q, len(available))`` distinct entries of ``available``, uniform, seeded by ``(seed, round)``."""
    avail = np.asarray(available, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(round_index), 0x5D1])
    k = min(int(q), avail.shape[0])
    return avail[rng.choice(avail.shape[0], size=k, replace=False)].tolist() if k else []
