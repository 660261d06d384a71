"""By hand: ``ask`` the engine for experiments, ``tell`` it what a person measured.

Why these are the lab's own functions and not a second loop: a person at the bench (or an
instrument without a driver) is one more way of carrying out the campaign's experiments. ``ask``
builds the same :class:`~sdl.lab.laboratory.Lab` that ``sdl run`` builds, minus the instruments:
the same campaign row (config hash, ``--amend`` rule), the same ledger (budget, goal, patience,
failures), the same engine call with the same pending and excluded keys, and the same provenance
columns. ``tell`` writes the same rows an instrument's measurement leaves (a ``measurements`` row
whose instrument is ``hands:<who>``, the experiment's state changes and their events), so
``sdl status``, ``sdl export`` and the next ``sdl run`` see asked and told experiments like any other.

Hands and instruments. An asked experiment is marked ``source: hands`` in its provenance: it is a
pending point for every later proposal and counts against the budget, but ``sdl run`` never sends
it to an instrument (:meth:`Lab.recover`) and does not wait for it. ``ask`` takes the campaign's
lease for the seconds it needs, the lease ``sdl run`` holds while it runs; so while the instruments
run a campaign, ``ask`` refuses with one line naming the runner: the running process owns the
proposal numbering, the engine's pending points and the budget in memory, and a proposal slipped
in behind its back could repeat one of its candidates or overrun its budget. ``tell`` takes the
lease too; when ``sdl run`` holds it, results of experiments asked by hand are still recorded (the
runner never touches those, and :meth:`Lab.sync_hands` reads them back before it proposes again),
while a result for one of the run's own experiments is refused.

Several objectives. An experiment completes with a value of every property the campaign models
(:func:`stored_properties`), in the transaction of its state change: a half-told experiment would
be "completed" while neither the engine nor the Pareto front could use it, so it is refused with
one line naming what is missing. An amendment may name some properties and supersedes only those.
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdl.exceptions import SDLError
from sdl.lab.ledger import HANDS, ExperimentLedger, StoppingPolicy, asked_by_hand

if TYPE_CHECKING:
    from sdl.config import CampaignConfig
    from sdl.repository import CampaignLocked, CampaignRecord, HandOutcome, HandResult, Store

__all__ = [
    "AskResult",
    "AskedExperiment",
    "CampaignDone",
    "HandInputError",
    "TellResult",
    "ask",
    "campaign_properties",
    "default_teller",
    "hand_result",
    "parse_told",
    "parse_value",
    "read_results_csv",
    "stored_properties",
    "tell",
]

logger = logging.getLogger(__name__)

Say = Callable[[str], None]


class HandInputError(SDLError, ValueError):
    """What a person typed cannot be used: ``str(err)`` is one line naming the file, line or field."""


class CampaignDone(SDLError):
    """The campaign's budget is spent or taken, or a stopping rule fired: there is nothing to ask."""


@dataclass(frozen=True)
class AskedExperiment:
    """One experiment ``ask`` recorded as proposed: the id to tell, and why it was chosen.

    Attributes:
        experiment: Repository id (``sdl tell CAMPAIGN --experiment <this>``).
        candidate: The engine's key (candidate id, or the canonical recipe).
        params: Parameter values; for candidate pools ``candidate`` and ``formula`` (if known) too.
        predicted_mean: The model's mean of the objective property (None before any model).
        predicted_std: The model's standard deviation.
        acquisition_value: The value it won the acquisition with (None for design picks).
        model_version: The model that proposed it.
        batch_id: Shared by the experiments of one ask.
        strategy: ``initial-design``, ``random``, ``gp`` or ``gnn-ensemble``.
        predicted: Several objectives: ``property -> {"mean", "std"}`` of every modelled property
            (None with one objective, and before any model).
    """

    experiment: int
    candidate: str
    params: dict[str, Any]
    predicted_mean: float | None
    predicted_std: float | None
    acquisition_value: float | None
    model_version: str | None
    batch_id: str | None
    strategy: str | None
    predicted: dict[str, dict[str, float]] | None = None

    def as_json(self) -> dict[str, Any]:
        """A JSON-able dict (the ``sdl ask --json`` object; ``predicted`` only with several objectives)."""
        data = asdict(self)
        if self.predicted is None:
            del data["predicted"]
        return data


