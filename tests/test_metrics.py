"""Metrics (MRE, RA15, RA30 per overlap class) against hand-computed values, and the PNG plots."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from ns_extreme.align.metrics import class_metrics, format_table, rotation_errors_deg, summarize
from ns_extreme.align.plots import plot_error_cdfs, plot_error_histograms


def test_rotation_errors_deg_hand_made():
    rng = np.random.default_rng(3)
    gt = Rotation.random(4, random_state=7).as_matrix()
    axes = rng.normal(size=(4, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.array([0.0, 10.0, 90.0, 180.0])
    # pred = Δ · gt with Δ a rotation of the given angle about a random axis → error = that angle
    delta = Rotation.from_rotvec(axes * np.radians(angles)[:, None]).as_matrix()
    pred = delta @ gt
    err = rotation_errors_deg(pred, gt)
    assert err.dtype == np.float64 and err.shape == (4,)
    np.testing.assert_allclose(err, angles, atol=1e-6)
    # right-multiplied perturbation has the same angle (conjugation invariance)
    np.testing.assert_allclose(rotation_errors_deg(gt @ delta, gt), angles, atol=1e-6)
    # float noise pushing the trace above 3 is clamped, not NaN
    assert rotation_errors_deg(np.eye(3)[None] * (1 + 1e-12), np.eye(3)[None])[0] == 0.0
    with pytest.raises(ValueError):
        rotation_errors_deg(np.zeros((2, 3, 3)), np.zeros((3, 3, 3)))


def test_class_metrics_paper_definitions():
    m = class_metrics(np.array([5.0, 10.0, 20.0, 40.0]))
    assert m == {"count": 4, "failed": 0, "mre": 15.0, "ra15": 50.0, "ra30": 75.0}
    # thresholds are inclusive (≤): exactly 15° and 30° count
    m = class_metrics(np.array([15.0, 30.0, 30.000001, 100.0]))
    assert m["ra15"] == 25.0
    assert m["ra30"] == 50.0
    assert m["mre"] == pytest.approx(30.0000005)
    # odd count: median is the middle element
    assert class_metrics(np.array([1.0, 179.0, 3.0]))["mre"] == 3.0


def test_summarize_per_class_and_empty_class():
    errors = [5.0, 10.0, 20.0, 40.0, 2.0, 100.0, 14.0]
    labels = ["none", "none", "none", "none", "large", "large", "large"]
    s = summarize(errors, labels)
    assert list(s) == ["large", "small", "none", "all"]
    assert s["none"] == {"count": 4, "failed": 0, "mre": 15.0, "ra15": 50.0, "ra30": 75.0}
    assert s["large"]["count"] == 3
    assert s["large"]["mre"] == 14.0
    assert s["large"]["ra15"] == pytest.approx(200.0 / 3.0)
    assert s["small"] == {"count": 0, "failed": 0, "mre": None, "ra15": None, "ra30": None}
    # all: sorted 2,5,10,14,20,40,100 → median 14; ≤15: 4/7; ≤30: 5/7
    assert s["all"]["count"] == 7
    assert s["all"]["mre"] == 14.0
    assert s["all"]["ra15"] == pytest.approx(400.0 / 7.0)
    assert s["all"]["ra30"] == pytest.approx(500.0 / 7.0)
    empty = summarize([], [])
    assert all(empty[c]["count"] == 0 and empty[c]["mre"] is None for c in empty)
    with pytest.raises(ValueError, match="labels"):
        summarize([1.0, 2.0], ["none"])
    with pytest.raises(ValueError, match="medium"):
        summarize([1.0], ["medium"])


def test_non_finite_errors_are_failures():
    s = summarize([5.0, math.nan, 20.0], ["none", "none", "none"])
    # NaN counts as 180°: median of (5, 20, 180) = 20; passes no threshold
    assert s["none"] == {
        "count": 3,
        "failed": 1,
        "mre": 20.0,
        "ra15": pytest.approx(100 / 3),
        "ra30": pytest.approx(200 / 3),
    }


def test_format_table_side_by_side():
    labels = ["none", "none", "none", "none"]
    table = format_table(
        {
            "pretrained": summarize([5.0, 10.0, 20.0, 40.0], labels),
            "aligned": summarize([1.0, 2.0, 3.0, 50.0], labels),
        }
    )
    lines = table.splitlines()
    assert "pretrained MRE°" in lines[0] and "aligned RA30%" in lines[0]
    assert lines[0].index("pretrained") < lines[0].index("aligned")
    none_row = next(line for line in lines if line.startswith("none"))
    assert none_row.split() == ["none", "4", "15.00", "50.0", "75.0", "2.50", "75.0", "75.0"]
    small_row = next(line for line in lines if line.startswith("small"))
    assert small_row.split() == ["small", "0", "-", "-", "-", "-", "-", "-"]
    assert [line.split()[0] for line in lines[2:]] == ["large", "small", "none", "all"]


def test_plots_write_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = ["large"] * 10 + ["none"] * 15  # no "small" pairs: that panel must still render
    errors = {"pretrained": rng.uniform(0, 180, 25), "aligned": rng.uniform(0, 40, 25)}
    errors["aligned"][3] = np.nan
    for fn, name in ((plot_error_histograms, "hist.png"), (plot_error_cdfs, "sub/cdf.png")):
        out = fn(errors, labels, tmp_path / name)
        data = out.read_bytes()
        assert out == tmp_path / name
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(data) > 10_000  # four panels with curves, not an empty canvas
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["cdf.png", "hist.png"]  # no temp files
    with pytest.raises(ValueError):
        plot_error_cdfs({"m": [1.0, 2.0]}, ["none"], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
