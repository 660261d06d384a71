"""What a person sees of a campaign: the Prefect page's cards, their figures, the random baseline.

Prefect-free (``sdl/flows.py`` turns the cards into artifacts), so every line of the page can be
tested without a server.
"""

from __future__ import annotations

from sdl.report.baseline import RandomBaseline, random_best_of_n
from sdl.report.figures import RoundData, draw_round_plots, objective_label, objective_unit
from sdl.report.page import PLOT_TITLES, CampaignPage, Card

__all__ = [
    "PLOT_TITLES",
    "CampaignPage",
    "Card",
    "RandomBaseline",
    "RoundData",
    "draw_round_plots",
    "objective_label",
    "objective_unit",
    "random_best_of_n",
]
