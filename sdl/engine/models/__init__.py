"""Surrogate models: crystal GNN ensemble, GP baseline, composition descriptors, random baseline.

The engine sees each through one interface, :class:`sdl.engine.models.surrogate.Surrogate`.

Submodules import torch/botorch/pymatgen; import them directly (``from sdl.engine.models.gp import fit_gp``)
so that ``import sdl.engine.models`` stays cheap.
"""

from __future__ import annotations

__all__: list[str] = []
