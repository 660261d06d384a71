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
