"""End to end in headless Chromium: a local Prefect server (as ``sdl ui`` starts it), a campaign
reporting to it, and the UI showing the campaign's flow run and its artifacts, plots as images.

Debian's ``chromium`` package is installed by ``.ci/run``; under CI the test fails (never skips)
when it is missing. The screenshot is saved in the test's tmp directory (path printed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_lab import write_campaign

from sdl.prefect_server import PrefectServer


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    message = "chromium is not installed (apt-get install -y chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _browse(chromium: str, *args: str, timeout: float = 180) -> str:
    """Run headless Chromium with the flags known to render the Prefect UI (KNOWN_FACTS)."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--window-size=1400,1000", *args],
            capture_output=True, text=True, timeout=timeout, check=False,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def _assert_png_image(dom: str, alt: str) -> None:
    """The rendered DOM holds an ``<img>`` named ``alt`` whose ``data:`` URL decodes to a PNG."""
    import base64
    import re

    images = re.findall(r"<img\b[^>]*>", dom)
    named = [tag for tag in images if f'alt="{alt}"' in tag]
    assert named, f"no <img alt={alt!r}> in the page; images: {[t[:80] for t in images]}"
    match = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', named[0])
    assert match, named[0][:200]
    assert base64.b64decode(match.group(1))[:8] == b"\x89PNG\r\n\x1a\n"


def _text(dom: str) -> str:
    import re

    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    srv = PrefectServer(home=tmp_path_factory.mktemp("prefect-ui"))
    srv.start(timeout=180)
    try:
        yield srv
    finally:
        srv.stop()


def _api(server: PrefectServer, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(server.api_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


@pytest.mark.slow
def test_prefect_ui_shows_the_campaign(server: PrefectServer, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    chromium = _chromium()
    assert server.port != 4200 and server.healthy()
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sdl.flows import artifact_key, run_campaign

    monkeypatch.setenv("SDL_STATE_DIR", str(tmp_path / "state"))
    name = "ui-campaign"
    path = write_campaign(tmp_path, name=name, budget=4)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        summary = run_campaign(path, db_url=f"sqlite:///{tmp_path / 'ui.db'}")
    assert summary["state"] == "completed"

    runs = _api(server, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    assert len(runs) == 1 and name in runs[0]["tags"]
    flow_run_id = runs[0]["id"]
    cards = _api(server, "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    keys = {a["key"] for a in cards}
    assert {artifact_key(name, k) for k in ("progress", "report", "best-candidates", "summary",
                                            "plot-best-so-far")} <= keys
    assert len(cards) == len(keys), "one card per key: rounds update the cards in place"

    page = f"{server.url}/runs/flow-run/{flow_run_id}"
    text = _text(_browse(chromium, "--dump-dom", page))
    assert name in text and "Completed" in text and "sdl-campaign" in text, text[:2000]

    artifacts = _text(_browse(chromium, "--dump-dom", f"{server.url}/artifacts"))
    assert f"{len(keys)} Artifacts" in artifacts, artifacts[:2000]  # the UI lists every keyed artifact
    report = _text(_browse(chromium, "--dump-dom", f"{server.url}/artifacts/key/{artifact_key(name, 'report')}"))
    assert artifact_key(name, "report") in report and "Round 2 report" in report, report[:2000]

    # The flow run's Artifacts tab (the default V2 UI): each plot's card shows its image.
    tab = f"{server.url}/v2/runs/flow-run/{flow_run_id}?tab=Artifacts"
    _assert_png_image(_browse(chromium, "--dump-dom", tab), "best so far")
    # The report itself (V1 UI, as Prefect's "View at" link opens it): every plot inline.
    report_id = next(a["id"] for a in cards if a["key"] == artifact_key(name, "report"))
    _assert_png_image(_browse(chromium, "--dump-dom", f"{server.url}/artifacts/artifact/{report_id}"), "recall")

    shot = tmp_path / "prefect-ui-flow-run-artifacts.png"
    _browse(chromium, f"--screenshot={shot}", tab)
    print(f"screenshot: {shot}")
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert pixels.shape[0] >= 900 and pixels.std() > 0.05, "the screenshot is a blank page"


# --------------------------------------------------------------------------- `sdl ui` as a service

ROOT = Path(__file__).resolve().parent.parent


def _proc_stats() -> list[tuple[int, int, int]]:
    """``(pid, parent pid, process group)`` of every process (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z":
            out.append((int(entry.name), int(fields[1]), int(fields[2])))
    return out


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _sdl(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdl.cli.main", *args]


def test_sdl_ui_stops_its_server_and_every_child_on_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    from sdl.prefect_server import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_SERVER_API_HOST")}
    proc = subprocess.Popen(_sdl("ui", "--port", str(port), "--home", str(tmp_path / "home")), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240  # a loaded 2-core machine: the server takes its time
        server = PrefectServer(home=tmp_path / "home", port=port)
        while not server.healthy():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(1)
        children = [pid for pid, parent, _ in _proc_stats() if parent == proc.pid]
        assert children, "sdl ui started no server process"
        groups = {group for pid, _, group in _proc_stats() if pid in children}
        assert proc.pid not in groups  # the server runs in its own session: a Ctrl-C reaches sdl ui only
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "SIGTERM: stopping the Prefect server" in output
    assert not _answers(port), "the Prefect server still answers on its port"
    left = [pid for pid, _, group in _proc_stats() if group in groups or pid in children]
    assert left == [], f"processes of the server remain: {left}"


def test_sdl_ui_refuses_to_listen_beyond_loopback_unless_host_is_given(tmp_path: Path) -> None:
    from sdl.prefect_server import UnsafeHost, resolve_ui_host

    env = {**os.environ, "PREFECT_SERVER_API_HOST": "0.0.0.0", "COLUMNS": "60"}
    result = subprocess.run(_sdl("ui", "--home", str(tmp_path / "home")), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "error: PREFECT_SERVER_API_HOST=0.0.0.0 would open the Prefect UI and API (no login) beyond this machine; "
        "`sdl ui` does that only with an explicit --host 0.0.0.0")
    assert not (tmp_path / "home").exists()

    assert resolve_ui_host(None, {}) == "127.0.0.1"
    assert resolve_ui_host(None, {"SDL_UI_HOST": "::1"}) == "::1"
    assert resolve_ui_host("0.0.0.0", {"PREFECT_SERVER_API_HOST": "0.0.0.0"}) == "0.0.0.0"
    with pytest.raises(UnsafeHost, match=r"SDL_UI_HOST=192\.168\.1\.5"):
        resolve_ui_host(None, {"SDL_UI_HOST": "192.168.1.5", "PREFECT_SERVER_API_HOST": "127.0.0.1"})
