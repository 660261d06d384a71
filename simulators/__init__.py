"""Simulated instruments that speak the SDL/1 protocol, backed by real recorded data."""

from __future__ import annotations

from simulators.faults import FaultInjector, FaultRates
from simulators.worlds import CrystalWorld, TableWorld, World, WorldError, load_world

__all__ = ["FaultInjector", "FaultRates", "CrystalWorld", "TableWorld", "World", "WorldError", "load_world"]
