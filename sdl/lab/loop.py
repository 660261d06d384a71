"""The closed loop over a :class:`~sdl.lab.laboratory.Lab`: one experiment to its end, and the campaign.

Plain functions on purpose: ``sdl/flows.py`` passes Prefect tasks for the steps and the proposal,
:func:`run_plain` passes threads and plain retries, and both share every decision made here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, TypeVar

from sdl.exceptions import InstrumentError, MaterialFailure
from sdl.lab.instruments import ROBOT, STATION, InstrumentOutage
from sdl.lab.laboratory import Interrupted, Lab, Outcome, Ticket

__all__ = ["drive", "run_experiment", "run_plain", "with_retries"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class _Done(Protocol):
    def done(self) -> bool: ...


F = TypeVar("F", bound=_Done)


def with_retries(
    step: Callable[[Ticket], T],
    attempts: int = 3,
    delay: float = 0.1,
    *,
    delays: Sequence[float] | None = None,
    log: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
) -> Callable[[Ticket], T]:
    """Retry ``step`` on instrument faults only (never a material failure or a bug).

    The retry is safe because the job id (the experiment's idempotency key) makes the instrument
    answer with the job it already has. The flow uses it inside its one task run per experiment
    (a task run per step cost 12 ms of CPU per experiment) with the task run's logger, so each
    retry still shows in the UI.

    Args:
        step: The instrument step (``Lab.synthesize`` / ``Lab.characterize``).
        attempts: Tries in all (1 + retries).
        delay: Seconds before retry ``k`` are ``delay * k`` unless ``delays`` is given.
        delays: Seconds before each retry (the last one repeats), as Prefect's ``retry_delay_seconds``.
        log: Where each retry is logged (default: this module's logger).
    """
    out = log if log is not None else logger
    name = getattr(step, "__name__", "step")

    def run(ticket: Ticket) -> T:
        for attempt in range(1, attempts + 1):
            try:
                return step(ticket)
            except InstrumentError as exc:
                if attempt == attempts:
                    raise
                wait = delays[min(attempt, len(delays)) - 1] if delays else delay * attempt
                out.warning("experiment %d: %s: %s; retry %d of %d in %.1f s", ticket.experiment_id, name, exc,
                            attempt, attempts - 1, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    return run


def run_experiment(
    lab: Lab,
    ticket: Ticket,
    *,
    synthesize: Callable[[Ticket], object] | None = None,
    characterize: Callable[[Ticket], float] | None = None,
) -> Outcome:
    """Carry one experiment to its end state: synthesis, characterization, record.

    Args:
        lab: The campaign's lab.
        ticket: The experiment (``stage`` says where a resumed experiment starts).
        synthesize: The synthesis step (default :meth:`Lab.synthesize`; the flow passes a Prefect
            task with retries). Must raise ``MaterialFailure`` / ``InstrumentError``.
        characterize: The characterization step, returning the ``ok`` value.

    Returns:
        ``completed``; ``failed`` for a material failure (never retried); ``abandoned`` when an
        instrument fault outlived the retries or an abort stopped a job; the experiment's unchanged
        state (``proposed`` / ``running``) when an outage or an interrupt holds it for the next run.
    """
    synthesize = synthesize or lab.synthesize
    characterize = characterize or lab.characterize
    value: float | None = None
    try:
        if ticket.stage == "synthesis":
            synthesize(ticket)
            ticket.stage = "characterization"
            lab.notify()
        if ticket.stage == "record":
            value = lab.measured_value(ticket.experiment_id)
            if value is None:
                ticket.stage = "characterization"
        if ticket.stage == "characterization":
            value = characterize(ticket)
        assert value is not None
        return lab.complete(ticket, value)
    except MaterialFailure as exc:
        lab.event("experiment.material_failure", str(exc), experiment_id=ticket.experiment_id, level="warning")
        return lab.fail(ticket, exc)
    except InstrumentOutage as exc:
        if lab.interrupted is not None:
            return lab.hold(ticket, "interrupted while its instrument was down")
        lab.ledger.fail(str(exc))
        lab.pool.close_leases(str(exc))
        return lab.hold(ticket, str(exc))
    except Interrupted as exc:
        if exc.aborted:  # a job was aborted on its instrument: the sample is gone
            return lab.abandon(ticket, exc)
        return lab.hold(ticket, str(exc))
    except InstrumentError as exc:
        lab.event("experiment.instrument_failure", str(exc), experiment_id=ticket.experiment_id, level="error")
        return lab.abandon(ticket, exc)
    except Exception as exc:
        if lab.ledger.failure is not None:  # a lease refused because the campaign is failing
            return lab.hold(ticket, str(exc))
        raise


def drive(
    lab: Lab,
    submit: Callable[[Ticket], F],
    on_done: Callable[[Ticket, F], None],
    *,
    propose: Callable[[int], list[Ticket]] | None = None,
    poll: float = 0.5,
) -> None:
    """The closed loop: resume, then propose batches (or one per free robot) until a rule stops it.

    Args:
        lab: The campaign's lab (already started).
        submit: Starts one experiment concurrently (e.g. a Prefect task's ``submit``) and returns
            a future-like object with ``done()``.
        on_done: Called in this thread for each finished future (progress, artifacts); may raise
            to stop the campaign (it then stays resumable).
        propose: Proposes ``n`` experiments (default :meth:`Lab.propose`; the flow passes a task).
        poll: Longest wait between two looks at the futures (an instrument freeing wakes it earlier).
    """
    propose = propose or lab.propose
    running: dict[F, Ticket] = {}
    try:
        for ticket in lab.recover():
            running[submit(ticket)] = ticket
        while True:
            lab.poll_control()  # sdl pause / resume / cancel, the Prefect UI's Cancel
            wanted = lab.wanted()
            if wanted:
                lab.grow_pool()  # between rounds: new generated candidates before the next proposal
            for ticket in propose(wanted) if wanted else []:
                running[submit(ticket)] = ticket
            done = [f for f in running if f.done()]
            for future in done:
                on_done(running.pop(future), future)
            if not running and lab.wanted() == 0 and not lab.paused:
                break
            if not done:
                lab.wait_for_change(poll)
    except BaseException as exc:  # Prefect's TerminationSignal (a runner's cancel), KeyboardInterrupt
        if isinstance(exc, Exception):
            raise
        _abort_in_flight(lab, running, exc)
        raise


def _abort_in_flight(lab: Lab, running: dict[F, Ticket], exc: BaseException, wait_s: float = 60.0) -> None:
    """The process is being torn down: abort the jobs in flight, wait until each is recorded, record the end."""
    logger.warning("campaign %s: %s: aborting %d experiment(s) in flight", lab.cfg.name, type(exc).__name__,
                   len(running))
    if lab.control is not None:
        lab.control.cancel(f"{type(exc).__name__} (a Prefect cancellation or a signal)")
    else:
        lab.interrupt("abort", type(exc).__name__)
    deadline = time.monotonic() + wait_s
    while any(not f.done() for f in running) and time.monotonic() < deadline:
        lab.wait_for_change(0.2)
    try:
        lab.finish()
    except Exception:
        logger.exception("campaign %s: could not record how it ended", lab.cfg.name)


def run_plain(lab: Lab, *, on_outcome: Callable[[Outcome], None] | None = None, retries: int = 3) -> str:
    """Run the whole campaign without Prefect (threads, plain retries): tests and scripts.

    Returns:
        The campaign's end state (:meth:`Lab.finish`).
    """
    workers = max(lab.pool.count(ROBOT) + lab.pool.count(STATION), int(lab.cfg.acquisition.batch_size))
    synth, char = with_retries(lab.synthesize, retries), with_retries(lab.characterize, retries)

    def done(ticket: Ticket, future: Future[Outcome]) -> None:
        outcome = future.result()
        if on_outcome is not None:
            on_outcome(outcome)

    with ThreadPoolExecutor(max_workers=max(2, workers), thread_name_prefix="experiment") as executor:
        drive(lab, lambda t: executor.submit(run_experiment, lab, t, synthesize=synth, characterize=char), done)
    return lab.finish()
