"""Named steps of a long start-up (loading, starting simulators, featurising, fitting), for people.

Why a logger of its own: ``sdl run`` must say what it is doing from its first second, but most of
the steps happen deep in the lab and the engine, inside a Prefect flow run. They are published as
INFO records on the ``sdl.steps`` logger: the CLI shows the latest one beside its progress bar, the
log file and Prefect's run logs keep them all, and the modules that announce a step need to know
nothing about terminals. This module imports nothing heavy.
"""

from __future__ import annotations

import logging

__all__ = ["STEP_LOGGER", "UPDATE", "step"]

STEP_LOGGER = "sdl.steps"
UPDATE = "sdl_step_update"
"""Attribute set on records that update the current step (``featurising 120 / 400``) rather than start one."""

_logger = logging.getLogger(STEP_LOGGER)


def step(message: str, *args: object, update: bool = False) -> None:
    """Announce the step that starts now (``%``-style arguments, like logging).

    Args:
        update: The same step, further on (a count): a terminal shows it in place of the last one.
    """
    _logger.info(message, *args, extra={UPDATE: update})
