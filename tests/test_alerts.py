"""Alerts for real: a local HTTP receiver on 127.0.0.1 gets the notifications of real campaigns.

Targets are an apprise ``json://`` URL (its token a ``${VAR}`` expanded only when sent) and a
Prefect ``CustomWebhookNotificationBlock`` saved in the test harness; the campaigns are real
(simulators over pyserial, Bluesky plans, SQLite, a Prefect flow run): one reaches its goal, one
spends its budget without Prefect (and a rerun of it stays quiet), one loses its robot for good.
A receiver that never answers must neither block the lab nor stop it.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_lab import write_campaign

from sdl.config import load_campaign
from sdl.exceptions import CampaignConfigError
from sdl.lab.alerts import Alert, Notifier

TOKEN_VAR = "SDL_TEST_ALERT_TOKEN"


@dataclass
class Receiver:
    """A tiny HTTP server that keeps every POST (path, query, JSON body)."""

    server: ThreadingHTTPServer
    received: list[dict] = field(default_factory=list)
    hold: threading.Event | None = None  # set: answer; unset: keep the request waiting

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, path: str) -> str:
        return f"json://127.0.0.1:{self.port}/{path}"

    def titles(self, path: str) -> list[str]:
        return [r["body"]["title"] for r in self.received if r["path"] == f"/{path}"]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    box: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            raw = self.rfile.read(length)
            parsed = urllib.parse.urlsplit(self.path)
            rec = box[0]
            if rec.hold is not None:
                rec.hold.wait(60)
            rec.received.append({"path": parsed.path, "query": urllib.parse.parse_qs(parsed.query),
                                 "body": json.loads(raw or b"{}")})
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box[0]
    finally:
        if box[0].hold is not None:
            box[0].hold.set()
        server.shutdown()
        server.server_close()


def _with_alerts(path: Path, *targets: str, extra: str = "") -> Path:
    """Add ``notifications`` (and other top-level YAML) to a campaign written by ``write_campaign``."""
    listed = ", ".join(f"'{t}'" for t in targets)
    path.write_text(path.read_text() + f"notifications: [{listed}]\n" + extra)
    return path


def _body(received: list[dict], path: str, event: str) -> str:
    bodies = [r["body"]["message"] for r in received if r["path"] == f"/{path}" and f"event: {event}" in
              r["body"]["message"]]
    assert len(bodies) == 1, [r["body"] for r in received]
    return bodies[0]


# --------------------------------------------------------------------------- configuration


def test_an_unset_variable_in_a_notification_url_is_one_line_naming_the_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_VAR, raising=False)
    path = _with_alerts(write_campaign(tmp_path, name="unset"), "json://127.0.0.1:9/x?token=${" + TOKEN_VAR + "}")
    with pytest.raises(CampaignConfigError) as caught:
        load_campaign(path)
    line = len(path.read_text().splitlines())
    assert str(caught.value) == (f"{path}:{line} notifications[0]: environment variable {TOKEN_VAR!r} is not set "
                                 f"(referenced as ${{{TOKEN_VAR}}})")


def test_notification_urls_are_checked_and_stored_unexpanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TOKEN_VAR, "s3cret")
    bad = _with_alerts(write_campaign(tmp_path, name="bad-url"), "nosuchservice://host/x")
    with pytest.raises(CampaignConfigError, match=r"notifications\[0\]: apprise cannot use a nosuchservice:// URL"):
        load_campaign(bad)
    not_a_slug = _with_alerts(write_campaign(tmp_path, name="bad-slug"), "just words")
    with pytest.raises(CampaignConfigError, match=r"notifications\[0\]: 'just words' is neither an apprise URL"):
        load_campaign(not_a_slug)

    plain = load_campaign(write_campaign(tmp_path, name="same"))
    url = "json://127.0.0.1:9/x?token=${" + TOKEN_VAR + "}"
    cfg = load_campaign(_with_alerts(write_campaign(tmp_path, name="same"), url, "custom-webhook/lab-alerts"))
    assert cfg.notifications == [url, "custom-webhook/lab-alerts"]
    assert cfg.snapshot()["notifications"] == [url, "custom-webhook/lab-alerts"]
    assert "s3cret" not in json.dumps(cfg.snapshot())
    assert cfg.config_hash() == plain.config_hash()  # who is told is no part of the campaign


def test_each_end_of_a_campaign_is_one_event() -> None:
    from sdl.lab.alerts import end_event

    def ended(state: str, **kw: bool) -> str:
        return end_event(state, **{"interrupted": False, "goal_reached": False, "budget_spent": False, **kw})

    assert ended("failed", goal_reached=True, budget_spent=True) == "campaign.failed"
    assert ended("cancelled") == "campaign.cancelled"
    assert ended("stopped", interrupted=True, goal_reached=True) == "campaign.interrupted"
    assert ended("stopped", goal_reached=True, budget_spent=True) == "campaign.goal_reached"
    assert ended("completed", budget_spent=True) == "campaign.budget_spent"
    assert ended("stopped") == "campaign.stopped"
    alert = Alert("instrument.down", "demo", "robot at socket://x:1 did not answer", {"instrument": "robot"})
    assert (alert.title, alert.level) == ("sdl: campaign demo instrument down", "failure")
    assert alert.body == ("robot at socket://x:1 did not answer\n\nevent: instrument.down\ncampaign: demo\n"
                          "instrument: robot")


# --------------------------------------------------------------------------- delivery


def test_a_receiver_that_never_answers_neither_blocks_nor_raises(receiver: Receiver,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    receiver.hold = threading.Event()
    notifier = Notifier([receiver.url("slow")], timeout_s=0.5)
    notifier.send(Alert("campaign.failed", "slow", "robot gone"))
    assert notifier.sent == [] and notifier.failed == []  # send() queued it and returned
    with caplog.at_level("WARNING", logger="sdl.lab.alerts"):
        notifier.close(wait_s=60)
    assert len(notifier.failed) == 1 and notifier.sent == []
    assert "alert campaign.failed not delivered to json://127.0.0.1:" in caplog.text
    dead = Notifier(["json://127.0.0.1:1/nobody"], timeout_s=0.5)
    dead.send(Alert("campaign.stopped", "dead", "nothing"))
    dead.close(wait_s=60)
    assert len(dead.failed) == 1


def test_budget_spent_without_prefect_and_a_rerun_stays_quiet(receiver: Receiver, tmp_path: Path,
                                                               sqlite_url: str) -> None:
    from sdl.lab import open_lab, run_plain
    from sdl.repository import Store

    path = _with_alerts(write_campaign(tmp_path, name="spent", budget=3), receiver.url("plain"))
    cfg = load_campaign(path)
    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state", time_scale=0.05) as lab:
        assert run_plain(lab) == "completed"
        best = lab.best()
        cid = lab.campaign_id
    assert receiver.titles("plain") == ["sdl: campaign spent budget spent"]
    body = _body(receiver.received, "plain", "campaign.budget_spent")
    assert body.startswith("budget of 3 experiments reached\n")
    assert f"campaign id: {cid}" in body and "3 of 3 ended (3 completed, 0 failed, 0 abandoned" in body
    assert f"best so far: e_form = {best.value:.4g} eV ({best.candidate_key}, experiment {best.experiment_id})" in body
    assert receiver.received[0]["body"]["type"] == "success"
    with Store.from_url(sqlite_url) as store:  # who was told what stays in the event log
        sent = store.events(cid, "alert.sent")
    assert [e.payload["event"] for e in sent] == ["campaign.budget_spent"]
    assert sent[0].payload["target"] == receiver.url("plain")

    with open_lab(cfg, sqlite_url, state_dir=tmp_path / "state", time_scale=0.05) as lab:
        assert run_plain(lab) == "completed"
    assert len(receiver.received) == 1  # nothing new ended: nobody is told again

    with open_lab(cfg, sqlite_url, budget=5, state_dir=tmp_path / "state", time_scale=0.05) as lab:
        lab.interrupt("drain", "SIGINT")  # as the first Ctrl-C does, before anything new started
        assert run_plain(lab) == "stopped"
    assert receiver.titles("plain")[1:] == ["sdl: campaign spent interrupted"]
    assert receiver.received[1]["body"]["type"] == "warning"
    assert _body(receiver.received, "plain", "campaign.interrupted").startswith("interrupted (SIGINT)")


# --------------------------------------------------------------------------- in Prefect flow runs


def test_goal_reached_in_a_flow_run_reaches_apprise_and_a_prefect_block(
        harness: None, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from sdl.flows import run_campaign
    from sdl.repository import Store

    block = f"alerts-{uuid.uuid4().hex[:6]}"
    CustomWebhookNotificationBlock(name="sdl", url=f"http://127.0.0.1:{receiver.port}/block",
                                   json_data={"title": "{{subject}}", "message": "{{body}}"}).save(block)
    monkeypatch.setenv(TOKEN_VAR, "s3cret")
    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    name = f"goal-{uuid.uuid4().hex[:6]}"
    url = receiver.url("apprise") + "?-token=${" + TOKEN_VAR + "}"  # apprise: -name = a GET parameter
    path = _with_alerts(write_campaign(tmp_path, name=name, budget=8), url, f"custom-webhook/{block}",
                        extra="stopping: {goal_value: 100.0}\n")  # any e_form value reaches it
    db = f"sqlite:///{tmp_path / 'goal.db'}"
    summary = run_campaign(path, db_url=db)
    assert summary["state"] == "stopped" and summary["stop_reason"] == "goal value 100.0 reached"

    title = f"sdl: campaign {name} goal reached"
    assert receiver.titles("apprise") == [title] and receiver.titles("block") == [title]
    sent = next(r for r in receiver.received if r["path"] == "/apprise")
    assert sent["query"]["token"] == ["s3cret"]  # expanded when sent
    body = _body(receiver.received, "apprise", "campaign.goal_reached")
    assert body == _body(receiver.received, "block", "campaign.goal_reached")
    assert f"campaign: {name}" in body and f"campaign id: {summary['campaign_id']}" in body
    assert f"best so far: e_form = {summary['best_value']:.4g} eV ({summary['best_candidate']}" in body
    assert "flow run: " in body
    with Store.from_url(db) as store:
        snapshot = store.get_campaign(name).config_snapshot
    assert snapshot["notifications"][0].endswith("-token=${" + TOKEN_VAR + "}")  # never stored expanded


def test_a_robot_gone_for_good_sends_instrument_down_then_campaign_failed(
        harness: None, receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sdl.exceptions import CampaignFailed
    from sdl.flows import run_campaign

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    name = f"gone-{uuid.uuid4().hex[:6]}"
    # The outage clock starts with the simulator process: 6 s leaves a loaded machine time to open the lab.
    path = _with_alerts(write_campaign(tmp_path, name=name, budget=20, timeout_s=0.3, outage_window_s=2.0,
                                       robot_sim="outage_after_s: 6.0"), receiver.url("fail"))
    with pytest.raises(CampaignFailed, match=r"instrument robot0 at socket://127\.0\.0\.1:"):
        run_campaign(path, db_url=f"sqlite:///{tmp_path / 'gone.db'}", time_scale=0.05)
    assert receiver.titles("fail") == [f"sdl: campaign {name} instrument down", f"sdl: campaign {name} failed"]
    down = _body(receiver.received, "fail", "instrument.down")
    assert down.startswith("instrument robot0 at socket://127.0.0.1:") and "did not answer for 2 s" in down
    assert "instrument: robot0" in down
    failed = _body(receiver.received, "fail", "campaign.failed")
    assert "robot0" in failed.splitlines()[0] and "best so far: " in failed
    assert all(r["body"]["type"] == "failure" for r in receiver.received)
