"""Surrogate models: crystal GNN ensemble, GP baseline, composition descriptors, random baseline.

The engine sees each through one interface, :class:`sdl.models.surrogate.Surrogate`.

Submodules import torch/botorch/pymatgen; import them directly (``from sdl.models.gp import fit_gp``)
so that ``import sdl.models`` stays cheap.
"""

from __future__ import annotations

__all__: list[str] = []
