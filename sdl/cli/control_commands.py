"""``sdl pause``, ``resume``, ``cancel``, ``approve`` and ``approvals``: act on a running campaign.

Each command writes one request into the repository (the running ``sdl run`` polls it about once
a second), so it works from any terminal or host that reaches the database, in ephemeral Prefect
mode too. A campaign is *running* when a live runner holds its lease. Bad input (an unknown
campaign, one that is not running, a proposal that is not waiting) is one line on stderr, exit 1,
and nothing written.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import typer
from rich.console import Console
from rich.table import Table

from sdl.cli.db_commands import DB_HELP, _die, _open, _plain
from sdl.repository import Store
from sdl.repository.control import (
    ApprovalRecord,
    approvals,
    control_of,
    decide_approvals,
    person,
    set_control,
)
from sdl.repository.schema import utcnow

__all__ = ["register"]

LIVE_LEASE_S = 30.0
"""A lease whose heartbeat is older than this belongs to a dead runner (the lease's stale time)."""


def _running_campaign(store: Store, name: str) -> int:
    """The id of the running campaign ``name``; otherwise one clear line and exit 1."""
    campaign = store.get_campaign(name)
    if campaign is None:
        known = ", ".join(c.name for c in store.campaigns()) or "none"
        _die(f"campaign {name!r}: no such campaign in {store.url} (known: {known})")
    lease = store.lease(campaign.id)
    alive = lease is not None and (utcnow() - lease.heartbeat_at).total_seconds() < LIVE_LEASE_S
    if not alive or campaign.state != "running":
        _die(f"campaign {name!r} is not running (state {campaign.state}; no live `sdl run` holds it)")
    return campaign.id


def _request(db: str | None, name: str, state: str, verb: str, by: str | None) -> tuple[Store, int]:
    store = _open(db)
    campaign_id = _running_campaign(store, name)
    current = control_of(store, campaign_id)
    now = current.state if current is not None else "running"
    if now == "cancelling":
        _die(f"campaign {name!r} is being cancelled already (asked by {current.requested_by if current else '?'})")
    if state == "running" and now != "paused":
        _die(f"campaign {name!r} is not paused: nothing to resume")
    if state == "paused" and now == "paused":
        Console().print(f"campaign {name} is already paused (by {current.requested_by if current else '?'})",
                        highlight=False)
        raise typer.Exit(0)
    set_control(store, campaign_id, state, by=by or person(), reason=f"sdl {verb}")
    return store, campaign_id


def pause(
    campaign: str = typer.Argument(..., help="Campaign name."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    by: str | None = typer.Option(None, "--by", help="Who asks (default: user@host)."),
) -> None:
    """Pause a running campaign: experiments in flight finish, nothing new is proposed or started."""
    store, _ = _request(db, campaign, "paused", "pause", by)
    store.close()
    Console().print(f"campaign {campaign}: pause requested (experiments in flight finish; `sdl resume {campaign}`)",
                    highlight=False)


def resume(
    campaign: str = typer.Argument(..., help="Campaign name."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    by: str | None = typer.Option(None, "--by", help="Who asks (default: user@host)."),
) -> None:
    """Resume a paused campaign."""
    store, _ = _request(db, campaign, "running", "resume", by)
    store.close()
    Console().print(f"campaign {campaign}: resumed", highlight=False)


def cancel(
    campaign: str = typer.Argument(..., help="Campaign name."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    by: str | None = typer.Option(None, "--by", help="Who asks (default: user@host)."),
    wait: float = typer.Option(90.0, "--wait", min=0.0, help="Seconds to wait until the runner has stopped (0: "
                               "do not wait)."),
) -> None:
    """Cancel a running campaign: jobs in flight are aborted and recorded abandoned; `sdl run` resumes it."""
    store, campaign_id = _request(db, campaign, "cancelling", "cancel", by)
    console = Console()
    try:
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            if store.lease(campaign_id) is None:
                record = store.get_campaign(campaign_id)
                console.print(f"campaign {campaign}: cancelled ({record.state if record else '?'}); "
                              f"`sdl run` resumes it to its budget", highlight=False)
                return
            time.sleep(0.5)
        if wait:
            _die(f"campaign {campaign!r}: cancel requested, but the runner had not stopped after {wait:g} s")
        console.print(f"campaign {campaign}: cancel requested", highlight=False)
    finally:
        store.close()


def approve(
    campaign: str = typer.Argument(..., help="Campaign name."),
    drop: list[int] = typer.Option([], "--drop", help="Proposal id not to run (repeatable); never proposed again."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    by: str | None = typer.Option(None, "--by", help="Who approves (default: user@host)."),
) -> None:
    """Approve the batch that waits (acquisition.approval: required), dropping the proposals named."""
    from sdl.exceptions import RepositoryError

    store = _open(db)
    try:
        campaign_id = _running_campaign(store, campaign)
        pending = approvals(store, campaign_id, decision="pending")
        if not pending:
            _die(f"campaign {campaign!r}: no proposals wait for approval")
        ids = {a.id for a in pending}
        unknown = sorted(set(drop) - ids)
        if unknown:
            _die(f"campaign {campaign!r}: --drop {unknown[0]}: not a proposal waiting for approval "
                 f"(waiting: {', '.join(str(i) for i in sorted(ids))})")
        decisions = {a.id: "dropped" if a.id in drop else "accepted" for a in pending}
        try:
            decided = decide_approvals(store, campaign_id, decisions, by=by or person(), via="cli")
        except RepositoryError as exc:  # decided elsewhere (the Prefect form) a moment ago
            _die(str(exc))
    finally:
        store.close()
    Console().print(f"campaign {campaign}: " + ", ".join(f"{d.id} {d.candidate_key} {d.decision}" for d in decided),
                    highlight=False)


def list_approvals(
    campaign: str = typer.Argument(..., help="Campaign name."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Who approved, dropped or edited which proposal, when, and through what."""
    store = _open(db)
    try:
        record = store.get_campaign(campaign)
        if record is None:
            _die(f"campaign {campaign!r}: no such campaign in {store.url}")
        rows = approvals(store, record.id)
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps([_row(a) for a in rows], indent=2))
        return
    table = Table(title=f"Approvals of {campaign}")
    for header in ("id", "candidate", "decision", "instead", "by", "via", "when", "experiment"):
        table.add_column(header)
    for a in rows:
        table.add_row(str(a.id), a.candidate_key, a.decision, a.edited_candidate_key or "", a.decided_by or "",
                      a.via or "", _when(a.decided_at), "" if a.experiment_id is None else str(a.experiment_id))
    Console(width=160).print(table)


def _row(a: ApprovalRecord) -> dict[str, object]:
    return {"id": a.id, "candidate_key": a.candidate_key, "batch_id": a.batch_id, "decision": a.decision,
            "edited_candidate_key": a.edited_candidate_key, "decided_by": a.decided_by, "via": a.via,
            "experiment_id": a.experiment_id, "predicted_mean": a.predicted_mean,
            "proposed_at": _plain(a.proposed_at), "decided_at": _plain(a.decided_at)}


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def register(app: typer.Typer) -> None:
    """Add pause, resume, cancel, approve and approvals to the sdl app."""
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("cancel")(cancel)
    app.command("approve")(approve)
    app.command("approvals")(list_approvals)
