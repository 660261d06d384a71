"""The campaign's page in the Prefect UI: a fixed set of cards, each rewritten as the campaign goes.

Why a fixed set: Prefect 3.8.8 lists a flow run's artifacts by their random ids, so a new card per
round per plot (21 cards for the demo) buries the latest round. Each card here has one key
(``<campaign>-report``, ``<campaign>-plot-best-so-far``, ...) and is created once per flow run, then
updated in place; its description starts with what it is and which round it shows, so a person
finds "best so far" or "proposals of round 6" by name. The report card tells the whole story, the
latest round first: best so far against random, the round's proposals, the model's prospective
accuracy, every plot, then the earlier rounds.

Plots are embedded as ``data:image/png`` URLs (:func:`sdl.plots.png_data_url`): the UI renders them
(checked in headless Chromium, ``tests/test_ui.py``), where ``file://`` links never open. Tables show
formulas with the candidate id in its own column, and values with the objective's unit.

Prefect-free: ``sdl/flows.py`` turns each :class:`Card` into an artifact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from sdl.plots import png_data_url
from sdl.report.figures import objective_label, objective_unit

if TYPE_CHECKING:
    from sdl.lab import Lab, Outcome, RoundReport, Ticket
    from sdl.report.baseline import RandomBaseline

__all__ = ["Card", "CampaignPage", "PLOT_TITLES"]

TableRow = dict[str, str | float | int | None]

PLOT_TITLES: dict[str, tuple[str, str]] = {
    "best_so_far": ("Best so far", "Every measurement in order and the running best; the grey band is what "
                    "random picks from the same world would have found (expected best dashed)."),
    "parity": ("Parity", "Each completed experiment's prediction, made when it was proposed, against its "
               "measurement (±1 std); on the dashed line the model was right."),
    "calibration": ("Calibration", "How often the measurement fell inside the model's central intervals; "
                    "on the diagonal the stated uncertainties are honest, below it over-confident."),
    "recall": ("Recall", "Share of the simulated world's top 5 % found so far; random finds i / N of them "
               "after i experiments (dashed)."),
}
"""Plot name → (card title, how to read it)."""

THUMBNAIL_WIDTH = 260
"""Width in px of a plot on its card in the flow run's Artifacts tab (the description)."""


@dataclass(frozen=True)
class Card:
    """One artifact of the page.

    Attributes:
        what: Key suffix (the key is ``<campaign>-<what>``).
        description: Shown on the card in the flow run's Artifacts tab (markdown; may hold a thumbnail).
        markdown: Body of a markdown card.
        table: Rows of a table card (``markdown`` is then empty).
    """

    what: str
    description: str
    markdown: str = ""
    table: list[TableRow] = field(default_factory=list)


@dataclass
class _Round:
    round: int
    done: int
    best: float | None
    best_label: str
    mae: float | None
    miscalibration: float | None


