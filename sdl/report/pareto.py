"""The Pareto front on the campaign's page: a table of the measured front and a plot of it.

Why on the page: with several objectives there is no single "best so far"; what a person needs to
see each round is which measured candidates nobody beats on every objective (feasible ones only),
their values, and where they sit among everything measured. The hypervolume (above the YAML's
reference point, else the inferred one) is the single number the stopping rule and the benchmark use.

Prefect-free, like :mod:`sdl.report.page`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from sdl.engine.pareto import MultiObjective
from sdl.lab.pareto import front_summary, measured_table
from sdl.plots import plot_pareto_front, png_data_url

if TYPE_CHECKING:
    from sdl.lab import Lab, RoundReport
    from sdl.report.page import CampaignPage, Card

__all__ = ["pareto_cards", "pareto_summary"]


def pareto_summary(lab: Lab) -> dict[str, object]:
    """The measured front (rows of property values) and its hypervolume, for the flow's summary."""
    return front_summary(lab.store, lab.campaign_id, MultiObjective.from_campaign(lab.cfg))


def pareto_cards(page: CampaignPage, report: RoundReport) -> list[Card]:
    """The ``pareto-front`` table card and the ``plot-pareto-front`` card of this round."""
    from sdl.report.page import THUMBNAIL_WIDTH, Card

    lab = page.lab
    objectives = MultiObjective.from_campaign(lab.cfg)
    table = measured_table(lab.store, lab.campaign_id, objectives.properties)
    if not table.keys:
        return []
    units = {o.property: o.unit for o in lab.cfg.all_objectives}
    front = objectives.front(table.Y)
    feasible = objectives.feasible(table.Y)
    try:
        volume = objectives.hypervolume(table.Y, objectives.reference_utility(table.Y))
    except ValueError:
        volume = 0.0
    first = objectives.objectives[0]
    order = sorted(np.flatnonzero(front), key=lambda i: -float(first.scalar_utility(table.Y[i, 0])))
    rows: list[dict[str, str | float | int | None]] = []
    for rank, i in enumerate(order, start=1):
        row: dict[str, str | float | int | None] = {"rank": rank, "formula": page.formula(table.keys[i]) or "–"}
        for j, p in enumerate(objectives.properties):
            unit = f" ({units[p]})" if units.get(p) else ""
            row[f"{p}{unit}"] = round(float(table.Y[i, j]), 6)
        row.update({"candidate": table.keys[i], "experiment": table.experiment_ids[i]})
        rows.append(row)
    goals = ", ".join(f"{o.goal} {o.property}" for o in objectives.objectives)
    rules = f"; {', '.join(map(str, objectives.constraints))}" if objectives.constraints else ""
    description = (f"Pareto front, round {report.round} — {page.name}: {len(rows)} of {len(table.keys)} "
                   f"measured ({goals}{rules}); hypervolume {volume:.4g}")
    cards: list[Card] = [Card("pareto-front", description, table=rows) if rows else Card(
        "pareto-front", description, markdown=f"No measurement meets the constraints yet ({rules.lstrip('; ')}).\n")]
    if len(objectives.properties) >= 2 and objectives.n_objectives >= 2:
        labels = tuple(f"{p} ({units[p]})" if units.get(p) else p for p in objectives.properties[:2])
        path = plot_pareto_front(table.Y[:, :2], front, feasible, lab.state_dir / "plots" / "pareto_front.png",
                                 labels=(labels[0], labels[1]),
                                 title=f"{page.name}: measured Pareto front, round {report.round}")
        url = png_data_url(path)
        body = [f"# Pareto front — {page.name}, round {report.round}", "",
                f"Every completed measurement of {objectives.properties[0]} and {objectives.properties[1]}: the "
                f"front (red, no measured candidate is better on every objective{rules}), the other feasible "
                "ones (grey) and those that violate a constraint (orange).", "",
                f"Hypervolume of the front: {volume:.4g}", "", f"![pareto front]({url})", "",
                f"File: `{path}` (rewritten each round)"]
        thumbnail = f'<img alt="pareto front" width="{THUMBNAIL_WIDTH}" src="{url}">'
        cards.append(Card("plot-pareto-front", f"**Pareto front** — {page.name}, round {report.round} "
                          f"({report.done}/{report.budget})\n\n{thumbnail}", markdown="\n".join(body) + "\n"))
    return cards
