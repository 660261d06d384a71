"""`sdl db upgrade`, `sdl status` and `sdl export` through the real typer app."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdl.cli.main import app
from sdl.repository import Store

runner = CliRunner()


def _fill(url: str) -> None:
    store = Store.from_url(url)
    c = store.get_or_create_campaign(
        "crossed-barrel",
        snapshot={"objective": {"property": "toughness", "unit": "J", "goal": "maximize"}},
        config_hash="abc", seed=3, budget=6,
    )
    for i, (value, final) in enumerate([(10.5, "completed"), (30.25, "completed"), (None, "failed"),
                                        (None, "running"), (None, "proposed")]):
        eid = store.propose_experiment(c.id, idempotency_key=f"cb:{i}", candidate_key=f"n={i}",
                                       params={"n": i, "theta": 0.5 * i}, provenance={"batch_id": "b0",
                                                                                      "predicted_mean": 1.0 + i})
        if final != "proposed":
            store.start_experiment(eid, instruments=["robot"])
        if value is not None:
            store.add_measurement(eid, property="toughness", value=value, unit="J")
        if final == "completed":
            store.complete_experiment(eid)
        elif final == "failed":
            store.fail_experiment(eid, reason="garbled reply", kind="instrument")
    store.get_or_create_campaign("empty", snapshot={}, config_hash="e", seed=0, budget=None)
    store.close()


@pytest.fixture
def filled(database_url: str) -> str:
    result = runner.invoke(app, ["db", "upgrade", "--db", database_url])
    assert result.exit_code == 0, result.output
    assert "→ 0004" in result.output
    _fill(database_url)
    return database_url


def test_status_json_and_table(filled: str) -> None:
    result = runner.invoke(app, ["status", "--db", filled, "--json"])
    assert result.exit_code == 0, result.output
    data = {c["name"]: c for c in json.loads(result.stdout)}
    cb = data["crossed-barrel"]
    assert (cb["state"], cb["budget"], cb["best_value"]) == ("running", 6, 30.25)
    assert cb["counts"] == {"proposed": 1, "running": 1, "completed": 2, "failed": 1, "abandoned": 0}
    assert data["empty"]["counts"] == dict.fromkeys(["proposed", "running", "completed", "failed", "abandoned"], 0)
    assert data["empty"]["best_value"] is None and data["empty"]["budget"] is None
    table = runner.invoke(app, ["status", "--db", filled], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "crossed-barrel" in table.stdout and "30.25" in table.stdout


def test_export_csv_json_parquet(filled: str, tmp_path: Path) -> None:
    out = runner.invoke(app, ["export", "crossed-barrel", "--db", filled, "--format", "csv"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["state"] for r in rows] == ["completed", "completed", "failed", "running", "proposed"]
    assert [r["toughness [J]"] for r in rows] == ["10.5", "30.25", "", "", ""]  # the objective's unit
    assert [r["predicted_mean [J]"] for r in rows] == ["1.0", "2.0", "3.0", "4.0", "5.0"]
    assert [r["param.theta"] for r in rows] == ["0.0", "0.5", "1.0", "1.5", "2.0"]
    assert rows[2]["failure_reason"] == "garbled reply" and rows[0]["finished_at"].endswith("+00:00")

    js = tmp_path / "cb.json"
    out = runner.invoke(app, ["export", "crossed-barrel", "--db", filled, "--format", "json", "-o", str(js)])
    assert out.exit_code == 0, out.output
    data = json.loads(js.read_text())
    assert [d["candidate_key"] for d in data] == [f"n={i}" for i in range(5)]
    assert data[1]["toughness"] == 30.25 and data[1]["predicted_mean"] == 2.0

    pq = tmp_path / "cb.parquet"
    out = runner.invoke(app, ["export", "crossed-barrel", "--db", filled, "--format", "parquet", "-o", str(pq)])
    assert out.exit_code == 0, out.output
    import pandas as pd

    frame = pd.read_parquet(pq)
    assert list(frame["state"]) == ["completed", "completed", "failed", "running", "proposed"]
    assert frame["toughness"].iloc[1] == 30.25 and str(frame["proposed_at"].dt.tz) == "UTC"


def test_errors_are_one_line_and_exit_1(filled: str, tmp_path: Path) -> None:
    out = runner.invoke(app, ["export", "nope", "--db", filled, "--format", "csv"])
    assert out.exit_code == 1 and "no campaign named 'nope'" in out.output and "Traceback" not in out.output
    out = runner.invoke(app, ["export", "crossed-barrel", "--db", filled, "--format", "parquet"])
    assert out.exit_code == 1 and "-o FILE" in out.output
    out = runner.invoke(app, ["export", "crossed-barrel", "--db", filled, "--format", "xml"])
    assert out.exit_code != 0


def test_status_on_missing_or_unmigrated_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    out = runner.invoke(app, ["status", "--db", missing])
    assert out.exit_code == 1 and "no such database file" in out.output
    assert not (tmp_path / "none.db").exists()
    empty = tmp_path / "empty.db"
    Store.from_url(f"sqlite:///{empty}").current_revision()  # creates the file, no schema
    out = runner.invoke(app, ["status", "--db", f"sqlite:///{empty}"])
    assert out.exit_code == 1 and "sdl db upgrade" in out.output
    # the URL comes from SDL_DATABASE_URL when --db is not given
    monkeypatch.setenv("SDL_DATABASE_URL", f"sqlite:///{tmp_path / 'env.db'}")
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    out = runner.invoke(app, ["status", "--json"])
    assert out.exit_code == 0 and json.loads(out.stdout) == []
