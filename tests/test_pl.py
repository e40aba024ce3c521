"""Figures, checked by their content: lines, legend entries, the kept epoch."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import sclatent
from sclatent.cli import umap_figure


def _history(n: int = 6) -> pd.DataFrame:
    epochs = np.arange(n)
    frame = pd.DataFrame(
        {
            "train_loss": 100 - epochs, "validation_loss": 101 - epochs, "train_fused": 90 - epochs,
            "validation_fused": 91 - epochs, "train_sleep": np.full(n, 3.0), "train_elbo": epochs - 100,
            "kept": epochs == 4,
        },
        index=pd.Index(epochs, name="epoch"),
    )
    return frame


def test_training_curves_draw_both_losses_every_term_and_the_kept_epoch():
    fig = sclatent.pl.training_curves(_history())
    main, terms = fig.axes[:2]
    labels = [t.get_text() for t in main.get_legend().get_texts()]
    assert labels == ["train loss", "validation loss", "kept epoch 4"]
    train = main.get_lines()[0]
    np.testing.assert_array_equal(train.get_xdata(), np.arange(6))
    np.testing.assert_array_equal(train.get_ydata(), 100 - np.arange(6))
    kept = main.get_lines()[2]
    assert list(kept.get_xdata()) == [4, 4]  # the vertical line at the kept epoch
    assert sorted(t.get_text() for t in terms.get_legend().get_texts()) == ["fused", "sleep"]
    assert len(terms.get_lines()) == 3  # fused train + validation, sleep train
    with pytest.raises(ValueError, match="no training history"):
        sclatent.pl.training_curves(pd.DataFrame())


def test_umap_legends_show_every_category():
    rng = np.random.default_rng(0)
    n = 300
    result = ad.AnnData(obs=pd.DataFrame({
        "cell_type": pd.Categorical([f"type{i % 15}" for i in range(n)]),
        "batch": pd.Categorical([f"b{i % 8}" for i in range(n)]),
    }, index=[f"c{i}" for i in range(n)]))
    result.obsm["X_umap"] = rng.normal(size=(n, 2))
    fig = umap_figure(result, ["batch", "cell_type"])
    for ax, key, k in zip(fig.axes, ["batch", "cell_type"], [8, 15]):
        legend = ax.get_legend()
        assert legend is not None and len(legend.get_texts()) == k, key
        assert {t.get_text() for t in legend.get_texts()} == set(result.obs[key].cat.categories)
        assert len(ax.collections[0].get_offsets()) == n  # every cell drawn


def test_amortization_gap_histogram_counts_every_cell_and_marks_the_mean():
    per_cell = pd.DataFrame({"gap": np.r_[np.full(30, 2.0), np.full(10, -0.5)]})
    fig = sclatent.pl.amortization_gap(per_cell, bins=10)
    ax = fig.axes[0]
    assert sum(p.get_height() for p in ax.patches) == 40  # every cell in the histogram
    mean_line = ax.get_lines()[0]
    assert mean_line.get_xdata()[0] == pytest.approx(1.375)
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"40 cells", "mean 1.38 nats", "no change"}
    with pytest.raises(ValueError, match="get_amortization_gap"):
        sclatent.pl.amortization_gap(pd.DataFrame({"x": [1.0]}))
