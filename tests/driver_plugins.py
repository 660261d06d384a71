"""A second instrument driver, named in YAML (``driver: driver_plugins:CountingRobot``), for tests.

It is a plain subclass of the shipped Ophyd robot that counts what the lab asks of it: proof that a
driver plugs in through the instrument port without touching the lab.
"""

from __future__ import annotations

from typing import Any

from devices.robot import SynthesisRobot

CALLS: dict[str, int] = {"set": 0, "ping": 0, "job": 0}


class CountingRobot(SynthesisRobot):
    """The SDL/1 robot, counting ``set``, ``ping`` and ``job`` calls."""

    def set(self, recipe: dict[str, Any]) -> Any:
        CALLS["set"] += 1
        return super().set(recipe)

    def ping(self) -> None:
        CALLS["ping"] += 1
        super().ping()

    def job(self, job_id: str) -> dict[str, Any]:
        CALLS["job"] += 1
        return super().job(job_id)
