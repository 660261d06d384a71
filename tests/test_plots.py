"""Figures are written as real PNG files (Agg) with sane content and reject bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdl import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_recall_curves_png(tmp_path: Path) -> None:
    med = np.linspace(0, 1, 50)
    curves = {"gp": {"median": med, "q25": med * 0.9, "q75": np.minimum(med * 1.1, 1)}}
    out = plots.plot_recall_curves(curves, tmp_path / "sub" / "recall.png", pool_size=100, n_top=5, title="t")
    assert _is_png(out)


def test_best_so_far_single_campaign(tmp_path: Path) -> None:
    assert _is_png(plots.plot_best_so_far([3.0, 1.0, 4.0, float("nan"), 5.0], "max", tmp_path / "b.png"))
    assert _is_png(plots.plot_best_so_far([3.0, 1.0, 4.0], "minimize", tmp_path / "b2.png"))
    # target-range goals have no running best; the points are still drawn
    assert _is_png(plots.plot_best_so_far([3.0, 1.0], "target", tmp_path / "b3.png"))


def test_best_so_far_curves(tmp_path: Path) -> None:
    c = {"random": {"median": [1, 2, 3], "q25": [1, 1, 2], "q75": [2, 3, 3]}}
    assert _is_png(plots.plot_best_so_far_curves(c, tmp_path / "bsf.png", goal_value=3.5))


def test_parity_and_calibration(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=80)
    std = np.full(80, 0.3)
    pred = y + rng.normal(scale=0.3, size=80)
    assert _is_png(plots.plot_parity(y, pred, std, tmp_path / "parity.png"))
    assert _is_png(plots.plot_parity(y, pred, None, tmp_path / "parity2.png"))
    assert _is_png(plots.plot_calibration(y, pred, std, tmp_path / "cal.png"))


def test_parity_shape_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="shape"):
        plots.plot_parity([1.0, 2.0], [1.0], None, tmp_path / "x.png")


def test_best_so_far_with_random_band_and_data_url(tmp_path: Path) -> None:
    from sdl.report.baseline import random_best_of_n

    world = np.linspace(-2.0, 2.0, 41)
    band = random_best_of_n(world, "minimize", 10)
    assert band is not None
    out = plots.plot_best_so_far([1.0, 0.5, -1.0], "minimize", tmp_path / "band.png", baseline=band, dpi=80)
    assert _is_png(out)
    url = plots.png_data_url(out)
    assert url.startswith("data:image/png;base64,")
    import base64

    assert base64.b64decode(url.split(",", 1)[1]) == out.read_bytes()
