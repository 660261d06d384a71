"""Campaign YAML schema: every shipped campaign loads; every malformed file is pinned to file:line field."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from sdl.config import (
    CampaignConfig,
    CampaignConfigError,
    CategoricalParameter,
    GNNEnsembleModel,
    GNNEnsembleOptions,
    campaign_json_schema,
    load_campaign,
    validate_campaign_dict,
)
from sdl.settings import DEFAULT_DATABASE_URL, resolve_database_url

ROOT = Path(__file__).resolve().parent.parent
CAMPAIGNS = sorted((ROOT / "campaigns").glob("*.yaml"))
MALFORMED = sorted((ROOT / "tests" / "data" / "campaigns").glob("*.yaml"))


def expected_prefix(path: Path, shown: str) -> str:
    """``file:line field: `` from the file's ``# expect: LINE FIELD`` header."""
    header = path.read_text().splitlines()[0]
    assert header.startswith("# expect: "), f"{path} lacks its '# expect:' header"
    line, field = header.removeprefix("# expect: ").split()
    return f"{shown}:{line} {field}: " if field != "-" else f"{shown}:{line}: "


def missing_data(path: Path) -> list[str]:
    """Data files a shipped campaign points to outside the repository that this checkout lacks."""
    data = yaml.safe_load(path.read_text())
    files = [data["search_space"].get("candidates", {}).get("file")]
    files += [i.get("world") for i in data.get("instruments", [])]
    return [f for f in files if f and not (path.parent / f).exists()]


