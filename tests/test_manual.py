"""``sdl ask`` / ``sdl tell``: the loop by hand, through the real CLI, on real SQLite and PostgreSQL.

The real engine (a GP on the crossed-barrel parameters, a pretrained CHGNet head on a crystal
pool) proposes; results are told as a person would; a campaign mixes hands with the real lab
(simulator processes over pyserial, Bluesky plans on the Ophyd devices).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from campaign_files import PEROVSKITE_WORLD, TABLE_WORLD, write_pareto_campaign, write_table_campaign
from typer.testing import CliRunner

from sdl.cli.main import app
from sdl.repository import Store

REPO = Path(__file__).resolve().parent.parent
CRYSTAL_WORLD = REPO / "simulators" / "worlds" / "perovskites_demo.csv.gz"
ASK_KEYS = {"experiment", "candidate", "params", "predicted_mean", "predicted_std", "acquisition_value",
            "model_version", "batch_id", "strategy"}
PARAMS = {"n", "theta", "r", "t"}


def sdl(*args: str | Path) -> tuple[int, str, str]:
    """Run the real CLI; returns exit code, stdout, stderr."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ask_json(campaign: Path, db: str, n: int, *extra: str) -> list[dict]:
    code, out, err = sdl("ask", campaign, "-n", str(n), "--json", "--db", db, "--by", "alice", *extra)
    assert code == 0, err
    assert "loading the engine" in err and "proposing" in err  # progress on stderr, JSON alone on stdout
    return json.loads(out)


def world_toughness(params: dict) -> float:
    """The recorded toughness nearest to a recipe (what a person at the printer would measure)."""
    with TABLE_WORLD.open() as handle:
        rows = list(csv.DictReader(handle))
    scale = {"n": 6.0, "theta": 200.0, "r": 1.0, "t": 0.7}

    def distance(row: dict) -> float:
        return sum(((float(row[k]) - float(params[k])) / scale[k]) ** 2 for k in scale)

    return float(min(rows, key=distance)["toughness"])


