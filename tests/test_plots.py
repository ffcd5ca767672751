"""Figures (segjointgene.results.plots): display helpers with known answers, and every plot writes a readable PNG."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from segjointgene.results.plots import (densest_window, display_factor, downsample_labels, downsample_mean,
                                plot_gene_ranking_heatmap, plot_initial_vs_final, plot_section_overview,
                                plot_training_curves, plot_zoom, spot_density)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0.05  # something is drawn
    return img


@pytest.fixture(scope="module")
def cells() -> dict:
    """Two rows of square cells with nuclei in their centres, 3 types, and spots mostly inside the cells."""
    rng = np.random.default_rng(0)
    h, w = 120, 200
    final = np.zeros((h, w), np.uint32)
    initial = np.zeros((h, w), np.uint32)
    cid = 0
    for r in range(10, h - 20, 50):
        for c in range(10, w - 20, 45):
            cid += 1
            final[r:r + 40, c:c + 38] = cid
            initial[r + 12:r + 26, c + 12:c + 24] = cid
    lut = np.arange(cid + 1) % 3 + 1
    lut[0] = 0
    inside = np.flatnonzero(final.ravel() > 0)
    pick = rng.choice(inside, 800)
    x = np.r_[pick % w + rng.random(800), rng.uniform(0, w, 100)]
    y = np.r_[pick // w + rng.random(800), rng.uniform(0, h, 100)]
    return {"final": final, "initial": initial, "lut": lut, "x": x, "y": y,
            "celltypes": ["background", "Astro", "Neuron", "Oligo"]}


def test_display_helpers_known_answers():
    assert display_factor((5471, 7602), 1200) == 7 and display_factor((100, 50)) == 1
    lab = np.arange(25).reshape(5, 5)
    # block centres (1, 3) and the last, partial block's own last pixel (4)
    np.testing.assert_array_equal(downsample_labels(lab, 2), [[6, 8, 9], [16, 18, 19], [21, 23, 24]])
    assert downsample_labels(lab, 1) is not lab
    np.testing.assert_allclose(downsample_mean(np.ones((5, 7)), 3), np.ones((2, 3)))
    img = np.zeros((4, 4))
    img[0, 0] = 4
    np.testing.assert_allclose(downsample_mean(img, 2), [[1, 0], [0, 0]])
    d = spot_density(np.array([0.5, 3.9, 100.0, np.nan]), np.array([0.5, 3.9, 1.0, 1.0]), (4, 4), 4)
    np.testing.assert_array_equal(d, [[2.0]])  # out-of-frame and NaN spots ignored


def test_densest_window_finds_a_planted_cluster():
    rng = np.random.default_rng(3)
    x = np.r_[rng.uniform(0, 1000, 300), rng.normal(700, 20, 400)]
    y = np.r_[rng.uniform(0, 800, 300), rng.normal(200, 20, 400)]
    y0, x0, h, w = densest_window(x, y, (800, 1000), 300)
    assert (h, w) == (300, 300)
    assert y0 <= 200 - 60 and y0 + h >= 200 + 60 and x0 <= 700 - 60 and x0 + w >= 700 + 60
    assert 0 <= y0 <= 500 and 0 <= x0 <= 700
    # a frame smaller than the window: the whole frame
    assert densest_window(np.array([1.0]), np.array([1.0]), (50, 80), 300) == (0, 0, 50, 80)
    # no spots at all: still a valid window
    assert densest_window(np.zeros(0), np.zeros(0), (500, 500), 100)[2:] == (100, 100)


def test_section_overview(tmp_path, cells):
    f = 2
    path = plot_section_overview(tmp_path / "o.png", downsample_labels(cells["final"], f),
                                 downsample_mean(cells["initial"] > 0, f), spot_density(cells["x"], cells["y"],
                                                                                        cells["final"].shape, f),
                                 factor=f, background_name="nucleus mask", window=(10, 10, 40, 40), dim=0.5,
                                 title="test")
    assert path == tmp_path / "o.png"
    _read_png(path)


def test_zoom_and_initial_vs_final(tmp_path, cells):
    final, initial, lut = cells["final"], cells["initial"], cells["lut"]
    x, y = cells["x"], cells["y"]
    assigned = final[np.floor(y).astype(int), np.floor(x).astype(int)] > 0
    p1 = plot_zoom(tmp_path / "z.png", final, initial, (initial > 0).astype(float), lut[final], np.stack([x, y], 1),
                   assigned, origin=(100, 50), celltypes=cells["celltypes"], background_name="nucleus mask")
    _read_png(p1)
    areas_f = np.bincount(final.ravel())[1:]
    areas_i = np.bincount(initial.ravel())[1:]
    p2 = plot_initial_vs_final(tmp_path / "iv.png", initial, final, lut[initial], lut[final], areas_i, areas_f)
    _read_png(p2)


def test_zoom_with_many_types_lists_the_rest(tmp_path):
    final = np.kron(np.arange(1, 41).reshape(5, 8), np.ones((8, 8), np.int64)).astype(np.uint32)  # 40 cells
    types = final.astype(np.int64)  # 40 types in view
    plot_zoom(tmp_path / "z.png", final, final, np.zeros(final.shape), types, np.zeros((0, 2)), np.zeros(0, bool),
              celltypes=["background", *[f"T{i}" for i in range(1, 41)]])
    _read_png(tmp_path / "z.png")


def test_training_curves_any_columns(tmp_path):
    table = pd.DataFrame({"epoch": np.arange(6), "loss": np.linspace(2, 1, 6), "pixel_acc": np.linspace(0.4, 0.9, 6),
                          "brand_new": [1, 2, np.nan, 4, 5, 6], "all_nan": np.nan, "note": list("abcdef")})
    _read_png(plot_training_curves(tmp_path / "t.png", table))
    with pytest.raises(ValueError, match="numeric"):
        plot_training_curves(tmp_path / "u.png", pd.DataFrame({"epoch": [0, 1], "note": ["a", "b"]}))


def test_gene_ranking_heatmap(tmp_path):
    rng = np.random.default_rng(1)
    scores = pd.DataFrame(rng.random((5, 30)), index=[f"T{i}" for i in range(5)],
                          columns=[f"G{i}" for i in range(30)])
    scores.iloc[2] = np.nan  # a type without attributed pixels is dropped
    _read_png(plot_gene_ranking_heatmap(tmp_path / "h.png", scores, top_n=3, method="IG", title="run"))
    with pytest.raises(ValueError, match="finite"):
        plot_gene_ranking_heatmap(tmp_path / "x.png", scores * np.nan)


def test_no_pyplot_global_state(tmp_path, cells):
    """Figures are drawn without pyplot: nothing is registered and no backend is switched."""
    had_pyplot = "matplotlib.pyplot" in sys.modules
    plot_training_curves(tmp_path / "t.png", pd.DataFrame({"epoch": [0, 1], "loss": [1.0, 0.5]}))
    if had_pyplot:
        import matplotlib.pyplot as plt

        assert plt.get_fignums() == []
    else:
        assert "matplotlib.pyplot" not in sys.modules