@dataclass(frozen=True)
class AskResult:
    """What one ``ask`` did (``remaining``: experiments the budget still allows after these)."""

    campaign: str
    campaign_id: int
    property: str
    unit: str | None
    experiments: list[AskedExperiment]
    remaining: int
    note: str | None = None
    properties: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class TellResult:
    """What one ``tell`` did, and where the campaign stands afterwards (``pending``: None when
    another process runs the campaign and counts for itself; ``note`` then says so)."""

    campaign: str
    property: str
    unit: str | None
    outcomes: list[HandOutcome]
    state: str
    stop_reason: str | None
    pending: int | None
    note: str | None = None
    properties: dict[str, str | None] = field(default_factory=dict)


def default_teller() -> str:
    """Who tells, when ``--by`` is not given: the operating-system user."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER") or "unknown"


# ---------------------------------------------------------------------------- ask


def ask(
    cfg: CampaignConfig,
    database_url: str,
    n: int,
    *,
    by: str,
    amend: bool = False,
    say: Say | None = None,
    featurizing: Callable[[int, int], None] | None = None,
) -> AskResult:
    """Propose ``n`` experiments for a person to carry out, recorded as ``proposed`` with provenance.

    The campaign is created on first use, exactly as ``sdl run`` would create it. Fewer than ``n``
    come back when the budget allows fewer (``note`` says so).

    Args:
        cfg: The loaded campaign.
        database_url: Repository URL (migrated to head on open).
        n: How many experiments to ask for (at least 1).
        by: Who asks (recorded in each experiment's provenance).
        amend: Accept a changed YAML for an existing campaign (recorded as an event).
        say: Told each stage in words (loading, featurising, fitting, proposing).
        featurizing: ``(done, total)`` while a crystal pool is embedded by the backbone.

    Raises:
        CampaignLocked: ``sdl run`` (or another ask/tell) holds the campaign now.
        CampaignConfigChanged: The YAML differs from the stored campaign and ``amend`` is False.
        CampaignDone: The budget is spent or taken by pending experiments, or a rule fired.
    """
    from sdl.engine import Engine
    from sdl.engine.models.embedding_store import EmbeddingStore, default_store_path
    from sdl.lab.instruments import InstrumentPool
    from sdl.lab.laboratory import Lab, state_dir_for
    from sdl.repository import Store, hold_lease

    if n < 1:
        raise HandInputError(f"-n {n}: ask for at least one experiment")
    tell_stage = say or (lambda message: logger.info("%s", message))
    tell_stage(f"campaign {cfg.name}: opening the repository")
    store = Store.from_url(database_url, create=True)
    with contextlib.ExitStack() as stack:
        stack.callback(store.close)
        holder = f"sdl ask ({by})"
        existing = store.get_campaign(cfg.name)
        if existing is not None:  # the lease first: never touch a campaign that sdl run is running
            stack.enter_context(hold_lease(store, existing.id, holder=holder))
        tell_stage(f"campaign {cfg.name}: loading the engine ({cfg.model.name})")
        engine = Engine.from_campaign(cfg, embedding_store=EmbeddingStore(default_store_path(database_url)))
        lab = Lab(cfg, store, engine, InstrumentPool({}), state_dir=state_dir_for(database_url) / cfg.name,
                  amend=amend)
        record = lab.load()
        if existing is None:
            stack.enter_context(hold_lease(store, record.id, holder=holder))
        pending = store.pending_experiments(record.id)
        for exp in pending:
            lab.ledger.track(exp.id, exp.candidate_key, exp.state, exp.batch_id,
                             by_hand=asked_by_hand(exp.provenance_extra))
        lab.ledger.check_rules()
        _refuse_if_done(lab.ledger, cfg.name)
        q = min(n, lab.ledger.remaining())
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if threads:
            import torch

            torch.set_num_threads(threads)
        tell_stage(f"campaign {cfg.name}: preparing the candidates")
        engine.prepare(progress=featurizing)
        tell_stage(f"campaign {cfg.name}: fitting on {engine.n_observed} measurement(s), "
                   f"{len(pending)} pending; proposing {q}")
        tickets = lab.propose(q, asked_by=by)
        while tickets and len(tickets) < q:  # a batch across the end of the design comes back short
            more = lab.propose(q - len(tickets), asked_by=by)
            if not more:
                break
            tickets += more
        if not tickets:
            raise CampaignDone(f"campaign {cfg.name!r}: {lab.stop_reason or 'the engine proposed nothing'}")
        asked = [_asked(store, t.experiment_id, pool=cfg.search_space.candidates is not None) for t in tickets]
        store.log_event(
            "campaign.asked", f"{by} asked for {len(asked)} experiment(s): "
            + ", ".join(str(a.experiment) for a in asked),
            campaign_id=record.id, payload={"by": by, "experiments": [a.experiment for a in asked], "n": n},
        )
        note = None
        if q < n:
            note = (f"the budget ({lab.budget}) allows {q} more, not {n}: "
                    f"{lab.ledger.n_ended} ended, {len(lab.ledger.inflight()) - len(tickets)} pending before this ask")
        return AskResult(cfg.name, record.id, cfg.objective.property, cfg.objective.unit, asked,
                         lab.ledger.remaining(), note, stored_properties(record.config_snapshot))
    raise AssertionError("unreachable")  # pragma: no cover


def _refuse_if_done(ledger: ExperimentLedger, name: str) -> None:
    if ledger.failure is not None:
        raise CampaignDone(f"campaign {name!r} has failed ({ledger.failure}): nothing to ask")
    if ledger.stop_reason is not None:
        raise CampaignDone(f"campaign {name!r} is done ({ledger.stop_reason}): nothing to ask")
    if ledger.remaining() == 0:
        hands = len(ledger.by_hand())
        raise CampaignDone(
            f"campaign {name!r}: its budget of {ledger.policy.budget} is taken ({ledger.n_ended} ended, "
            f"{len(ledger.inflight())} pending, {hands} of them by hand): tell their results first"
        )


def _asked(store: Store, experiment_id: int, *, pool: bool) -> AskedExperiment:
    exp = store.get_experiment(experiment_id)
    assert exp is not None
    params = dict(exp.params or {})
    if pool:
        params = {"candidate": exp.candidate_key, **params}
    extra = exp.provenance_extra or {}
    predicted = extra.get("predicted")
    return AskedExperiment(
        experiment=exp.id, candidate=exp.candidate_key, params=params, predicted_mean=exp.predicted_mean,
        predicted_std=exp.predicted_std, acquisition_value=exp.acquisition_value,
        model_version=exp.model_version, batch_id=exp.batch_id,
        strategy=str(extra["strategy"]) if extra.get("strategy") is not None else None,
        predicted={str(k): {"mean": float(v["mean"]), "std": float(v["std"])} for k, v in predicted.items()}
        if isinstance(predicted, Mapping) else None,
    )


# ---------------------------------------------------------------------------- tell


def parse_value(text: object, where: str) -> float:
    """A measured value as typed: a finite number, else one line naming ``where``."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise HandInputError(f"{where}: value {str(text)!r} is not a number") from None
    if not math.isfinite(value):
        raise HandInputError(f"{where}: value {str(text)!r} is not a finite number")
    return value


def _parse_experiment(text: object, where: str) -> int:
    try:
        number = int(str(text).strip())
    except ValueError:
        raise HandInputError(f"{where}: experiment {str(text)!r} is not an experiment id (a whole number)") from None
    if number < 1:
        raise HandInputError(f"{where}: experiment {number} is not an experiment id")
    return number


def stored_properties(snapshot: Mapping[str, Any], campaign: str = "") -> dict[str, str | None]:
    """Property -> unit of what completes one of the campaign's experiments, from its stored config.

    One objective: just it. Several: each objective's property, then each constrained one (no
    unit in the config: None), as :attr:`sdl.config.CampaignConfig.modelled_properties` orders them.

    Raises:
        HandInputError: The stored configuration names no objective.
    """
    from sdl.engine.pareto import MultiObjective

    try:
        objectives = MultiObjective.from_snapshot(snapshot)
    except ValueError as exc:
        raise HandInputError(f"campaign {campaign!r}: {exc}") from None
    units = {o.property: o.unit for o in objectives.objectives}
    return {p: units.get(p) for p in objectives.properties}


def campaign_properties(database_url: str, campaign: str) -> dict[str, str | None]:
    """:func:`stored_properties` of a campaign in the repository (what ``--value`` and a CSV may name).

    Raises:
        HandInputError: No campaign of that name.
    """
    from sdl.repository import Store

    store = Store.from_url(database_url)
    try:
        return stored_properties(_record(store, campaign).config_snapshot, campaign)
    finally:
        store.close()


def parse_told(texts: Sequence[str], properties: Mapping[str, str | None], where: str, *,
               amend: bool = False) -> dict[str, float]:
    """``--value`` as typed: ``PROPERTY=V`` once per property, or a bare ``V`` with one objective.

    Without ``amend`` every property is needed (an experiment completes with all of them at once);
    an amendment may name some.

    Raises:
        HandInputError: One line naming the unknown, repeated or missing property, or the bad number.
    """
    names = list(properties)
    told: dict[str, float] = {}
    for text in texts:
        name, sep, number = str(text).partition("=")
        if not sep:
            if len(names) > 1:
                raise HandInputError(
                    f"{where}: {text!r} names no property; the campaign has several objectives: give "
                    + " ".join(f"--value {p}=V" for p in names))
            name, number = names[0], str(text)
        name = name.strip()
        if name not in properties:
            raise HandInputError(f"{where}: {name!r} is not one of the campaign's properties "
                                 f"({', '.join(names)})")
        if name in told:
            raise HandInputError(f"{where}: {name} is given twice")
        told[name] = parse_value(number, f"{where} {name}" if len(names) > 1 else where)
    missing = [p for p in names if p not in told]
    if missing and not amend:
        raise HandInputError(f"{where}: no value of {', '.join(missing)} (an experiment completes with "
                             f"{', '.join(names)})")
    return told


def hand_result(experiment: int, told: Mapping[str, float], properties: Mapping[str, str | None], *,
                failed: str | None = None, origin: str = "") -> HandResult:
    """The :class:`~sdl.repository.HandResult` of one experiment (one objective: ``value``, as before)."""
    from sdl.repository import HandResult

    if len(properties) > 1:
        return HandResult(experiment, failed=failed, origin=origin, values=dict(told))
    return HandResult(experiment, value=next(iter(told.values()), None), failed=failed, origin=origin)


def read_results_csv(path: Path, properties: Mapping[str, str | None] | None = None) -> list[HandResult]:
    """Results from a CSV file: column ``experiment``, the measured values, and/or ``failed``.

    The values: one column per property the campaign measures (its header names the property);
    with one objective the column may be called ``value``, as before. One row per experiment: the
    values, or in ``failed`` the reason the synthesis failed (never both). Other columns
    (``candidate``, ``formula``, notes) are ignored, so the output of ``sdl ask --json`` turned
    into a table can be filled in. Blank lines are skipped.

    Args:
        path: The file.
        properties: Property -> unit (:func:`stored_properties`); None: one unnamed objective.

    Raises:
        HandInputError: One line naming the file and the line of the first bad row.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise HandInputError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from None
    props = dict(properties or {"value": None})
    names = list(props)
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip().lower() for c in (reader.fieldnames or [])]
    by_column = {p.lower(): p for p in names}
    if len(names) == 1:
        by_column["value"] = names[0]
    elif "value" in columns:
        raise HandInputError(f"{path} line 1: the campaign has several objectives: name one column per property "
                             f"({', '.join(names)}), not 'value'")
    value_columns = [c for c in columns if c in by_column]
    if "experiment" not in columns or not (value_columns or "failed" in columns):
        wanted = "'value'" if len(names) == 1 else ", ".join(repr(p) for p in names)
        raise HandInputError(f"{path} line 1: the header must name 'experiment' and {wanted} and/or 'failed' "
                             f"(found {', '.join(columns) or 'nothing'})")
    if len({by_column[c] for c in value_columns}) < len(value_columns):
        raise HandInputError(f"{path} line 1: two columns hold {names[0]} ({', '.join(value_columns)})")
    reader.fieldnames = columns
    results: list[HandResult] = []
    for row in reader:
        where = f"{path} line {reader.line_num}"
        if None in row:
            raise HandInputError(f"{where}: more cells than the header has columns")
        cells = {k: (v or "").strip() for k, v in row.items()}
        if not any(cells.values()):
            continue
        experiment = _parse_experiment(cells.get("experiment", ""), where)
        failed = cells.get("failed", "")
        filled = {by_column[c]: cells[c] for c in value_columns if cells.get(c)}
        if filled and failed:
            raise HandInputError(f"{where}: experiment {experiment} has both a value and a failure reason")
        if not filled and not failed:
            raise HandInputError(f"{where}: experiment {experiment} has neither a value nor a failure reason")
        told = {p: parse_value(v, f"{where} {p}" if len(names) > 1 else where) for p, v in filled.items()}
        results.append(hand_result(experiment, told, props, failed=failed or None, origin=where))
    if not results:
        raise HandInputError(f"{path}: no results in it")
    return results


def _record(store: Store, campaign: str) -> CampaignRecord:
    record = store.get_campaign(campaign)
    if record is None:
        known = ", ".join(c.name for c in store.campaigns()) or "none"
        raise HandInputError(f"no campaign named {campaign!r} in {store.url} (known: {known})")
    return record


def tell(
    database_url: str,
    campaign: str,
    results: Sequence[HandResult],
    *,
    by: str,
    amend: bool = False,
) -> TellResult:
    """Record what a person measured (or why a synthesis failed), all results in one transaction.

    Afterwards the campaign's stopping rules are checked as ``sdl run`` checks them: when the
    budget is spent or a rule fired and nothing is pending, the campaign is marked completed or
    stopped (failed when the failure budget is spent). While ``sdl run`` holds the campaign, only
    experiments asked by hand may be told (the run learns them before it proposes again, and
    ends the campaign itself); ``note`` then says so.

    Args:
        database_url: Repository URL (an existing repository).
        campaign: The campaign's name.
        results: What to record (see :class:`~sdl.repository.HandResult`).
        by: Who tells (the measurement's instrument is ``hands:<by>``).
        amend: Replace the value of an already completed experiment (the old one stays on record).

    Raises:
        HandInputError: Unknown campaign.
        CampaignLocked: ``sdl run`` (or another ask/tell) holds the campaign now.
        RepositoryError: A result cannot be recorded (see :meth:`Store.record_hand_results_bulk`);
            nothing was written.
    """
    from sdl.repository import CampaignLocked, Store, hold_lease

    if not results:
        raise HandInputError("nothing to tell")
    store = Store.from_url(database_url)
    try:
        record = _record(store, campaign)
        properties = stored_properties(record.config_snapshot, record.name)
        first = next(iter(properties))
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(hold_lease(store, record.id, holder=f"sdl tell ({by})"))
            except CampaignLocked as locked:
                return _tell_beside_a_run(store, record, properties, results, by=by, amend=amend, locked=locked)
            outcomes = _record_results(store, record, properties, results, by=by, amend=amend)
            state, reason, pending = _settle(store, record)
        return TellResult(record.name, first, properties[first], outcomes, state, reason, pending,
                          properties=properties)
    finally:
        store.close()


def _record_results(store: Store, record: CampaignRecord, properties: Mapping[str, str | None],
                    results: Sequence[HandResult], *, by: str, amend: bool,
                    source: str | None = None) -> list[HandOutcome]:
    """One transaction: each experiment's state change with every property's value (several objectives)."""
    first = next(iter(properties))
    return store.record_hand_results_bulk(
        record.id, results, by=by, property=first, unit=properties[first], amend=amend, source=source,
        others=dict(properties) if len(properties) > 1 else None)


def _tell_beside_a_run(
    store: Store,
    record: CampaignRecord,
    properties: dict[str, str | None],
    results: Sequence[HandResult],
    *,
    by: str,
    amend: bool,
    locked: CampaignLocked,
) -> TellResult:
    """While another process holds the campaign: results of experiments asked by hand only.

    The runner never touches those (they are the person's), and it reads them back before it
    proposes again (:meth:`Lab.sync_hands`); an experiment of its own is refused, naming it.
    """
    from sdl.exceptions import RepositoryError
    from sdl.repository import CampaignLocked

    try:
        outcomes = _record_results(store, record, properties, results, by=by, amend=amend, source=HANDS)
    except RepositoryError as exc:
        if "another process runs the campaign" not in str(exc):
            raise
        raise CampaignLocked(f"{exc}: {locked}", campaign=record.name, holder=locked.holder, host=locked.host,
                             pid=locked.pid, since=locked.since) from exc
    note = f"{locked.holder} (pid {locked.pid}) runs {record.name!r} and learns these before it proposes again"
    first = next(iter(properties))
    return TellResult(record.name, first, properties[first], outcomes, record.state, None, None, note,
                      properties=properties)


def _policy(record: CampaignRecord) -> StoppingPolicy:
    """The stopping rules of a stored campaign, from its configuration snapshot (as ``sdl run`` built them)."""
    snap = record.config_snapshot

    def section(name: str) -> Mapping[str, Any]:
        value = snap.get(name)
        return value if isinstance(value, Mapping) else {}

    budget, stopping, acquisition = section("budget"), section("stopping"), section("acquisition")
    return StoppingPolicy(
        budget=int(record.budget if record.budget is not None else budget.get("experiments", 0)),
        batch_size=int(acquisition.get("batch_size", 1) or 1),
        mode=acquisition.get("mode", "batch") if acquisition.get("mode") in ("batch", "asynchronous") else "batch",
        goal_value=stopping.get("goal_value"),
        patience=stopping.get("patience"),
        max_failures=budget.get("max_failures"),
        max_abandoned=budget.get("max_abandoned"),
    )


def _settle(store: Store, record: CampaignRecord) -> tuple[str, str | None, int]:
    """Check the rules on the repository's counts; end the campaign when nothing is left to do.

    With ``objectives:`` the ledger counts progress as ``sdl run`` does: a new point on the
    measured Pareto front (:mod:`sdl.lab.pareto`), not a better first objective.
    """
    from sdl.engine.pareto import MultiObjective
    from sdl.lab.pareto import progress_for

    objectives = MultiObjective.from_snapshot(record.config_snapshot)
    objective = objectives.objectives[0]
    several = record.config_snapshot.get("objectives") is not None
    ledger = ExperimentLedger(objective, _policy(record),
                              improvement=progress_for(objectives, store) if several else None)
    experiments = store.experiments(record.id)
    ledger.load(((e.id, e.candidate_key, e.state) for e in experiments),
                ((o.experiment_id, o.value) for o in store.observations(record.id, objective.property)))
    ledger.check_rules()
    counts = ledger.counts()
    pending = counts["proposed"] + counts["running"]
    current = store.get_campaign(record.id)
    state = current.state if current is not None else record.state
    if ledger.failure is not None:
        reason, new_state = ledger.failure, "failed"
    elif ledger.stop_reason is not None and pending == 0:
        reason = ledger.stop_reason
        new_state = "completed" if reason.startswith("budget") else "stopped"
    else:
        return state, ledger.stop_reason, pending
    if new_state != state:
        store.set_campaign_state(record.id, new_state, reason=reason)
    return new_state, reason, pending