def only_error_line(err: str) -> str:
    """The one error line (progress lines beside it on stderr start with the campaign's name)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------- ask → tell → ask


def test_ask_tell_ask_never_repeats_and_reports_like_a_run(tmp_path: Path, database_url: str) -> None:
    campaign = write_table_campaign(tmp_path, "by-hand", budget=7)
    first = ask_json(campaign, database_url, 3)

    assert [set(a) for a in first] == [ASK_KEYS] * 3  # the --json schema
    for a in first:
        assert isinstance(a["experiment"], int) and set(a["params"]) == PARAMS
        assert a["strategy"] == "initial-design" and a["predicted_mean"] is None
    store = Store.from_url(database_url)
    try:
        record = store.get_campaign("by-hand")
        assert record is not None and record.budget == 7
        for a in first:
            exp = store.get_experiment(a["experiment"])
            assert exp is not None and exp.state == "proposed" and exp.model_version == a["model_version"]
            assert exp.provenance_extra is not None
            assert exp.provenance_extra["source"] == "hands" and exp.provenance_extra["asked_by"] == "alice"
            assert exp.material_id is not None  # the same materials row an instrument's experiment gets

        # One by value, one failed synthesis, one by CSV: all three arrive.
        a, b, c = first
        assert sdl("tell", "by-hand", "--experiment", a["experiment"], "--value",
                   world_toughness(a["params"]), "--db", database_url, "--by", "bob")[0] == 0
        code, out, err = sdl("tell", "by-hand", "-e", b["experiment"], "--failed", "print delaminated",
                             "--db", database_url)
        assert code == 0 and "failed: print delaminated" in out, err
        code, _, err = sdl("tell", "by-hand", "-e", b["experiment"], "--value", "2", "--amend", "--db", database_url)
        assert code == 1 and "is failed (print delaminated): it cannot be told a result" in only_error_line(err)
        sheet = tmp_path / "results.csv"
        sheet.write_text(f"experiment,value,note\n{c['experiment']},{world_toughness(c['params'])},by eye\n")
        assert sdl("tell", "by-hand", "--csv", sheet, "--db", database_url)[0] == 0

        told = store.measurements(campaign_id=record.id)
        assert [(m.experiment_id, m.unit, m.quality) for m in told] == [(a["experiment"], "J", "ok"),
                                                                         (c["experiment"], "J", "ok")]
        assert told[0].instrument == "hands:bob" and str(told[1].instrument).startswith("hands:")
        failed = store.get_experiment(b["experiment"])
        assert failed is not None and failed.state == "failed" and failed.failure_kind == "material"
        assert len(store.events(record.id, "experiment.told")) == 3

        # Asking again: the model proposes, never a measured, failed or pending recipe.
        second = ask_json(campaign, database_url, 2)
        third = ask_json(campaign, database_url, 2)
        keys = [x["candidate"] for x in first + second + third]
        assert len(set(keys)) == len(keys) == 7
        assert all(x["predicted_mean"] is not None and x["predicted_std"] > 0 for x in second + third)
        assert {x["strategy"] for x in second} == {"gp"}
        assert second[0]["model_version"].startswith("gp-")
        assert store.model_versions(record.id), "the model behind the proposals is recorded, as in sdl run"

        # The budget (7) is taken: ask says so and writes nothing.
        before = len(store.experiments(record.id))
        code, _, err = sdl("ask", campaign, "-n", "1", "--db", database_url)
        assert code == 1 and "budget of 7 is taken" in only_error_line(err)
        assert len(store.experiments(record.id)) == before

        rows = [{"experiment": x["experiment"], "value": world_toughness(x["params"])} for x in second + third]
        sheet.write_text("experiment,value\n" + "".join(f"{r['experiment']},{r['value']}\n" for r in rows))
        code, out, err = sdl("tell", "by-hand", "--csv", sheet, "--db", database_url)
        assert code == 0 and "campaign by-hand completed: budget of 7 experiments reached" in out, err

        code, _, err = sdl("ask", campaign, "-n", "1", "--db", database_url)
        assert code == 1 and "is done (budget of 7 experiments reached)" in only_error_line(err)
    finally:
        store.close()

    code, out, _ = sdl("status", "--json", "--db", database_url)
    (summary,) = json.loads(out)
    assert summary["state"] == "completed"
    assert summary["counts"] == {"proposed": 0, "running": 0, "completed": 6, "failed": 1, "abandoned": 0}
    measured = [r["value"] for r in rows] + [world_toughness(a["params"]), world_toughness(c["params"])]
    assert summary["best_value"] == max(measured)
    code, out, _ = sdl("export", "by-hand", "--db", database_url)
    exported = list(csv.DictReader(io.StringIO(out)))
    assert len(exported) == 7 and {r["state"] for r in exported} == {"completed", "failed"}
    assert all(r["instruments"].startswith("hands:") for r in exported)
    assert all(r["model_version"] for r in exported)


def test_goal_reached_by_a_told_value_stops_the_campaign(tmp_path: Path, sqlite_url: str) -> None:
    campaign = write_table_campaign(tmp_path, "by-hand", budget=20, goal_value=5.0)
    (a,) = ask_json(campaign, sqlite_url, 1)
    code, out, _ = sdl("tell", "by-hand", "-e", a["experiment"], "--value", "5.5", "--db", sqlite_url)
    assert code == 0 and "campaign by-hand stopped: goal value 5.0 reached" in out
    code, _, err = sdl("ask", campaign, "--db", sqlite_url)
    assert code == 1 and "goal value 5.0 reached" in only_error_line(err)


# ---------------------------------------------------------------------------- all or nothing, amend, bad input


def test_csv_is_all_or_nothing_and_bad_input_is_one_line(tmp_path: Path, database_url: str) -> None:
    campaign = write_table_campaign(tmp_path, "by-hand", budget=8)
    asked = ask_json(campaign, database_url, 3)
    ids = [a["experiment"] for a in asked]
    sheet = tmp_path / "sheet.csv"
    cases = {
        f"experiment,value\n{ids[0]},1.5\n{ids[1]},lots\n": ("line 3", "value 'lots' is not a number"),
        f"experiment,value\n{ids[0]},1.5\n999,2.0\n": ("line 3", "campaign 'by-hand' has no experiment 999"),
        f"experiment,value\n{ids[0]},1.5\n{ids[0]},2.0\n": ("line 3", f"experiment {ids[0]} is told twice"),
        f"experiment,value,failed\n{ids[0]},1.5,\n{ids[1]},2.0,cracked\n": ("line 3", "both a value and a failure"),
        f"experiment,value\n{ids[0]},1.5\n{ids[1]},\n": ("line 3", "neither a value nor a failure"),
        f"experiment,value\n{ids[0]},1.5\nseven,2.0\n": ("line 3", "experiment 'seven' is not an experiment id"),
        f"experiment,value\n{ids[0]},1.5\n{ids[1]},inf\n": ("line 3", "is not a finite number"),
        f"experiment,value\n{ids[0]},1.5,extra\n": ("line 2", "more cells than the header"),
        f"id,toughness\n{ids[0]},1.5\n": ("line 1", "the header must name 'experiment'"),
    }
    for text, (line, message) in cases.items():
        sheet.write_text(text)
        code, _, err = sdl("tell", "by-hand", "--csv", sheet, "--db", database_url)
        error = only_error_line(err)
        assert code == 2 and f"{sheet} {line}" in error and message in error, (text, err)
    for args, message in [
        (("tell", "nobody", "-e", ids[0], "--value", "1"), "no campaign named 'nobody'"),
        (("tell", "by-hand", "-e", "12345", "--value", "1"), "campaign 'by-hand' has no experiment 12345"),
        (("tell", "by-hand", "-e", ids[0], "--value", "1.2.3"), "value '1.2.3' is not a number"),
        (("tell", "by-hand", "-e", ids[0]), "give --value V or --failed REASON"),
        (("tell", "by-hand", "-e", ids[0], "--value", "1", "--failed", "x"), "give --value V or --failed REASON"),
        (("tell", "by-hand", "--value", "1"), "--experiment ID"),
    ]:
        code, _, err = sdl(*args, "--db", database_url)
        assert code == 2 and message in only_error_line(err), (args, err)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text(campaign.read_text().replace("goal: maximize", "goal: maximise"))
    code, _, err = sdl("ask", bad_yaml, "--db", database_url)
    assert code == 2 and f"{bad_yaml}:" in only_error_line(err) and "objective.goal" in err

    store = Store.from_url(database_url)
    try:
        record = store.get_campaign("by-hand")
        assert record is not None
        assert [e.state for e in store.experiments(record.id)] == ["proposed"] * 3  # nothing written
        assert store.measurements(campaign_id=record.id) == []
        assert store.events(record.id, "experiment.told") == []
    finally:
        store.close()
    # A changed YAML is refused as sdl run refuses it, and accepted with --amend.
    changed = tmp_path / "by-hand.yaml"
    changed.write_text(campaign.read_text().replace("experiments: 8", "experiments: 9"))
    code, _, err = sdl("ask", changed, "--db", database_url)
    assert code == 2 and "budget.experiments 8 → 9" in only_error_line(err) and "--amend" in err
    assert len(ask_json(changed, database_url, 1, "--amend")) == 1


def test_a_completed_experiment_is_never_overwritten_without_amend(tmp_path: Path, database_url: str) -> None:
    campaign = write_table_campaign(tmp_path, "by-hand", budget=8)
    (a,) = ask_json(campaign, database_url, 1)
    eid = str(a["experiment"])
    assert sdl("tell", "by-hand", "-e", eid, "--value", "2.5", "--db", database_url)[0] == 0
    code, _, err = sdl("tell", "by-hand", "-e", eid, "--value", "3.5", "--db", database_url)
    assert code == 1 and f"experiment {eid} is already completed (toughness 2.5)" in only_error_line(err)
    code, _, err = sdl("tell", "by-hand", "-e", eid, "--failed", "oops", "--db", database_url)
    assert code == 1 and "cannot be marked failed" in only_error_line(err)
    code, out, err = sdl("tell", "by-hand", "-e", eid, "--value", "3.5", "--amend", "--by", "carol",
                         "--db", database_url)
    assert code == 0 and "amended; was 2.5" in out, err

    store = Store.from_url(database_url)
    try:
        record = store.get_campaign("by-hand")
        assert record is not None
        values = [(m.value, m.quality, m.instrument) for m in store.measurements(experiment_id=int(eid))]
        assert values[0][:2] == (2.5, "superseded") and values[1] == (3.5, "ok", "hands:carol")
        (obs,) = store.observations(record.id, "toughness")
        assert obs.value == 3.5  # the engine learns the amended value only
        (amended,) = store.events(record.id, "experiment.amended")
        assert amended.payload == {"old": [2.5], "new": 3.5, "by": "carol", "origin": ""}

        # Two hands at once: the second waits its turn (the lease an ask or tell holds for seconds).
        from sdl.repository import hold_lease

        with hold_lease(store, record.id, holder="sdl ask (bob)"):
            code, _, err = sdl("ask", campaign, "--db", database_url)
            assert code == 1 and "busy with sdl ask (bob)" in only_error_line(err) and "try again" in err
        assert len(store.experiments(record.id)) == 1
    finally:
        store.close()


# ---------------------------------------------------------------------------- hands and instruments


def test_hands_and_instruments_share_one_campaign(tmp_path: Path, sqlite_url: str) -> None:
    from sdl.config import load_campaign
    from sdl.lab import open_lab, run_plain

    campaign = write_table_campaign(tmp_path, "mixed", budget=6, time_scale=0.002)
    early, late = ask_json(campaign, sqlite_url, 2)
    hand_ids = {early["experiment"], late["experiment"]}

    cfg = load_campaign(campaign)
    with open_lab(cfg, sqlite_url) as lab:
        # While sdl run holds the campaign: no asking behind its back (nothing written) ...
        code, _, err = sdl("ask", campaign, "--db", sqlite_url)
        assert code == 1 and "is being run by sdl run" in only_error_line(err)
        # ... but a result of an experiment asked by hand is welcome; the run learns it.
        code, out, err = sdl("tell", "mixed", "-e", early["experiment"], "--value",
                             world_toughness(early["params"]), "--db", sqlite_url)
        assert code == 0 and "learns these before it proposes again" in out, err
        state = run_plain(lab)
        assert lab.counts()["completed"] == 5  # 4 on the instruments (the budget minus 2 by hand), 1 by hand
        assert lab.engine.n_observed == 5
        mine = next(e for e in lab.store.experiments(lab.campaign_id) if e.id not in hand_ids)
        code, _, err = sdl("tell", "mixed", "-e", mine.id, "--value", "1.0", "--amend", "--db", sqlite_url)
        assert code == 1 and f"experiment {mine.id} is not one of the campaign's 'hands'" in only_error_line(err)
    assert state == "stopped"

    store = Store.from_url(sqlite_url)
    try:
        record = store.get_campaign("mixed")
        assert record is not None
        stopped = store.events(record.id, "campaign.stopped")[-1]
        assert f"1 experiment(s) asked by hand wait for `sdl tell` ({late['experiment']})" in stopped.message
        assert len(store.events(record.id, "experiment.learnt")) == 1
        experiments = store.experiments(record.id)
        for exp in experiments:
            if exp.id in hand_ids:  # never sent to an instrument
                told = exp.id == early["experiment"]
                assert exp.state == ("completed" if told else "proposed") and not store.runs(exp.id)
                assert (exp.instruments or ["hands:"])[0].startswith("hands:")
            else:
                assert exp.state == "completed" and exp.instruments == ["printer"] and store.runs(exp.id)
        keys = [e.candidate_key for e in experiments]
        assert len(set(keys)) == len(keys) == 6  # the instruments never repeated a recipe pending by hand
    finally:
        store.close()

    code, out, err = sdl("tell", "mixed", "-e", late["experiment"], "--value", world_toughness(late["params"]),
                         "--db", sqlite_url)
    assert code == 0 and "campaign mixed completed: budget of 6 experiments reached" in out, err
    code, out, _ = sdl("status", "--json", "--db", sqlite_url)
    (summary,) = json.loads(out)
    assert summary["state"] == "completed" and summary["counts"]["completed"] == 6
    assert summary["n_measurements"] >= 6


@pytest.mark.slow
def test_sdl_run_leaves_the_experiments_asked_by_hand_to_hands(tmp_path: Path, sqlite_url: str) -> None:
    """The real ``sdl run`` (a Prefect flow, ephemeral server) beside two experiments asked by hand."""
    campaign = write_table_campaign(tmp_path, "mixrun", budget=5, time_scale=0.002)
    by_hand = ask_json(campaign, sqlite_url, 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    proc = subprocess.run([sys.executable, "-m", "sdl.cli.main", "run", str(campaign), "--db", sqlite_url],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "mixrun stopped: 2 experiment(s) asked by hand wait for `sdl tell`" in proc.stdout, proc.stdout
    code, out, _ = sdl("status", "--json", "--db", sqlite_url)
    (summary,) = json.loads(out)
    assert summary["state"] == "stopped"
    assert summary["counts"] == {"proposed": 2, "running": 0, "completed": 3, "failed": 0, "abandoned": 0}

    sheet = tmp_path / "bench.csv"
    sheet.write_text("experiment,value\n" + "".join(f"{a['experiment']},{world_toughness(a['params'])}\n"
                                                    for a in by_hand))
    code, out, err = sdl("tell", "mixrun", "--csv", sheet, "--db", sqlite_url)
    assert code == 0 and "campaign mixrun completed: budget of 5 experiments reached" in out, err
    code, out, _ = sdl("export", "mixrun", "--db", sqlite_url)
    by_source = sorted(r["instruments"] for r in csv.DictReader(io.StringIO(out)))
    assert by_source[2:] == ["printer"] * 3 and all(s.startswith("hands:") for s in by_source[:2])


def test_a_crystal_pool_asks_for_candidates_with_their_formulas(tmp_path: Path, sqlite_url: str) -> None:
    """A pretrained CHGNet head on 40 real perovskites: proposals name the candidate and its formula."""
    with gzip.open(CRYSTAL_WORLD, "rt", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for _, row in zip(range(40), reader, strict=False)]
    pool = tmp_path / "pool.csv"
    with pool.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    campaign = tmp_path / "pool.yaml"
    campaign.write_text("\n".join([
        "name: pool-by-hand", "seed: 0",
        f"search_space: {{candidates: {{file: {pool}, id_column: id, structure_column: cif, "
        "formula_column: formula}}",
        "objective: {property: e_form, unit: eV, goal: minimize, extensive: true}",
        "model: {name: gnn-ensemble, options: {backbone: chgnet, head: auto, use_prior: true}}",
        "acquisition: {function: qucb, batch_size: 2}",
        "initial_design: {strategy: prior, size: 2}",
        "budget: {experiments: 6}",
    ]) + "\n")
    first = ask_json(campaign, sqlite_url, 2)
    formulas = {r["id"]: r["formula"] for r in rows}
    truth = {r["id"]: float(r["e_form"]) for r in rows}
    for a in first:
        assert set(a) == ASK_KEYS and a["params"]["candidate"] == a["candidate"]
        assert a["params"]["formula"] == formulas[a["candidate"]]
    sheet = tmp_path / "e.csv"
    sheet.write_text("experiment,value\n" + "".join(f"{a['experiment']},{truth[a['candidate']]}\n" for a in first))
    assert sdl("tell", "pool-by-hand", "--csv", sheet, "--db", sqlite_url)[0] == 0
    second = ask_json(campaign, sqlite_url, 2)
    assert {a["candidate"] for a in second}.isdisjoint(a["candidate"] for a in first)
    assert all(a["predicted_mean"] is not None and a["predicted_std"] > 0 for a in second)


# ---------------------------------------------------------------------------- several objectives


def perovskite_truth() -> dict[str, dict[str, float]]:
    """The recorded e_form and gap_gllbsc of each demo crystal (what a person at the bench would measure)."""
    with gzip.open(PEROVSKITE_WORLD, "rt", newline="") as handle:
        return {r["id"]: {"e_form": float(r["e_form"]), "gap_gllbsc": float(r["gap_gllbsc"])}
                for r in csv.DictReader(handle)}


def test_several_objectives_are_asked_and_told_property_by_property(tmp_path: Path, database_url: str) -> None:
    """The composition GP over 400 real perovskites, two objectives and a constraint, told by hand."""
    campaign = write_pareto_campaign(tmp_path, "mo-hand", budget=6, instruments=False)
    truth = perovskite_truth()
    first = ask_json(campaign, database_url, 4)
    assert [set(a) for a in first] == [ASK_KEYS] * 4  # no model yet: nothing predicted, no "predicted" key
    a, b, c, d = first
    ea, eb = str(a["experiment"]), str(b["experiment"])

    code, out, err = sdl("tell", "mo-hand", "-e", ea, "--value", f"e_form={truth[a['candidate']]['e_form']}",
                         "--value", f"gap_gllbsc = {truth[a['candidate']]['gap_gllbsc']}", "--by", "bob",
                         "--db", database_url)
    assert code == 0 and f"e_form = {truth[a['candidate']]['e_form']:g} eV, gap_gllbsc = " in out, err
    for args, message in [  # bad input: one line naming the property, exit 2, nothing written
        (("--value", "0.5"), "'0.5' names no property; the campaign has several objectives: give "
                             "--value e_form=V --value gap_gllbsc=V"),
        (("--value", "e_form=0.5"), "no value of gap_gllbsc (an experiment completes with e_form, gap_gllbsc)"),
        (("--value", "e_form=0.5", "--value", "band_gap=2"), "'band_gap' is not one of the campaign's properties "
                                                               "(e_form, gap_gllbsc)"),
        (("--value", "e_form=0.5", "--value", "e_form=0.6"), "e_form is given twice"),
        (("--value", "e_form=lots", "--value", "gap_gllbsc=1"), "--value e_form: value 'lots' is not a number"),
        (("--value", "gap_gllbsc=2", "--amend"), "no value of e_form"),  # an amendment completes nothing
    ]:
        code, _, err = sdl("tell", "mo-hand", "-e", eb, *args, "--db", database_url)
        assert code == 2 and message in only_error_line(err), (args, err)
    sheet = tmp_path / "mo.csv"
    for text, (line, message) in {
        f"experiment,value\n{eb},1.0\n": ("line 1", "name one column per property (e_form, gap_gllbsc), not 'value'"),
        f"experiment,e_form,gap_gllbsc\n{eb},0.1,2.0\n{c['experiment']},0.2,\n":
            ("line 3", f"experiment {c['experiment']}: no value of gap_gllbsc"),
        f"experiment,e_form,gap_gllbsc,failed\n{eb},0.1,,cracked\n": ("line 2", "both a value and a failure"),
        f"experiment,e_form,gap_gllbsc\n{eb},0.1,wide\n": ("line 2 gap_gllbsc", "value 'wide' is not a number"),
        f"id,e_form\n{eb},0.1\n": ("line 1", "the header must name 'experiment' and 'e_form', 'gap_gllbsc'"),
    }.items():
        sheet.write_text(text)
        code, _, err = sdl("tell", "mo-hand", "--csv", sheet, "--db", database_url)
        assert code == 2 and f"{sheet} {line}" in only_error_line(err) and message in err, (text, err)

    # b and c by CSV with one column per property (a note column beside them), d a failed synthesis.
    sheet.write_text("experiment,gap_gllbsc,E_form,failed,note\n"
                     + "".join(f"{x['experiment']},{truth[x['candidate']]['gap_gllbsc']},"
                               f"{truth[x['candidate']]['e_form']},,by eye\n" for x in (b, c))
                     + f"{d['experiment']},,,powder did not react,\n")
    code, out, err = sdl("tell", "mo-hand", "--csv", sheet, "--db", database_url)
    assert code == 0 and "failed: powder did not react" in out, err

    store = Store.from_url(database_url)
    try:
        record = store.get_campaign("mo-hand")
        assert record is not None
        for x in (a, b, c):  # every property in the campaign's unit, in the transaction of the completion
            got = {m.property: (m.value, m.unit, m.quality) for m in store.measurements(experiment_id=x["experiment"])}
            want = truth[x["candidate"]]
            assert got == {p: (want[p], "eV", "ok") for p in ("e_form", "gap_gllbsc")}
        told = {e.experiment_id: e.payload for e in store.events(record.id, "experiment.told")}
        assert told[a["experiment"]]["values"] == truth[a["candidate"]] and told[a["experiment"]]["by"] == "bob"
    finally:
        store.close()

    # The model now predicts every objective; the first is also predicted_mean / predicted_std, as before.
    second = ask_json(campaign, database_url, 2)
    keys = [x["candidate"] for x in first + second]
    assert len(set(keys)) == 6
    for x in second:
        assert set(x) == ASK_KEYS | {"predicted"} and set(x["predicted"]) == {"e_form", "gap_gllbsc"}
        assert x["predicted"]["e_form"] == {"mean": x["predicted_mean"], "std": x["predicted_std"]}
        assert all(v["std"] > 0 for v in x["predicted"].values())
    code, out, _ = sdl("ask", campaign, "-n", "1", "--db", database_url)  # the budget is taken
    assert code == 1

    # --amend supersedes one property, the other stays as told; without --amend: refused, naming both.
    code, _, err = sdl("tell", "mo-hand", "-e", ea, "--value", "e_form=1", "--value", "gap_gllbsc=1",
                       "--db", database_url)
    old = truth[a["candidate"]]
    assert code == 1 and (f"experiment {ea} is already completed (e_form {old['e_form']:g}; gap_gllbsc "
                          f"{old['gap_gllbsc']:g}); rerun with --amend") in only_error_line(err)
    code, out, err = sdl("tell", "mo-hand", "-e", ea, "--value", "gap_gllbsc=2.25", "--amend", "--by", "carol",
                         "--db", database_url)
    assert code == 0 and f"gap_gllbsc = 2.25 eV (amended; was {old['gap_gllbsc']:g})" in out, err

    sheet.write_text("experiment,e_form,gap_gllbsc\n" + "".join(
        f"{x['experiment']},{truth[x['candidate']]['e_form']},{truth[x['candidate']]['gap_gllbsc']}\n"
        for x in second))
    code, out, err = sdl("tell", "mo-hand", "--csv", sheet, "--db", database_url)
    assert code == 0 and "campaign mo-hand completed: budget of 6 experiments reached" in out, err

    store = Store.from_url(database_url)
    try:
        record = store.get_campaign("mo-hand")
        assert record is not None
        values = {m.property: [(v.value, v.quality) for v in store.measurements(experiment_id=a["experiment"])
                               if v.property == m.property]
                  for m in store.measurements(experiment_id=a["experiment"])}
        assert values == {"e_form": [(old["e_form"], "ok")],
                          "gap_gllbsc": [(old["gap_gllbsc"], "superseded"), (2.25, "ok")]}
        (amended,) = store.events(record.id, "experiment.amended")
        assert amended.payload == {"old": {"gap_gllbsc": [old["gap_gllbsc"]]}, "new": {"gap_gllbsc": 2.25},
                                   "by": "carol", "origin": ""}
    finally:
        store.close()

    # sdl status: the first objective's best (as sdl run's summary), the objectives and the measured front.
    from sdl.engine.pareto import MultiObjective

    code, out, _ = sdl("status", "--json", "--db", database_url)
    (summary,) = json.loads(out)
    measured = {x["candidate"]: dict(truth[x["candidate"]]) for x in (a, b, c, *second)}
    measured[a["candidate"]]["gap_gllbsc"] = 2.25
    assert summary["objective"] == "e_form" and summary["best_value"] == min(v["e_form"] for v in measured.values())
    assert summary["objectives"] == [{"property": "e_form", "goal": "minimize"},
                                     {"property": "gap_gllbsc", "goal": "target"}]
    objectives = MultiObjective.from_snapshot({"objectives": [
        {"property": "e_form", "unit": "eV", "goal": "minimize"},
        {"property": "gap_gllbsc", "unit": "eV", "goal": "target", "target_range": [1.5, 3.0]}],
        "constraints": [{"property": "gap_gllbsc", "op": ">=", "value": 0.5}], "reference_point": [1.0, 1.5]})
    import numpy as np

    names = list(measured)
    Y = np.asarray([[measured[k]["e_form"], measured[k]["gap_gllbsc"]] for k in names])
    assert sorted(r["candidate"] for r in summary["pareto_front"]) == sorted(
        names[i] for i in np.flatnonzero(objectives.front(Y)))
    assert summary["hypervolume"] == pytest.approx(objectives.hypervolume(Y, objectives.reference_utility(Y)))
    code, out, _ = sdl("status", "--db", database_url)
    (row,) = [line for line in out.splitlines() if line.strip().startswith("mo-hand")]
    assert code == 0 and f"; front {len(summary['pareto_front'])}" in row and "min e_form, target" in row


def test_several_objectives_stop_when_the_front_stops_growing(tmp_path: Path, sqlite_url: str) -> None:
    """Patience counts experiments since the measured front grew, as in sdl run, not since a better e_form."""
    campaign = write_pareto_campaign(tmp_path, "mo-patience", budget=20, instruments=False,
                                     stopping={"patience": 1})
    design = ask_json(campaign, sqlite_url, 4)
    # Measured (e_form, gap): the first two and the last join the front; the third is dominated by the
    # second. A better-e_form rule would have stopped after three experiments without a lower e_form.
    told = [(-1.0, 0.6), (0.5, 2.0), (0.8, 1.0), (-0.5, 1.2)]
    sheet = tmp_path / "front.csv"
    sheet.write_text("experiment,e_form,gap_gllbsc\n" + "".join(
        f"{x['experiment']},{e},{g}\n" for x, (e, g) in zip(design, told, strict=True)))
    code, out, err = sdl("tell", "mo-patience", "--csv", sheet, "--db", sqlite_url)
    assert code == 0 and "stopped" not in out and "no improvement" not in out, out + err
    more = ask_json(campaign, sqlite_url, 2)
    sheet.write_text("experiment,e_form,gap_gllbsc\n" + "".join(
        f"{x['experiment']},0.9,{g}\n" for x, g in zip(more, (0.6, 0.7), strict=True)))  # both dominated
    code, out, err = sdl("tell", "mo-patience", "--csv", sheet, "--db", sqlite_url)
    assert code == 0 and "campaign mo-patience stopped: no improvement in 1 rounds (2 experiments)" in out, err
    code, _, err = sdl("ask", campaign, "--db", sqlite_url)
    assert code == 1 and "no improvement in 1 rounds" in only_error_line(err)


def test_a_run_learns_every_property_told_by_hand(tmp_path: Path, sqlite_url: str) -> None:
    """Lab.sync_hands (what sdl run calls before it proposes) reads back both objectives of a told experiment."""
    from sdl.config import load_campaign
    from sdl.engine import Engine
    from sdl.lab.instruments import InstrumentPool
    from sdl.lab.laboratory import Lab

    campaign = write_pareto_campaign(tmp_path, "mo-sync", budget=6, instruments=False)
    truth = perovskite_truth()
    asked = ask_json(campaign, sqlite_url, 4)
    cfg = load_campaign(campaign)
    store = Store.from_url(sqlite_url)
    try:
        lab = Lab(cfg, store, Engine.from_campaign(cfg), InstrumentPool({}), state_dir=tmp_path / "state")
        lab.load()
        assert lab.engine.n_observed == 0 and len(lab.ledger.by_hand()) == 4
        sheet = tmp_path / "bench.csv"
        sheet.write_text("experiment,e_form,gap_gllbsc\n" + "".join(
            f"{x['experiment']},{truth[x['candidate']]['e_form']},{truth[x['candidate']]['gap_gllbsc']}\n"
            for x in asked[:3]))
        assert sdl("tell", "mo-sync", "--csv", sheet, "--db", sqlite_url)[0] == 0
        assert lab.sync_hands() == 3
        measured = lab.engine.measured()  # n x (e_form, gap_gllbsc): no property left unknown
        want = [[truth[x["candidate"]]["e_form"], truth[x["candidate"]]["gap_gllbsc"]] for x in asked[:3]]
        assert measured.tolist() == want
        assert lab.ledger.counts()["completed"] == 3 and len(lab.ledger.by_hand()) == 1
        learnt = {e.experiment_id: e.payload for e in store.events(lab.campaign_id, "experiment.learnt")}
        assert {i: p["values"] for i, p in learnt.items()} == {
            x["experiment"]: {"gap_gllbsc": truth[x["candidate"]]["gap_gllbsc"]} for x in asked[:3]}
        proposals = lab.engine.propose(q=1, pending=lab.ledger.pending_keys(), exclude=lab.ledger.excluded_keys())
        assert proposals[0].predictions is not None and set(proposals[0].predictions) == {"e_form", "gap_gllbsc"}
    finally:
        store.close()
