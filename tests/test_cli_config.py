"""``sdl validate`` and ``sdl schema`` through the real console script entry point, in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer
import yaml
from typer.testing import CliRunner

from sdl.cli import config_commands
from sdl.config import campaign_json_schema

ROOT = Path(__file__).resolve().parent.parent
MALFORMED = sorted((ROOT / "tests" / "data" / "campaigns").glob("*.yaml"))


def sdl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``sdl ARGS`` as a user would (module entry point, so no PATH lookup), from the repo root."""
    env = {k: v for k, v in os.environ.items() if k != "SDL_TEST_SURELY_UNSET_PASSWORD"}
    env["COLUMNS"] = "60"  # a narrow terminal must not wrap the one-line messages
    return subprocess.run(
        [sys.executable, "-m", "sdl.cli.main", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def expected_prefix(path: Path, shown: str) -> str:
    """``file:line field: `` from the file's ``# expect: LINE FIELD`` header."""
    line, field = path.read_text().splitlines()[0].removeprefix("# expect: ").split()
    return f"{shown}:{line} {field}: " if field != "-" else f"{shown}:{line}: "


def missing_data(path: Path) -> list[str]:
    """Data files a shipped campaign points to that this checkout lacks."""
    data = yaml.safe_load(path.read_text())
    files = [data["search_space"].get("candidates", {}).get("file")]
    files += [i.get("world") for i in data.get("instruments", [])]
    return [f for f in files if f and not (path.parent / f).exists()]


def shipped_campaigns() -> list[str]:
    """campaigns/*.yaml whose data files exist here (the full pool lives outside the repository)."""
    return [f"campaigns/{p.name}" for p in sorted((ROOT / "campaigns").glob("*.yaml")) if not missing_data(p)]


def test_validate_accepts_every_shipped_campaign() -> None:
    files = shipped_campaigns()
    assert "campaigns/demo.yaml" in files and "campaigns/crossed-barrel.yaml" in files
    result = sdl("validate", *files)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(files)
    for file, line in zip(files, lines, strict=True):
        assert line.startswith(f"OK {file}: campaign "), line


def test_validate_rejects_each_malformed_file_with_one_line() -> None:
    files = [f"tests/data/campaigns/{p.name}" for p in MALFORMED]
    result = sdl("validate", "--strict", "campaigns/demo.yaml", *files)  # strict: a missing data file too
    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout.startswith("OK campaigns/demo.yaml")
    errors = result.stderr.splitlines()
    assert len(errors) == len(files), result.stderr
    for path, file, line in zip(MALFORMED, files, errors, strict=True):
        assert line.startswith("ERROR " + expected_prefix(path, file)), line


def test_validate_missing_file() -> None:
    result = sdl("validate", "campaigns/no-such-campaign.yaml")
    assert result.returncode == 1
    expected = "ERROR campaigns/no-such-campaign.yaml: cannot read the file: No such file or directory"
    assert result.stderr.strip() == expected


def test_schema_prints_json_schema_with_descriptions(tmp_path: Path) -> None:
    result = sdl("schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    assert schema == campaign_json_schema()
    assert schema["properties"]["objective"]["description"]
    assert schema["$defs"]["ObjectiveSpec"]["properties"]["goal"]["enum"] == ["maximize", "minimize", "target"]


def test_schema_output_file(tmp_path: Path) -> None:
    app = typer.Typer()
    config_commands.register(app)
    out = tmp_path / "campaign.schema.json"
    result = CliRunner().invoke(app, ["schema", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text()) == campaign_json_schema()
    bad = CliRunner().invoke(app, ["schema", "--output", str(tmp_path / "no" / "dir" / "x.json")])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
