"""The lab: the Prefect-free closed loop over instruments, repository and engine.

Rooms: :mod:`sdl.lab.ledger` (counts, batches, exclusions, stopping rules), :mod:`sdl.lab.instruments`
(the instrument port, the pool of free instruments, outages), :mod:`sdl.lab.laboratory` (the life of
one experiment, resume after a crash), :mod:`sdl.lab.loop` (the loop that drives experiments),
:mod:`sdl.lab.interrupts` (SIGINT / SIGTERM). The Prefect flow over them is ``sdl/flows.py``.
"""

from __future__ import annotations

from sdl.lab.instruments import (
    ROBOT,
    STATION,
    InstrumentOutage,
    InstrumentPool,
    InstrumentPort,
    OutageGuard,
)
from sdl.lab.laboratory import (
    Interrupted,
    Lab,
    Outcome,
    RoundReport,
    Ticket,
    campaign_token,
    job_id_for,
    open_lab,
    state_dir_for,
)
from sdl.lab.ledger import END_STATES, ExperimentLedger, StoppingPolicy
from sdl.lab.loop import drive, run_experiment, run_plain, with_retries

__all__ = [
    "END_STATES",
    "ROBOT",
    "STATION",
    "ExperimentLedger",
    "InstrumentOutage",
    "InstrumentPool",
    "InstrumentPort",
    "Interrupted",
    "Lab",
    "OutageGuard",
    "Outcome",
    "RoundReport",
    "StoppingPolicy",
    "Ticket",
    "campaign_token",
    "drive",
    "job_id_for",
    "open_lab",
    "run_experiment",
    "run_plain",
    "state_dir_for",
    "with_retries",
]
