"""The instrument-step retry policy the flow's one task run per experiment applies (``with_retries``).

The flow used to get it from Prefect's task retries (a task run per step); it now retries inside
the experiment's task run, so the policy itself is checked here: instrument faults retried after
the configured delays and logged, material failures and bugs never retried.
"""

from __future__ import annotations

import logging

import pytest

from sdl.exceptions import InstrumentTimeout, MaterialFailure
from sdl.flows import INSTRUMENT_RETRIES, RETRY_DELAYS
from sdl.lab import Ticket, with_retries


def _ticket() -> Ticket:
    return Ticket(experiment_id=7, key="retry:7", job_id="retry-7", candidate_key="perov_1", params={},
                  recipe={"job_id": "retry-7", "candidate": "perov_1"})


class _Flaky:
    """An instrument step that times out ``faults`` times, then answers."""

    def __init__(self, faults: int, error: Exception) -> None:
        self.faults, self.error, self.calls = faults, error, 0
        self.__name__ = "synthesize"

    def __call__(self, ticket: Ticket) -> str:
        self.calls += 1
        if self.calls <= self.faults:
            raise self.error
        return f"done {ticket.job_id}"


def test_instrument_faults_are_retried_with_the_flow_policy_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    step = _Flaky(2, InstrumentTimeout("no reply to JOB?", instrument="robot"))
    log = logging.getLogger("test.retries")
    with caplog.at_level(logging.WARNING, logger="test.retries"):
        result = with_retries(step, INSTRUMENT_RETRIES + 1, delays=[0.0, 0.01], log=log)(_ticket())
    assert result == "done retry-7" and step.calls == 3
    lines = [r.getMessage() for r in caplog.records if r.name == "test.retries"]
    assert len(lines) == 2 and all("experiment 7: synthesize:" in s and "no reply to JOB?" in s for s in lines)
    assert "retry 1 of 3 in 0.0 s" in lines[0] and "retry 2 of 3 in 0.0 s" in lines[1]
    assert INSTRUMENT_RETRIES == len(RETRY_DELAYS) == 3  # the policy Prefect's task retries had


def test_retries_run_out_and_raise_the_last_fault() -> None:
    step = _Flaky(10, InstrumentTimeout("no reply"))
    with pytest.raises(InstrumentTimeout):
        with_retries(step, 3, delays=[0.0])(_ticket())
    assert step.calls == 3


@pytest.mark.parametrize("error", [MaterialFailure("sample lost"), ValueError("a bug")])
def test_material_failures_and_bugs_are_never_retried(error: Exception) -> None:
    step = _Flaky(1, error)
    with pytest.raises(type(error)):
        with_retries(step, INSTRUMENT_RETRIES + 1, delays=RETRY_DELAYS)(_ticket())
    assert step.calls == 1
