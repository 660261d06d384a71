"""Control requests and approvals in the repository: what people ask of a running campaign.

Why the repository and not signals or the Prefect API alone: ``sdl pause/resume/cancel/approve``
may run on another host than ``sdl run``, and the campaign may run in ephemeral Prefect mode
(no server to talk to). Every process can reach the database; the runner polls it. Each request
is one committed transaction plus one ``events`` row, like every other state change.
"""

from __future__ import annotations

import datetime as dt
import getpass
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sdl.exceptions import RepositoryError
from sdl.repository.schema import APPROVAL_DECISIONS, CONTROL_STATES, Approval, Campaign, CampaignControl, utcnow
from sdl.repository.store import Store, to_jsonable

__all__ = [
    "ApprovalRecord",
    "ControlRecord",
    "add_pending_approvals",
    "approvals",
    "control_of",
    "decide_approvals",
    "link_approval",
    "person",
    "reset_control",
    "set_control",
    "set_flow_run",
    "supersede_pending",
]


def person() -> str:
    """``user@host`` of this process: who asked (stored with every request and decision)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass(frozen=True)
class ControlRecord:
    """A campaign's control row (``state``: running, paused, cancelling or cancelled)."""

    campaign_id: int
    state: str
    requested_by: str
    reason: str
    flow_run_id: str | None
    updated_at: dt.datetime


@dataclass(frozen=True)
class ApprovalRecord:
    """One proposal that waited for a person and what was decided about it."""

    id: int
    campaign_id: int
    batch_id: str | None
    candidate_key: str
    params: dict[str, Any]
    predicted_mean: float | None
    predicted_std: float | None
    decision: str
    edited_candidate_key: str | None
    edited_params: dict[str, Any] | None
    decided_by: str | None
    via: str | None
    experiment_id: int | None
    proposed_at: dt.datetime
    decided_at: dt.datetime | None


def _control(row: CampaignControl) -> ControlRecord:
    return ControlRecord(row.campaign_id, row.state, row.requested_by, row.reason, row.flow_run_id, row.updated_at)


def _approval(row: Approval) -> ApprovalRecord:
    return ApprovalRecord(
        row.id, row.campaign_id, row.batch_id, row.candidate_key, dict(row.params or {}), row.predicted_mean,
        row.predicted_std, row.decision, row.edited_candidate_key, row.edited_params, row.decided_by, row.via,
        row.experiment_id, row.proposed_at, row.decided_at,
    )


def control_of(store: Store, campaign_id: int) -> ControlRecord | None:
    """The campaign's control row, or None when nobody ever controlled it."""
    with store._tx("control_of") as s:
        row = s.get(CampaignControl, campaign_id)
        return None if row is None else _control(row)


def _row(s: Session, campaign_id: int) -> CampaignControl:
    row = s.get(CampaignControl, campaign_id, with_for_update=True)
    if row is None:
        row = CampaignControl(campaign_id=campaign_id, state="running", requested_by="", reason="",
                              updated_at=utcnow())
        s.add(row)
    return row


def set_control(store: Store, campaign_id: int, state: str, *, by: str, reason: str = "") -> ControlRecord:
    """Ask for ``state`` (paused, running, cancelling) or record it (cancelled): one event row."""
    if state not in CONTROL_STATES:
        raise RepositoryError(f"control state {state!r} is not one of {CONTROL_STATES}")
    with store._tx("set_control") as s:
        name = s.scalar(sa.select(Campaign.name).where(Campaign.id == campaign_id))
        if name is None:
            raise RepositoryError(f"no campaign with id={campaign_id}")
        row = _row(s, campaign_id)
        old = row.state
        row.state, row.requested_by, row.reason, row.updated_at = state, by, reason, utcnow()
        Store._event(s, f"campaign.control.{state}", f"campaign {name!r} {old} → {state} ({by})"
                     + (f": {reason}" if reason else ""), campaign_id=campaign_id,
                     payload={"from": old, "to": state, "by": by, "reason": reason})
        s.flush()
        return _control(row)


def reset_control(store: Store, campaign_id: int, *, older_than: dt.datetime) -> ControlRecord | None:
    """A new run starts unpaused: forget a request older than the run (none newer is lost)."""
    with store._tx("reset_control") as s:
        row = s.get(CampaignControl, campaign_id, with_for_update=True)
        if row is None or row.state == "running" or row.updated_at >= older_than:
            return None if row is None else _control(row)
        old = row.state
        row.state, row.reason, row.updated_at = "running", f"new run (was {old})", utcnow()
        Store._event(s, "campaign.control.running", f"campaign {campaign_id}: {old} → running (a new run)",
                     campaign_id=campaign_id, payload={"from": old, "to": "running"})
        s.flush()
        return _control(row)


def set_flow_run(store: Store, campaign_id: int, flow_run_id: str | None) -> None:
    """Record the Prefect flow run that drives the campaign now (for ``sdl status``)."""
    with store._tx("set_flow_run") as s:
        row = _row(s, campaign_id)
        row.flow_run_id = flow_run_id


# --------------------------------------------------------------------------- approvals


