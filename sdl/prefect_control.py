"""The Prefect side of pause / cancel / approval: the UI's Cancel button and the approval form.

How Prefect 3.8.8 delivers a cancellation (read in ``prefect/flow_engine.py``, ``runner/``):

* A flow run started in-process (``sdl run``) has no runner: a Cancel in the UI only moves the
  flow run to ``Cancelling`` and nothing tells the process. :func:`cancel_check` reads the flow
  run's state with the repository's control row (about every 2 s) and cancels the lab, which
  aborts its jobs, records them abandoned, releases its lease and returns ``Cancelled``.
* A deployment run (``sdl serve``) is a subprocess of a runner, whose observer sees
  ``Cancelling`` and sends SIGTERM; Prefect's own handler raises ``TerminationSignal`` in the main
  thread. :func:`sdl.lab.loop.drive` catches it, aborts and records the jobs in flight, then lets
  Prefect finish the run as Cancelled. Whichever comes first wins; both end the same way.

Approval: a batch waiting for a person pauses the flow run the way ``pause_flow_run`` does (a
``Paused`` state whose keyset holds the :class:`ApprovalInput` form), without blocking, so that
``sdl approve`` (through the repository) and a cancel are still heard while it waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import cast
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State
from prefect.input import RunInput
from prefect.input.run_input import Keyset, keyset_from_paused_state
from prefect.states import Paused, Running
from prefect.utilities.engine import propose_state_sync
from pydantic import Field

from sdl.lab.approval import Review
from sdl.lab.control import CancelCheck
from sdl.lab.laboratory import Lab
from sdl.repository.control import ApprovalRecord, set_flow_run

__all__ = ["ApprovalInput", "PrefectApproval", "attach", "cancel_check"]

logger = logging.getLogger(__name__)

APPROVAL_TIMEOUT_S = 30 * 24 * 3600
"""A Paused flow run fails when its pause expires: a month, since a person may be away."""


class ApprovalInput(RunInput):
    """The form the Prefect UI shows for a batch that waits (everything not dropped or replaced runs)."""

    approved_by: str = Field(default="prefect-ui", description="Who decides (stored with the decision).")
    drop: list[int] = Field(default_factory=list, description="Proposal ids not to run (never proposed again).")
    replace: dict[str, str] = Field(default_factory=dict,
                                    description="Proposal id → the candidate id to run instead.")


def cancel_check(flow_run_id: UUID, poll_s: float = 2.0) -> CancelCheck:
    """A check that says who cancelled once the flow run is Cancelling (the UI's Cancel button)."""
    last = [0.0]

    def check() -> str | None:
        if time.monotonic() - last[0] < poll_s:
            return None
        last[0] = time.monotonic()
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(flow_run_id).state
        if state is not None and (state.is_cancelling() or state.is_cancelled()):
            return f"Prefect (flow run {state.name})"
        return None

    return check


class PrefectApproval:
    """Pauses the flow run with an :class:`ApprovalInput` form while a batch waits.

    Args:
        flow_run_id: The campaign's flow run.
        poll_s: Shortest time between two reads of the flow run.
    """

    def __init__(self, flow_run_id: UUID, poll_s: float = 2.0) -> None:
        self.flow_run_id = flow_run_id
        self.poll_s = poll_s
        self._keyset: Keyset | None = None
        self._last = 0.0

    def opened(self, pending: Sequence[ApprovalRecord]) -> None:
        """Move the flow run to Paused and save the form (the UI then offers Resume with it)."""
        state: State[None] = Paused(timeout_seconds=APPROVAL_TIMEOUT_S, reschedule=False,
                                    pause_key=f"sdl-approval-{pending[0].id}")
        keyset = keyset_from_paused_state(state)
        state.state_details.run_input_keyset = {str(k): v for k, v in keyset.items()}
        lines = ["Proposals waiting for approval (drop or replace by id; the rest runs):", "",
                 "| id | candidate | predicted | std |", "|---|---|---|---|"]
        lines += [f"| {a.id} | {a.candidate_key} | {_fmt(a.predicted_mean)} | {_fmt(a.predicted_std)} |"
                  for a in pending]
        with get_client(sync_client=True) as client:
            result = propose_state_sync(client, state, flow_run_id=self.flow_run_id)
        if not result.is_paused():
            logger.warning("flow run %s could not be paused for approval (%s): use sdl approve", self.flow_run_id,
                           result.name)
            return
        ApprovalInput.with_initial_data(description="\n".join(lines)).save(keyset, flow_run_id=self.flow_run_id)
        self._keyset = keyset

    def poll(self) -> Review | None:
        """The form's answer once the run was resumed with it, else None."""
        if self._keyset is None or time.monotonic() - self._last < self.poll_s:
            return None
        self._last = time.monotonic()
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(self.flow_run_id).state
        if state is None or not state.is_running():
            return None
        answer = cast(ApprovalInput, ApprovalInput.load(self._keyset, flow_run_id=self.flow_run_id))  # sync context
        self._keyset = None
        return Review(by=answer.approved_by, via="prefect-ui", drop=list(answer.drop),
                      edit={int(k): v for k, v in answer.replace.items() if k.strip().isdigit()})

    def closed(self) -> None:
        """Decided elsewhere (``sdl approve``): the flow run leaves Paused."""
        if self._keyset is None:
            return
        self._keyset = None
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(self.flow_run_id).state
            if state is not None and state.is_paused():
                client.set_flow_run_state(self.flow_run_id, Running(message="approved with sdl approve"), force=True)


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def attach(lab: Lab) -> None:
    """Wire the running flow run into the lab: its Cancel button, its approval form, its id."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    if run_id is None:
        return
    flow_run_id = UUID(str(run_id))
    set_flow_run(lab.store, lab.campaign_id, str(flow_run_id))
    if lab.control is not None:
        lab.control.watch(cancel_check(flow_run_id))
    lab.approval_channels.append(PrefectApproval(flow_run_id))
