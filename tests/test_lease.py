"""One runner per campaign: the lease on SQLite and PostgreSQL, with real OS processes racing for it."""

from __future__ import annotations

import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from sdl.exceptions import RepositoryError
from sdl.repository import CampaignLease, CampaignLocked, Store, hold_lease

ROUNDS = 4
RACERS = 3




def _campaign(store: Store, name: str = "demo") -> int:
    return store.get_or_create_campaign(name, snapshot={"name": name}, config_hash="h", seed=0, budget=4).id


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # exited and reaped: the pid names no process
    return proc.pid


def test_second_acquire_raises_with_one_line_message(store: Store) -> None:
    cid = _campaign(store)
    token = store.acquire_lease(cid, holder="sdl run", host="lab-pc", pid=4711)
    lease = store.lease(cid)
    assert lease is not None
    assert (lease.token, lease.holder, lease.host, lease.pid) == (token, "sdl run", "lab-pc", 4711)
    with pytest.raises(CampaignLocked) as info:
        store.acquire_lease(cid, holder="sdl run", host="other-pc", pid=1)
    message = str(info.value)
    since = lease.acquired_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert message == (
        f"campaign 'demo' is being run by sdl run on host lab-pc (pid 4711) since {since}; "
        "stop it first, or wait 30 s if that process is dead"
    )
    assert re.search(r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ;", message) and "\n" not in message
    err = info.value
    assert (err.campaign, err.holder, err.host, err.pid) == ("demo", "sdl run", "lab-pc", 4711)
    assert err.since == lease.acquired_at
    with pytest.raises(CampaignLocked, match="wait 5 s"):
        store.acquire_lease(cid, holder="x", host="other-pc", pid=1, stale_after_s=5)
    # the holder itself may renew, and take it again with its own token (no takeover logged)
    store.renew_lease(cid, token)
    assert store.acquire_lease(cid, holder="sdl run", host="lab-pc", pid=4711, token=token) == token
    assert store.events(cid, kind="campaign.lease_taken_over") == []
    # a second campaign is independent
    other = _campaign(store, "other")
    assert store.acquire_lease(other, holder="sdl run", host="lab-pc", pid=4711) != token


def test_stale_heartbeat_is_taken_over(store: Store) -> None:
    cid = _campaign(store)
    old = store.acquire_lease(cid, holder="sdl run", host="lab-pc", pid=4711)
    time.sleep(0.3)
    with pytest.raises(CampaignLocked):
        store.acquire_lease(cid, holder="sdl run", host="pc-2", pid=99)  # 30 s: not stale yet
    new = store.acquire_lease(cid, holder="sdl run", host="pc-2", pid=99, stale_after_s=0.2)
    assert new != old
    lease = store.lease(cid)
    assert lease is not None and (lease.token, lease.host, lease.pid) == (new, "pc-2", 99)
    (event,) = store.events(cid, kind="campaign.lease_taken_over")
    assert event.level == "warning" and event.payload is not None
    assert {k: event.payload["old"][k] for k in ("holder", "host", "pid")} == {
        "holder": "sdl run", "host": "lab-pc", "pid": 4711}
    assert event.payload["new"] == {"holder": "sdl run", "host": "pc-2", "pid": 99}
    assert "no heartbeat" in event.payload["reason"] and "token" not in event.payload["old"]
    # the old runner learns it at its next heartbeat, and its release changes nothing
    with pytest.raises(CampaignLocked, match=r"taken over by sdl run on host pc-2 \(pid 99\)"):
        store.renew_lease(cid, old)
    store.release_lease(cid, old)
    assert store.lease(cid).token == new  # type: ignore[union-attr]


def test_dead_pid_on_this_host_is_taken_over_at_once(store: Store) -> None:
    cid = _campaign(store)
    here = socket.gethostname()
    pid = _dead_pid()
    store.acquire_lease(cid, holder="sdl run", host=here, pid=pid)
    new = store.acquire_lease(cid, holder="sdl run", host=here, pid=os.getpid(), stale_after_s=3600)
    (event,) = store.events(cid, kind="campaign.lease_taken_over")
    assert event.payload is not None and event.payload["reason"] == f"pid {pid} no longer exists on {here}"
    # a live pid on this host, or a dead-looking pid on another host, is not taken over
    with pytest.raises(CampaignLocked, match=f"pid {os.getpid()}"):
        store.acquire_lease(cid, holder="sdl run", host=here, pid=12345, stale_after_s=3600)
    store.release_lease(cid, new)
    store.acquire_lease(cid, holder="sdl run", host="elsewhere", pid=pid)
    with pytest.raises(CampaignLocked, match="host elsewhere"):
        store.acquire_lease(cid, holder="sdl run", host=here, pid=os.getpid(), stale_after_s=3600)


def test_release_then_acquire(store: Store) -> None:
    cid = _campaign(store)
    token = store.acquire_lease(cid, holder="a", host="h1", pid=1)
    store.release_lease(cid, "not-the-token")  # no-op
    assert store.lease(cid) is not None
    store.release_lease(cid, token)
    assert store.lease(cid) is None
    store.release_lease(cid, token)  # again: still a no-op
    again = store.acquire_lease(cid, holder="b", host="h2", pid=2)
    assert again != token and store.lease(cid).holder == "b"  # type: ignore[union-attr]
    store.release_lease(cid, again)
    with pytest.raises(CampaignLocked, match="lease is gone"):
        store.renew_lease(cid, again)  # released (here: by itself): a heartbeat must not revive it
    with pytest.raises(RepositoryError, match="no campaign with id=9999"):
        store.acquire_lease(9999, holder="a", host="h", pid=1)
    with pytest.raises(ValueError, match="stale_after_s"):
        store.acquire_lease(cid, holder="a", host="h", pid=1, stale_after_s=0)


def test_hold_lease_heartbeats_and_releases(store: Store) -> None:
    cid = _campaign(store)
    with hold_lease(store, cid, holder="sdl run", heartbeat_s=0.1, stale_after_s=5.0) as lease:
        assert isinstance(lease, CampaignLease) and lease.pid == os.getpid() and lease.host == socket.gethostname()
        first = store.lease(cid)
        assert first is not None and first.token == lease.token
        deadline = time.monotonic() + 5
        while store.lease(cid).heartbeat_at == first.heartbeat_at:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no heartbeat within 5 s"
            time.sleep(0.05)
        with pytest.raises(CampaignLocked, match="being run by sdl run"):
            store.acquire_lease(cid, holder="other", host="pc-2", pid=2)
        lease.check()
    assert store.lease(cid) is None
    with pytest.raises(RuntimeError, match="boom"), hold_lease(store, cid, holder="sdl run", heartbeat_s=0.1):
        raise RuntimeError("boom")
    assert store.lease(cid) is None  # released on the exception too
    with pytest.raises(ValueError, match="heartbeat_s"):
        hold_lease(store, cid, holder="x", heartbeat_s=30, stale_after_s=30)


def test_lost_lease_is_reported_and_not_released(store: Store) -> None:
    cid = _campaign(store)
    lost: list[CampaignLocked] = []
    with hold_lease(store, cid, holder="sdl run", heartbeat_s=0.1, stale_after_s=5.0, on_lost=lost.append) as lease:
        for _ in range(100):  # an impatient runner elsewhere calls even a fresh heartbeat stale
            try:
                thief = store.acquire_lease(cid, holder="thief", host="pc-2", pid=2, stale_after_s=0.001)
                break
            except CampaignLocked:
                time.sleep(0.01)
        else:
            pytest.fail("could not take the lease over")
        deadline = time.monotonic() + 5
        while lease.lost is None:
            assert time.monotonic() < deadline, "the heartbeat never noticed"
            time.sleep(0.02)
        with pytest.raises(CampaignLocked, match="taken over by thief on host pc-2"):
            lease.check()
        assert lost == [lease.lost]
    assert store.lease(cid).token == thief  # type: ignore[union-attr]


def _racer(url: str, campaign_id: int, index: int, barrier: Any, results: Any) -> None:
    """One OS process: each round, acquire at the barrier, report, hold until all reported, release."""
    store = Store.from_url(url)
    try:
        for round_ in range(ROUNDS):
            barrier.wait(timeout=60)
            try:
                token: str | None = store.acquire_lease(
                    campaign_id, holder=f"racer-{index}", host=socket.gethostname(), pid=os.getpid()
                )
                results.put((round_, index, "won", ""))
            except CampaignLocked as exc:
                token = None
                results.put((round_, index, "locked", str(exc)))
            barrier.wait(timeout=60)  # the winner stays alive until every racer has tried
            if token is not None:
                store.release_lease(campaign_id, token)
            barrier.wait(timeout=60)
    finally:
        store.close()


def test_racing_processes_exactly_one_wins(store: Store) -> None:
    cid = _campaign(store)
    url = store.engine.url.render_as_string(hide_password=False)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(RACERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_racer, args=(url, cid, i, barrier, results)) for i in range(RACERS)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in range(ROUNDS * RACERS)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for round_ in range(ROUNDS):
        mine = [r for r in reports if r[0] == round_]
        winners = [index for _, index, outcome, _ in mine if outcome == "won"]
        assert len(winners) == 1, mine
        for _, _, outcome, message in mine:
            if outcome == "locked":
                assert message.startswith(f"campaign 'demo' is being run by racer-{winners[0]} on host ")
    assert store.lease(cid) is None
    assert store.events(cid, kind="campaign.lease_taken_over") == []