class CampaignPage:
    """Builds the cards and the log lines of one campaign from its lab.

    Args:
        lab: The running lab (read only: counts, repository, engine pool for formulas).
        true_best: The simulated world's best (key, value), when there is one.
        baseline: Best of ``n`` random draws from the world, when it is known.
    """

    def __init__(self, lab: Lab, true_best: tuple[str, float] | None = None,
                 baseline: RandomBaseline | None = None) -> None:
        self.lab = lab
        self.name = lab.cfg.name
        self.property = lab.cfg.objective.property
        self.unit = objective_unit(lab.cfg)
        self.label = objective_label(lab.cfg)
        self.true_best = true_best
        self.baseline = baseline
        self.history: list[_Round] = []
        self._formulas: dict[str, str | None] = {}

    # ------------------------------------------------------------------ names and numbers
    def formula(self, candidate_key: str | None) -> str | None:
        """The candidate's chemical formula (pool formula column or structure), cached; None if unknown."""
        if candidate_key is None:
            return None
        if candidate_key not in self._formulas:
            pool = self.lab.engine.pool
            found: str | None = None
            try:
                if pool is not None and candidate_key in pool:
                    found = pool.formulas([pool.index_of(candidate_key)])[0]
            except (ValueError, KeyError, IndexError):
                found = None
            self._formulas[candidate_key] = found
        return self._formulas[candidate_key]

    def named(self, candidate_key: str | None) -> str:
        """``"CsPbI3 (perov_12819)"``, or the key alone when no formula is known."""
        if candidate_key is None:
            return "–"
        formula = self.formula(candidate_key)
        return f"{formula} ({candidate_key})" if formula else candidate_key

    def value(self, value: float | None) -> str:
        """A value with the objective's unit: ``"-1.23 eV"``."""
        text = format_cell(value)
        return f"{text} {self.unit}" if self.unit and value is not None else text

    # ------------------------------------------------------------------ log lines
    def proposed_line(self, ticket: Ticket) -> str:
        """One line per proposed experiment: id, formula, prediction."""
        prediction = ""
        if ticket.predicted_mean is not None:
            spread = "" if ticket.predicted_std is None else f" ± {ticket.predicted_std:.2g}"
            prediction = f", predicted {self.property} = {format_cell(ticket.predicted_mean)}{spread}"
            prediction += f" {self.unit}" if self.unit else ""
        return f"proposed {ticket.key}: {self.named(ticket.candidate_key)}{prediction}"

    def started_line(self, ticket: Ticket) -> str:
        """One line when an experiment's synthesis starts (again, after an instrument retry)."""
        again = f" (attempt {ticket.attempts + 1})" if ticket.attempts else ""
        return f"started {ticket.key}: {self.named(ticket.candidate_key)}{again}"

    def outcome_line(self, outcome: Outcome) -> str:
        """One line per ended experiment: measured with its value, or failed / abandoned with why."""
        ticket = outcome.ticket
        who = f"{ticket.key}: {self.named(ticket.candidate_key)}"
        if outcome.state == "completed":
            return f"measured {who}: {self.property} = {self.value(outcome.value)}"
        return f"{outcome.state} {who}: {outcome.reason}"

    # ------------------------------------------------------------------ cards
    def progress_description(self) -> str:
        """Description of the progress card."""
        return f"Progress — {self.name}: experiments ended / budget ({self.lab.budget})"

    def round_cards(self, report: RoundReport) -> list[Card]:
        """Every card for the round just reported (plots, tables, the report itself)."""
        m = report.metrics
        self.history.insert(0, _Round(report.round, report.done, report.best_value,
                                      self.named(report.best_candidate), _num(m.get("mae")),
                                      _num(m.get("miscalibration_area"))))
        cards = [self._report_card(report)]
        for what, path in report.plots.items():
            cards.append(self._plot_card(report, what, path))
        proposals = self._proposal_rows(report)
        if proposals:
            cards.append(Card("proposals", f"Latest proposals, round {report.round} — {self.name} (newest first)",
                              table=proposals))
        if report.top:
            cards.append(Card("best-candidates", f"Best candidates, round {report.round} — {self.name} "
                              f"(by {self.label}, {self.lab.objective.goal})",
                              table=self._top_rows(report)))
        if self.lab.cfg.objectives is not None:
            from sdl.report.pareto import pareto_cards

            cards += pareto_cards(self, report)
        return cards

    def _headline(self, report: RoundReport) -> list[str]:
        counts = self.lab.counts()
        lines = [
            f"**Best so far:** {self.property} = {self.value(report.best_value)} — "
            f"{self.named(report.best_candidate)} · goal: {self.lab.objective.goal}",
            "",
            f"**Experiments:** {report.done} / {report.budget} (completed {counts['completed']}, "
            f"failed {counts['failed']}, abandoned {counts['abandoned']}, "
            f"in flight {counts['proposed'] + counts['running']})",
        ]
        random_line = self._random_line(report.n_observed)
        if random_line:
            lines += ["", random_line]
        if self.true_best:
            lines += ["", f"**Best in the simulated world:** {self.value(self.true_best[1])} — "
                      f"{self.named(self.true_best[0])}"]
        return lines

    def _random_line(self, n: int) -> str | None:
        if self.baseline is None or n < 1:
            return None
        i = min(n, self.baseline.mean.size) - 1
        lo, hi = self.baseline.quantiles
        return (f"**Random, same {n} experiments:** expected best {self.value(float(self.baseline.mean[i]))}; "
                f"{lo:.0%}–{hi:.0%} of random campaigns between {format_cell(float(self.baseline.low[i]))} and "
                f"{self.value(float(self.baseline.high[i]))} (exact, over the world's "
                f"{self.baseline.pool_size} recorded values)")

    def _report_card(self, report: RoundReport) -> Card:
        lab, m = self.lab, report.metrics
        lines = [f"# {self.name} — round {report.round} (latest)", "", *self._headline(report)]
        if "best_so_far" in report.plots:
            lines += ["", _image("best so far", report.plots["best_so_far"])]
        rows = self._proposal_rows(report)
        if rows:
            lines += ["", f"## Latest proposals, round {report.round} (newest first; `batch` groups each q-batch)",
                      "", *_markdown_table(rows)]
        lines += [
            "", "## Model", "",
            f"Model version `{lab.engine.model_version}`, trained on {lab.engine.n_observed} measurements. "
            "Metrics are prospective: each prediction was made when the experiment was proposed, "
            "before it was measured.", "",
            "| MAE | RMSE | Spearman(abs err, std) | miscalibration area | coverage 68 % | coverage 95 % | n |",
            "|---|---|---|---|---|---|---|",
            "| " + " | ".join(format_cell(m.get(k)) for k in ("mae", "rmse", "spearman_abs_error_std",
                                                      "miscalibration_area", "coverage_68", "coverage_95", "n"))
            + " |",
        ]
        for what in ("parity", "calibration", "recall"):
            if what in report.plots:
                lines += ["", f"### {PLOT_TITLES[what][0]}", "", PLOT_TITLES[what][1], "",
                          _image(PLOT_TITLES[what][0].lower(), report.plots[what])]
        if len(self.history) > 1:
            lines += ["", "## Earlier rounds (latest first)", "",
                      f"| round | experiments | best {self.label} | best candidate | MAE | miscalibration |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {h.round} | {h.done} | {format_cell(h.best)} | {h.best_label} | {format_cell(h.mae)} | "
                      f"{format_cell(h.miscalibration)} |" for h in self.history[1:]]
        description = (f"Round {report.round} report — best {self.value(report.best_value)}, "
                       f"{self.formula(report.best_candidate) or report.best_candidate} · "
                       f"{report.done}/{report.budget} · {self.name}")
        return Card("report", description, markdown="\n".join(lines) + "\n")

    def _plot_card(self, report: RoundReport, what: str, path: Path) -> Card:
        title, how = PLOT_TITLES.get(what, (what.replace("_", " ").capitalize(), ""))
        url = png_data_url(path)
        body = [f"# {title} — {self.name}, round {report.round}", "", how, "", f"![{title.lower()}]({url})",
                "", f"File: `{path}` (rewritten each round)"]
        thumbnail = f'<img alt="{title.lower()}" width="{THUMBNAIL_WIDTH}" src="{url}">'
        description = f"**{title}** — {self.name}, round {report.round} ({report.done}/{report.budget})\n\n{thumbnail}"
        return Card(f"plot-{what.replace('_', '-')}", description, markdown="\n".join(body) + "\n")

    def _proposal_rows(self, report: RoundReport) -> list[TableRow]:
        unit = f" ({self.unit})" if self.unit else ""
        rows = sorted(report.provenance, key=lambda p: -int(p.get("experiment") or 0))
        return [{
            "experiment": p.get("experiment"), "formula": self.formula(_str(p.get("candidate"))) or "–",
            "candidate": p.get("candidate"), "state": p.get("state"),
            f"predicted{unit}": _round(p.get("predicted")), "std": _round(p.get("std")),
            "acquisition": _round(p.get("acquisition")), f"measured{unit}": _round(p.get("measured")),
            "model": p.get("model"), "batch": p.get("batch"),
        } for p in rows]

    def _top_rows(self, report: RoundReport) -> list[TableRow]:
        unit = f" ({self.unit})" if self.unit else ""
        return [{
            "rank": t.get("rank"), "formula": self.formula(_str(t.get("candidate"))) or "–",
            f"{self.property}{unit}": t.get(self.property), f"predicted{unit}": t.get("predicted"),
            "std": t.get("std"), "candidate": t.get("candidate"), "experiment": t.get("experiment"),
            "model": t.get("model"),
        } for t in report.top]

    def summary_card(self, state: str, report: RoundReport, rank: tuple[int, int] | None) -> Card:
        """The final card: how the campaign ended, against random and the world's best."""
        lines = [f"# {self.name}: {state}", "", f"Stopped because: {self.lab.stop_reason}", "",
                 *self._headline(report)]
        if rank is not None:
            lines += ["", f"**Rank of the best found:** {rank[0]} of {rank[1]} recorded materials "
                      f"({rank[0] - 1} are better)"]
        description = (f"Summary — {state}, best {self.value(report.best_value)}, "
                       f"{self.formula(report.best_candidate) or report.best_candidate} · {self.name}")
        return Card("summary", description, markdown="\n".join(lines) + "\n")


def _image(alt: str, path: Path) -> str:
    return f"![{alt}]({png_data_url(path)})"


def _markdown_table(rows: Sequence[TableRow]) -> list[str]:
    header = list(rows[0])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(format_cell(r.get(h)) for h in header) + " |" for r in rows]
    return out


def format_cell(value: object) -> str:
    """A table or report cell: four significant digits, an en dash for nothing."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def _round(value: object) -> float | None:
    return None if not isinstance(value, int | float) else round(float(value), 6)


def _str(value: object) -> str | None:
    return None if value is None else str(value)