def add_pending_approvals(store: Store, campaign_id: int, proposals: Sequence[Mapping[str, Any]]) -> list[int]:
    """Store a proposed batch as ``pending`` approvals (keys: candidate_key, params, batch_id, predicted_*)."""
    with store._tx("add_pending_approvals") as s:
        rows = [
            Approval(campaign_id=campaign_id, batch_id=p.get("batch_id"), candidate_key=str(p["candidate_key"]),
                     params=to_jsonable(dict(p.get("params") or {})), predicted_mean=p.get("predicted_mean"),
                     predicted_std=p.get("predicted_std"), decision="pending", proposed_at=utcnow())
            for p in proposals
        ]
        s.add_all(rows)
        s.flush()
        Store._event(s, "approval.requested", f"{len(rows)} proposal(s) wait for approval",
                     campaign_id=campaign_id, payload={"approvals": [r.id for r in rows]})
        return [r.id for r in rows]


def approvals(store: Store, campaign_id: int, *, decision: str | None = None) -> list[ApprovalRecord]:
    """The campaign's approvals, oldest first (optionally only one decision, e.g. ``pending``)."""
    query = sa.select(Approval).where(Approval.campaign_id == campaign_id)
    if decision is not None:
        query = query.where(Approval.decision == decision)
    with store._tx("approvals") as s:
        return [_approval(r) for r in s.scalars(query.order_by(Approval.id))]


def decide_approvals(
    store: Store,
    campaign_id: int,
    decisions: Mapping[int, str],
    *,
    by: str,
    via: str,
    edits: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None,
) -> list[ApprovalRecord]:
    """Decide pending approvals at once: ``{approval id: accepted | dropped | edited}``.

    Every id must be pending (one decision per proposal, never overwritten); ``edits`` gives the
    candidate key and parameters a person chose instead, for the ``edited`` ones.

    Raises:
        RepositoryError: An id that is not a pending approval of this campaign (nothing written).
    """
    edits = edits or {}
    with store._tx("decide_approvals") as s:
        rows = {r.id: r for r in s.scalars(sa.select(Approval).where(
            Approval.campaign_id == campaign_id, Approval.id.in_(list(decisions))).with_for_update())}
        for approval_id, decision in decisions.items():
            row = rows.get(approval_id)
            if row is None or row.decision != "pending":
                raise RepositoryError(f"proposal {approval_id} is not waiting for approval in campaign {campaign_id}")
            if decision not in APPROVAL_DECISIONS or decision in ("pending", "superseded"):
                raise RepositoryError(f"decision {decision!r} is not accepted, dropped or edited")
            if decision == "edited" and approval_id not in edits:
                raise RepositoryError(f"proposal {approval_id}: an edit needs the new candidate or parameters")
        now = utcnow()
        for approval_id, decision in decisions.items():
            row = rows[approval_id]
            row.decision, row.decided_by, row.via, row.decided_at = decision, by, via, now
            if decision == "edited":
                key, params = edits[approval_id]
                row.edited_candidate_key, row.edited_params = key, to_jsonable(dict(params))
        counts = {d: sum(1 for v in decisions.values() if v == d) for d in ("accepted", "dropped", "edited")}
        Store._event(s, "approval.decided", f"{by} via {via}: " + ", ".join(f"{n} {d}" for d, n in counts.items()),
                     campaign_id=campaign_id, payload={"by": by, "via": via,
                                                       "decisions": {str(k): v for k, v in decisions.items()}})
        s.flush()
        return [_approval(rows[i]) for i in decisions]


def link_approval(store: Store, approval_id: int, experiment_id: int) -> None:
    """The experiment an accepted (or edited) proposal became."""
    with store._tx("link_approval") as s:
        row = s.get(Approval, approval_id, with_for_update=True)
        if row is None:
            raise RepositoryError(f"no approval with id={approval_id}")
        row.experiment_id = experiment_id


def supersede_pending(store: Store, campaign_id: int, why: str) -> int:
    """Pending approvals of a run that ended (or was cancelled) are superseded: asked again later."""
    with store._tx("supersede_pending") as s:
        rows = list(s.scalars(sa.select(Approval).where(
            Approval.campaign_id == campaign_id, Approval.decision == "pending").with_for_update()))
        for row in rows:
            row.decision, row.decided_at, row.via = "superseded", utcnow(), why[:50]
        if rows:
            Store._event(s, "approval.superseded", f"{len(rows)} pending proposal(s) superseded: {why}",
                         campaign_id=campaign_id)
        return len(rows)


def control_states(store: Store) -> dict[int, str]:
    """What ``sdl status`` shows beyond the campaign state: paused, awaiting approval, cancelling, cancelled.

    ``cancelled`` only while the campaign is stopped (a new run resets the row); ``paused`` and
    ``awaiting approval`` only while it runs.
    """
    with store._tx("control_states") as s:
        states: dict[int, str] = dict(s.execute(sa.select(Campaign.id, Campaign.state)).all())
        controls: dict[int, str] = dict(
            s.execute(sa.select(CampaignControl.campaign_id, CampaignControl.state)).all())
        waiting = set(s.scalars(sa.select(Approval.campaign_id).where(Approval.decision == "pending").distinct()))
    shown: dict[int, str] = {}
    for campaign_id, state in states.items():
        control = controls.get(campaign_id)
        if control == "cancelled" and state == "stopped":
            shown[campaign_id] = "cancelled"
        elif state == "running" and control in ("paused", "cancelling"):
            shown[campaign_id] = control
        elif state == "running" and campaign_id in waiting:
            shown[campaign_id] = "awaiting approval"
    return shown
