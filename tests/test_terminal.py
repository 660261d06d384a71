"""What a person sees in the terminal: named start-up steps, ``--version``, ``validate`` exit codes,
units in the CSV export, and the run summary judged against random search.

``sdl run`` runs in a real pseudo-terminal (rich shows its live display only on a terminal), as a
subprocess with its own ephemeral Prefect, on a small crystal campaign with real simulators.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import pty
import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from test_lab import write_campaign

from sdl.benchmark_metrics import random_best_rank_at_most, random_expected_best_rank
from sdl.cli.db_commands import unit_headers
from sdl.cli.run_commands import rank_against_random

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def sdl(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sdl.cli.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "200", **(env or {})})


def in_a_terminal(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; return its exit code and what it showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=cwd, env=env)
    os.close(follower)
    chunks: list[bytes] = []
    try:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=timeout)
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))
    return code, text.replace("\r\n", "\n").replace("\r", "\n")


# --------------------------------------------------------------------------- --version, validate


def test_version_comes_from_the_package_metadata() -> None:
    result = sdl("--version")
    assert result.returncode == 0 and result.stdout == f"sdl {version('sdl')}\n"


def test_validate_warns_about_data_outside_the_checkout_and_exits_0(tmp_path: Path) -> None:
    """A fresh clone lacks the full pool (``../../shared/data``): valid campaign, a WARN line, exit 0."""
    campaigns = tmp_path / "clone" / "campaigns"
    campaigns.mkdir(parents=True)
    shutil.copy(ROOT / "campaigns" / "perovskite-stability.yaml", campaigns)
    full = "campaigns/perovskite-stability.yaml"
    result = sdl("validate", full, str(ROOT / "campaigns" / "demo.yaml"), cwd=tmp_path / "clone")
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == 3, warnings  # the pool and the two simulators' world
    assert warnings[0].startswith(f"WARN {full}:16 search_space.candidates.file: data file not in this checkout "
                                  f"(looked for {tmp_path}/shared/data/perovskites_cmr_mp_oqmd/")
    assert warnings[1].startswith(f"WARN {full}:58 instruments[0].world: ")
    ok = result.stdout.splitlines()
    assert ok[0].startswith(f"OK {full}: campaign 'perovskite-stability'") and ok[0].endswith(
        "(schema only: 3 data files missing)")
    assert ok[1].startswith("OK ") and "missing" not in ok[1]

    strict = sdl("validate", "--strict", full, cwd=tmp_path / "clone")
    assert strict.returncode == 1 and strict.stdout == ""
    assert strict.stderr.startswith(f"ERROR {full}:16 search_space.candidates.file: candidates file ")

    broken = campaigns / "broken.yaml"
    broken.write_text((campaigns / "perovskite-stability.yaml").read_text().replace("goal: minimize", "goal: lowest"))
    mixed = sdl("validate", full, "campaigns/broken.yaml", cwd=tmp_path / "clone")
    assert mixed.returncode == 1 and "ERROR campaigns/broken.yaml:" in mixed.stderr and "objective.goal" in mixed.stderr


# --------------------------------------------------------------------------- the random baseline


def test_random_best_rank_matches_enumeration() -> None:
    size, n = 9, 3
    best_ranks = [min(draw) for draw in itertools.combinations(range(1, size + 1), n)]
    assert random_expected_best_rank(size, n) == pytest.approx(sum(best_ranks) / len(best_ranks))
    for rank in (1, 2, 5, 7):
        share = sum(r <= rank for r in best_ranks) / len(best_ranks)
        assert random_best_rank_at_most(size, n, rank) == pytest.approx(share)
    with pytest.raises(ValueError, match="n must be in"):
        random_expected_best_rank(5, 6)


def test_the_summary_says_what_a_rank_means() -> None:
    assert rank_against_random(4, 400, 32) == [
        "rank of best found:  4 of 400 recorded values in the world (top 1 %)",
        "random search:       with 32 experiments, rank ~12 on average; rank 4 or better in 28 % of campaigns",
        "verdict:             better than random search's average (rank 4 vs ~12)",
    ]
    assert rank_against_random(60, 400, 32)[2].startswith("verdict:             worse than random")
    assert rank_against_random(1, 400, 32)[0].endswith("(the best recorded value)")


def test_unit_headers_come_from_the_config() -> None:
    snapshot = {"objective": {"property": "toughness", "unit": "J", "goal": "maximize"},
                "search_space": {"parameters": [{"name": "theta", "unit": "deg"}, {"name": "n", "unit": None}]}}
    columns = ["experiment_id", "param.theta", "param.n", "toughness", "toughness_n", "predicted_mean"]
    assert list(unit_headers(snapshot, None, columns).values()) == [
        "experiment_id", "param.theta [deg]", "param.n", "toughness [J]", "toughness_n", "predicted_mean [J]"]
    assert unit_headers(snapshot, "hardness", ["hardness"]) == {"hardness": "hardness"}  # unit unknown: none


# --------------------------------------------------------------------------- sdl run in a terminal


@pytest.mark.slow
def test_sdl_run_names_each_step_from_the_start_and_compares_with_random(tmp_path: Path) -> None:
    yaml = write_campaign(tmp_path, name="steps", budget=4, model="gp")
    db = tmp_path / "lab.db"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"COLUMNS": "200", "TERM": "xterm", "OMP_NUM_THREADS": "1", "PREFECT_HOME": str(tmp_path / "ph")})
    code, shown = in_a_terminal([sys.executable, "-m", "sdl.cli.main", "run", str(yaml), "--db", f"sqlite:///{db}"],
                                env, tmp_path)
    assert code == 0, shown[-3000:]
    steps = re.findall(r"^\s*\d+\.\d s  (.+?)\s*$", shown, flags=re.M)
    expected = ["loading the campaign", "loading the lab", "loading Prefect and the engine",
                "starting the Prefect flow run (an ephemeral Prefect server", "opening the repository",
                "building the gp engine", "starting 2 simulated instrument(s)", "connecting to 2 instrument(s)",
                "fitting the gp model on 2 measurements"]
    found = iter(steps)
    for name in expected:  # in this order, each announced once as it starts
        assert any(s.startswith(name) for s in found), f"{name!r} not announced in order: {steps}"
    assert steps[0] == f"loading the campaign {yaml}"
    assert "steps completed: budget of 4 experiments reached" in shown
    assert re.search(r"rank of best found:  \d+ of 400 recorded values in the world", shown)
    assert "random search:       with 4 experiments, rank ~80 on average;" in shown
    assert "verdict:             " in shown

    exported = sdl("export", "steps", "--db", f"sqlite:///{db}", "--format", "csv")
    assert exported.returncode == 0, exported.stderr
    header = next(csv.reader(io.StringIO(exported.stdout)))
    assert {"e_form [eV]", "predicted_mean [eV]", "predicted_std [eV]", "e_form_n"} <= set(header)