@pytest.fixture(params=CAMPAIGNS, ids=[p.name for p in CAMPAIGNS])
def campaign_path(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    lacking = missing_data(path)
    if lacking:  # only the full-pool campaign reads ../../shared/data, outside the repository
        pytest.skip(f"{path.name} needs {lacking}, not present on this machine")
    return path


def test_campaign_files_exist() -> None:
    assert {p.name for p in CAMPAIGNS} >= {"demo.yaml", "perovskite-stability.yaml", "crossed-barrel.yaml"}


def test_shipped_campaigns_load(campaign_path: Path) -> None:
    cfg = load_campaign(campaign_path)
    assert cfg.base_dir == campaign_path.parent.resolve()
    assert cfg.source == campaign_path.resolve()
    space = cfg.search_space
    assert (space.parameters is None) != (space.candidates is None)
    if space.candidates is not None:
        assert space.candidates.file.is_absolute() and space.candidates.file.is_file()
    for instrument in cfg.instruments:
        assert instrument.world is None or instrument.world.is_file()
    assert len(cfg.config_hash()) == 64


def test_demo_campaign_contract() -> None:
    cfg = load_campaign(ROOT / "campaigns" / "demo.yaml")
    assert cfg.search_space.candidates is not None
    assert cfg.search_space.candidates.file == (ROOT / "simulators/worlds/perovskites_demo.csv.gz").resolve()
    assert cfg.search_space.candidates.structure_column == "cif"
    assert (cfg.objective.property, cfg.objective.unit, cfg.objective.goal) == ("e_form", "eV", "minimize")
    assert isinstance(cfg.model, GNNEnsembleModel) and isinstance(cfg.model.options, GNNEnsembleOptions)
    assert (cfg.acquisition.function, cfg.acquisition.batch_size) == ("qucb", 4)
    assert (cfg.initial_design.size, cfg.budget.experiments) == (8, 32)
    assert sorted(i.role for i in cfg.instruments) == ["characterization", "synthesis"]
    assert all(i.simulated and i.world == cfg.search_space.candidates.file for i in cfg.instruments)


def test_crossed_barrel_parameters() -> None:
    cfg = load_campaign(ROOT / "campaigns" / "crossed-barrel.yaml")
    params = {p.name: p for p in cfg.search_space.parameters or []}
    assert (params["n"].type, params["n"].low, params["n"].high) == ("integer", 6, 12)
    assert (params["theta"].low, params["theta"].high, params["theta"].unit) == (0, 200, "deg")
    assert (cfg.objective.property, cfg.objective.goal, cfg.model.name) == ("toughness", "maximize", "gp")
    assert cfg.acquisition.function == "qlognei"
    assert all(i.simulator.off_table == "nearest" for i in cfg.instruments)


@pytest.mark.parametrize("path", MALFORMED, ids=[p.stem for p in MALFORMED])
def test_malformed_file_is_pinned_to_line_and_field(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SDL_TEST_SURELY_UNSET_PASSWORD", raising=False)
    shown = os.path.relpath(path)
    with pytest.raises(CampaignConfigError) as info:
        load_campaign(shown)
    message = str(info.value)
    assert message.startswith(expected_prefix(path, shown)), message
    assert "\n" not in message and "Traceback" not in message
    assert info.value.file == shown and info.value.line == int(expected_prefix(path, shown).split(":")[1].split()[0])


@pytest.mark.parametrize(
    ("stem", "words"),
    [
        ("bad_bounds", ["200", "0"]),
        ("goal_typo", ["'maximise'", "'maximize'", "'minimize'", "'target'"]),
        ("unknown_key", ["'colour'", "allowed"]),
        ("unknown_model", ["'xgboost'", "'gnn-ensemble'"]),
        ("unset_env_var", ["SDL_TEST_SURELY_UNSET_PASSWORD"]),
        ("fault_rate_above_one", ["1.5", "less than or equal to 1"]),
        ("python_tag", ["!!python/object/apply:os.system"]),
        ("missing_candidates_file", ["no_such_pool.csv.gz", "does not exist"]),
    ],
)
def test_messages_name_the_bad_value_and_the_allowed_values(stem: str, words: list[str]) -> None:
    with pytest.raises(CampaignConfigError) as info:
        load_campaign(ROOT / "tests" / "data" / "campaigns" / f"{stem}.yaml")
    for word in words:
        assert word in str(info.value)


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'name: evil\nx: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(CampaignConfigError, match=r"evil.yaml:2 x: unsafe"):
        load_campaign(path)
    assert not marker.exists()


def demo_data() -> dict:
    return yaml.safe_load((ROOT / "campaigns" / "demo.yaml").read_text())


def reversed_keys(value: object) -> object:
    if isinstance(value, dict):
        return {k: reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_keys(v) for v in value]
    return value


def test_hash_ignores_key_order_and_location_but_not_content(tmp_path: Path) -> None:
    demo = ROOT / "campaigns" / "demo.yaml"
    cfg = load_campaign(demo)
    shuffled = validate_campaign_dict(reversed_keys(demo_data()), file=demo)
    assert shuffled.config_hash() == cfg.config_hash()
    # The same campaign in another checkout: same relative layout, different absolute paths.
    (tmp_path / "campaigns").mkdir()
    (tmp_path / "simulators/worlds").mkdir(parents=True)
    (tmp_path / "simulators/worlds/perovskites_demo.csv.gz").write_bytes(
        (ROOT / "simulators/worlds/perovskites_demo.csv.gz").read_bytes()
    )
    moved = tmp_path / "campaigns" / "demo.yaml"
    moved.write_text(demo.read_text())
    assert load_campaign(moved).config_hash() == cfg.config_hash()
    changed = demo_data()
    changed["budget"]["experiments"] = 33
    assert validate_campaign_dict(changed, file=demo).config_hash() != cfg.config_hash()
    # A default written out explicitly is the same campaign.
    explicit = demo_data()
    explicit["retrain"] = {"every": 4}
    explicit["stopping"] = {"goal_value": None}
    assert validate_campaign_dict(explicit, file=demo).config_hash() == cfg.config_hash()
    # model.options.priors came later: at its default it leaves a GP campaign's hash as before.
    gp, gp_explicit, gp_gamma = demo_data(), demo_data(), demo_data()
    gp["model"] = {"name": "gp"}
    gp_explicit["model"] = {"name": "gp", "options": {"priors": "lognormal"}}
    gp_gamma["model"] = {"name": "gp", "options": {"priors": "gamma"}}
    h = validate_campaign_dict(gp, file=demo)
    assert "priors" not in h.snapshot()["model"]["options"]
    assert validate_campaign_dict(gp_explicit, file=demo).config_hash() == h.config_hash()
    assert validate_campaign_dict(gp_gamma, file=demo).config_hash() != h.config_hash()


def test_snapshot_round_trips(campaign_path: Path) -> None:
    cfg = load_campaign(campaign_path)
    snapshot = cfg.snapshot()
    json.dumps(snapshot)  # JSON-able
    again = validate_campaign_dict(json.loads(json.dumps(snapshot)), file=campaign_path)
    assert again == cfg and again.config_hash() == cfg.config_hash()
    if cfg.search_space.candidates is not None:
        assert not Path(snapshot["search_space"]["candidates"]["file"]).is_absolute()


def test_env_expansion_and_password_masking(monkeypatch: pytest.MonkeyPatch) -> None:
    demo = ROOT / "campaigns" / "demo.yaml"
    data = demo_data()
    data["repository"]["url"] = "postgresql+psycopg://lab:${SDL_TEST_PW}@${SDL_TEST_HOST:-localhost}/sdl"
    data["instruments"][1] = {
        "name": "station",
        "role": "characterization",
        "url": "socket://127.0.0.1:${SDL_TEST_PORT}",
        "measures": ["e_form"],
    }
    monkeypatch.setenv("SDL_TEST_PW", "s3cret")
    monkeypatch.setenv("SDL_TEST_PORT", "5123")
    monkeypatch.delenv("SDL_TEST_HOST", raising=False)
    cfg = validate_campaign_dict(data, file=demo)
    assert cfg.repository.url == "postgresql+psycopg://lab:s3cret@localhost/sdl"
    assert cfg.instruments[1].url == "socket://127.0.0.1:5123"
    assert "s3cret" not in json.dumps(cfg.snapshot())
    assert cfg.snapshot()["repository"]["url"] == "postgresql+psycopg://lab:***@localhost/sdl"
    monkeypatch.setenv("SDL_TEST_PW", "other")
    assert validate_campaign_dict(data, file=demo).config_hash() == cfg.config_hash()
    monkeypatch.delenv("SDL_TEST_PORT")
    with pytest.raises(CampaignConfigError, match=r"demo.yaml instruments\[1\]\.url: .*'SDL_TEST_PORT' is not set"):
        validate_campaign_dict(data, file=demo)


def test_models_are_frozen_and_strict() -> None:
    cfg = load_campaign(ROOT / "campaigns" / "demo.yaml")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]
    with pytest.raises(Exception, match="choices must be distinct"):
        CategoricalParameter(name="s", type="categorical", choices=["a", "a"])


@pytest.mark.parametrize(
    ("change", "prefix"),
    [
        (
            lambda d: d["objective"].update(goal="target", target_range=[3.0, 1.0]),
            "objective.target_range: target_range low",
        ),
        (lambda d: d["objective"].update(target_range=[1.0, 3.0]), "objective.target_range: target_range is only used"),
        (
            lambda d: d["initial_design"].update(size=40),
            "budget: experiments (32) must be >= initial_design.size (40)",
        ),
        (
            lambda d: d["instruments"][1].update(measures=["gap"]),
            "instruments: no characterization instrument measures",
        ),
        (lambda d: d["instruments"][0].update(url="sockt://h:1"), "instruments[0].url: url scheme 'sockt'"),
        (
            lambda d: d["model"]["options"].update(members=0),
            "model.options.members: Input should be greater than or equal to 1",
        ),
        (
            lambda d: d["search_space"]["candidates"].update(formula_column="formule"),
            "search_space.candidates: column(s) ['formule']",
        ),
        (lambda d: d["acquisition"].update(function="ei"), "acquisition.function: Input should be"),
        (lambda d: d.update(objective=5), "objective: Input should be a valid dictionary"),
    ],
)
def test_cross_field_rules(change, prefix: str) -> None:
    data = demo_data()
    change(data)
    with pytest.raises(CampaignConfigError) as info:
        validate_campaign_dict(data, file="demo.yaml", base_dir=ROOT / "campaigns")
    assert str(info.value).startswith(f"demo.yaml {prefix}"), str(info.value)


def test_campaign_without_instruments_validates() -> None:
    data = demo_data()
    data["instruments"] = []
    assert validate_campaign_dict(data, file=ROOT / "campaigns" / "demo.yaml").instruments == []


def test_json_schema_has_descriptions_everywhere() -> None:
    schema = campaign_json_schema()
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert set(schema["required"]) >= {"name", "search_space", "model", "budget"}
    assert schema["oneOf"] == [{"required": ["objective"]}, {"required": ["objectives"]}]  # one or several
    undocumented = [
        f"{model}.{name}"
        for model, body in [("CampaignConfig", schema), *schema["$defs"].items()]
        for name, prop in body.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert undocumented == []
    assert schema["properties"]["model"]["discriminator"]["propertyName"] == "name"


def test_shipped_schema_file_is_current() -> None:
    shipped = json.loads((ROOT / "campaigns" / "campaign.schema.json").read_text())
    assert shipped == campaign_json_schema(), "regenerate: sdl schema -o campaigns/campaign.schema.json"


def test_schema_accepts_shipped_campaigns(campaign_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(campaign_json_schema())
    jsonschema.validate(yaml.safe_load(campaign_path.read_text()), campaign_json_schema())


def test_resolve_database_url_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_campaign(ROOT / "campaigns" / "demo.yaml")
    no_repo = validate_campaign_dict({**demo_data(), "repository": {}}, file=ROOT / "campaigns" / "demo.yaml")
    monkeypatch.delenv("SDL_DATABASE_URL", raising=False)
    assert resolve_database_url(None) == DEFAULT_DATABASE_URL == "sqlite:///sdl.db"
    assert resolve_database_url(None, no_repo) == DEFAULT_DATABASE_URL
    assert resolve_database_url(None, cfg) == cfg.repository.url
    monkeypatch.setenv("SDL_DATABASE_URL", "sqlite:///env.db")
    assert resolve_database_url(None, cfg) == "sqlite:///env.db"
    assert resolve_database_url("sqlite:///cli.db", cfg) == "sqlite:///cli.db"
    monkeypatch.setenv("SDL_DATABASE_URL", "  ")
    assert resolve_database_url("", cfg) == cfg.repository.url


def test_config_and_settings_do_not_import_torch_or_prefect() -> None:
    code = (
        "import sys, sdl.config, sdl.settings; "
        "sdl.config.load_campaign('campaigns/demo.yaml'); "
        "print(sorted(m for m in ('torch', 'prefect', 'botorch', 'pymatgen') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_campaign_config_type_is_exported() -> None:
    assert load_campaign(ROOT / "campaigns" / "demo.yaml").__class__ is CampaignConfig


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CampaignConfigError, match=r"bomb.yaml:1: document expands to \d+ values through aliases"):
        load_campaign(path)


def test_aliases_still_work(tmp_path: Path) -> None:
    text = (ROOT / "campaigns" / "crossed-barrel.yaml").read_text()
    text = text.replace("    simulator:\n      off_table: nearest\n", "    simulator: *sim\n")
    text = text.replace("instruments:\n", "x-sim: &sim {off_table: refuse}\ninstruments:\n", 1)
    (tmp_path / "campaigns").mkdir()
    path = tmp_path / "campaigns" / "cb.yaml"
    path.write_text(text.replace("../simulators/worlds/", f"{ROOT}/simulators/worlds/"))
    with pytest.raises(CampaignConfigError, match=r"cb.yaml:\d+ x-sim: unknown key 'x-sim'"):
        load_campaign(path)  # extension keys are not allowed either: one campaign, one schema
    path.write_text(path.read_text().replace("x-sim: &sim {off_table: refuse}\n", "").replace(
        "    simulator: *sim\n", "    simulator: &sim {off_table: refuse}\n", 1))
    cfg = load_campaign(path)
    assert [i.simulator.off_table for i in cfg.instruments] == ["refuse", "refuse"]


def test_union_tags_known_to_the_error_mapper_match_the_models() -> None:
    import typing

    from sdl import config

    tags = {
        tag
        for union in (config.Parameter, config.ModelConfig)
        for model in typing.get_args(typing.get_args(union)[0])
        for key in ("type", "name")
        if key in model.model_fields
        for tag in typing.get_args(model.model_fields[key].annotation)
    }
    assert tags == config._UNION_TAGS
