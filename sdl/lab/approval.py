"""Approval of proposed batches (``acquisition.approval: required``): a person accepts, drops or edits.

Why proposals wait *before* they become experiments: a dropped proposal then never counts
against the budget or the failure rules, yet it is recorded (an ``approvals`` row with who, when
and through what) and its candidate is never proposed again. An accepted or edited proposal is
committed as an ``experiment`` like any other, linked to its approval row.

Two doors, one wait: the batch is stored as ``pending`` approvals, every channel is told (the
Prefect flow run pauses with an input form: :mod:`sdl.flows`), and the wait ends on whichever
answers first: ``sdl approve`` (it writes the decisions into the repository) or a channel (the
Prefect form; the lab writes the decisions). A cancel or an interrupt ends the wait; the pending
rows are then superseded and the next run proposes again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sdl.repository.control import (
    ApprovalRecord,
    add_pending_approvals,
    approvals,
    decide_approvals,
    supersede_pending,
)

if TYPE_CHECKING:
    from sdl.engine import Proposal
    from sdl.lab.laboratory import Lab

__all__ = ["ApprovalChannel", "Review", "apply_review", "approved", "wait_for_approval"]

logger = logging.getLogger(__name__)


@dataclass
class Review:
    """What a person decided about a waiting batch (ids are approval ids; the rest is accepted).

    Attributes:
        by: Who decided.
        via: Through what (``cli``, ``prefect-ui``).
        drop: Proposals not to run (their candidates are never proposed again).
        edit: Proposal → the candidate id to run instead.
    """

    by: str
    via: str
    drop: list[int] = field(default_factory=list)
    edit: dict[int, str] = field(default_factory=dict)


class ApprovalChannel(Protocol):
    """Another place where a person may answer (the Prefect UI)."""

    def opened(self, pending: Sequence[ApprovalRecord]) -> None:
        """The batch waits: show it (e.g. pause the flow run with a form)."""

    def poll(self) -> Review | None:
        """A decision made through this channel, or None yet."""

    def closed(self) -> None:
        """The batch was decided (maybe elsewhere): stop showing it."""


def apply_review(lab: Lab, pending: Sequence[ApprovalRecord], review: Review) -> list[ApprovalRecord]:
    """Store ``review`` for the waiting batch: every proposal gets its decision.

    A form cannot be refused once Prefect resumed the run, so an id that is not in the batch is
    ignored and an edit to a candidate that is not in the pool (or already pending or excluded)
    leaves that proposal accepted as it was; both are logged and kept in the event log.
    """
    ids = {p.id for p in pending}
    pool = lab.engine.pool
    taken = set(lab.ledger.pending_keys()) | set(lab.ledger.excluded_keys()) | {p.candidate_key for p in pending}
    edits: dict[int, tuple[str, Mapping[str, Any]]] = {}
    ignored: list[str] = [f"{i}: not waiting" for i in sorted((set(review.drop) | set(review.edit)) - ids)]
    for approval_id, key in review.edit.items():
        if approval_id not in ids or approval_id in review.drop:
            continue
        if pool is None or key not in pool or key in taken:
            ignored.append(f"{approval_id}: {key!r} is not a free candidate of the pool")
            continue
        edits[approval_id] = (key, pool.params(pool.index_of(key)))
        taken.add(key)
    if ignored:
        logger.warning("campaign %s: approval by %s: ignored %s", lab.cfg.name, review.by, "; ".join(ignored))
        lab.event("approval.ignored", f"{review.by} via {review.via}: ignored {'; '.join(ignored)}", level="warning")
    decisions = {p.id: ("dropped" if p.id in review.drop else "edited" if p.id in edits else "accepted")
                 for p in pending}
    return decide_approvals(lab.store, lab.campaign_id, decisions, by=review.by, via=review.via, edits=edits)


def approved(lab: Lab, proposals: Sequence[Proposal], decided: Sequence[ApprovalRecord]) -> list[tuple[Proposal, int]]:
    """The proposals to commit (edits applied), each with its approval id; dropped keys are excluded."""
    out: list[tuple[Proposal, int]] = []
    for proposal, record in zip(proposals, sorted(decided, key=lambda r: r.id), strict=True):
        if record.decision == "dropped":
            lab.ledger.exclude(proposal.key)
            continue
        if record.decision == "edited" and record.edited_candidate_key:
            proposal = dataclasses.replace(proposal, key=record.edited_candidate_key,
                                           params=dict(record.edited_params or {}), acquisition_value=None,
                                           predicted_mean=None, predicted_std=None, predictions=None, strategy="person")
        out.append((proposal, record.id))
    return out


def wait_for_approval(lab: Lab, proposals: Sequence[Proposal],
                      channels: Sequence[ApprovalChannel] = ()) -> list[tuple[Proposal, int]]:
    """Store the batch as pending, wait for a person, return what to run (empty when cancelled)."""
    ids = set(add_pending_approvals(lab.store, lab.campaign_id, [
        {"candidate_key": p.key, "params": p.params, "batch_id": p.batch_id,
         "predicted_mean": p.predicted_mean, "predicted_std": p.predicted_std} for p in proposals]))
    pending = [a for a in approvals(lab.store, lab.campaign_id, decision="pending") if a.id in ids]
    listing = ", ".join(f"{a.id}: {a.candidate_key}" for a in pending)
    logger.warning("campaign %s: %d proposal(s) wait for approval (%s): sdl approve %s [--drop ID]",
                   lab.cfg.name, len(pending), listing, lab.cfg.name)
    lab.event("approval.waiting", f"waiting for approval: {listing}", payload={"approvals": [a.id for a in pending]})
    for channel in channels:
        channel.opened(pending)
    try:
        while True:
            lab.poll_control()
            if lab.interrupted is not None:
                supersede_pending(lab.store, lab.campaign_id, "run stopped while waiting")
                return []
            rows = [a for a in approvals(lab.store, lab.campaign_id) if a.id in ids]
            if all(a.decision != "pending" for a in rows):  # decided through the repository (sdl approve)
                return approved(lab, proposals, rows)
            for channel in channels:
                review = channel.poll()
                if review is not None:
                    return approved(lab, proposals, apply_review(lab, pending, review))
            lab.wait_for_change(0.5)
    finally:
        for channel in channels:
            channel.closed()
