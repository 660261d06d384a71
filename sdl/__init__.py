"""sdl: the core of a self-driving materials laboratory.

Campaign schema, knowledge repository, active-learning engine and the Prefect flows
that close the loop. Heavy dependencies (torch, prefect) are imported lazily by the
modules that need them, so ``sdl.config`` and ``sdl.repository`` stay light.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
