"""Plots in the scanpy style: ``sclatent.pl.training_curves(model)``, ``sclatent.pl.amortization_gap(result)``.

Functions return the matplotlib ``Figure`` (and show it only when asked), so notebooks and
scripts can save or adjust it. matplotlib is imported when a function is called.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["amortization_gap", "training_curves"]

#: Loss columns that are not terms of the objective (drawn in the summary panel).
_SUMMARY = ("loss", "elbo")
_NOT_TERMS = ("loss", "elbo", "reconstruction", "kl")


def training_curves(model_or_history, terms: bool = True, show: bool = False, ax=None):
    """Training and validation loss per epoch, and each loss term, with the kept epoch marked.

    Parameters
    ----------
    model_or_history
        A trained :class:`~sclatent.SCLatent` or its ``history`` DataFrame.
    terms
        Also draw one panel with every loss term (``train_<term>``, and ``validation_<term>``
        dashed) besides the panel with the objective.
    show
        Call ``plt.show()``.
    ax
        Axes for the objective panel (then ``terms`` is ignored).

    Returns
    -------
    matplotlib.figure.Figure
        The figure: the first axes holds ``train loss`` and ``validation loss`` against the
        epoch and a vertical line at the epoch whose weights the model kept
        (``history["kept"]``).
    """
    import matplotlib.pyplot as plt

    history = model_or_history if isinstance(model_or_history, pd.DataFrame) else model_or_history.history
    if history is None or not len(history):
        raise ValueError("This model has no training history: train it first (model.train()).")
    if ax is not None:
        fig, axes = ax.figure, [ax]
    else:
        fig, axes = plt.subplots(1, 2 if terms else 1, figsize=(11 if terms else 5.5, 4), squeeze=False)
        axes = list(axes[0])
    epochs = history.index.to_numpy()
    main = axes[0]
    for stage, style in (("train", "-"), ("validation", "--")):
        if f"{stage}_loss" in history:
            main.plot(epochs, history[f"{stage}_loss"].to_numpy(), style, label=f"{stage} loss")
    kept = history.index[history["kept"].astype(bool)] if "kept" in history else []
    for epoch in kept:
        main.axvline(epoch, color="black", linewidth=0.8, linestyle=":", label=f"kept epoch {epoch}")
    main.set_xlabel("epoch")
    main.set_ylabel("loss per cell")
    main.set_title("objective")
    main.legend(loc="upper right", fontsize="small")
    if len(axes) > 1:
        panel = axes[1]
        names = sorted({c.split("_", 1)[1] for c in history.columns if c.startswith("train_")} - set(_NOT_TERMS))
        for name in names:
            line = panel.plot(epochs, history[f"train_{name}"].to_numpy(), "-", label=name)[0]
            if f"validation_{name}" in history:
                panel.plot(epochs, history[f"validation_{name}"].to_numpy(), "--", color=line.get_color())
        panel.set_xlabel("epoch")
        panel.set_title("loss terms (train solid, validation dashed)")
        panel.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize="small")  # beside: every term shown
    fig.tight_layout()
    if show:
        plt.show()
    return fig


def amortization_gap(result, bins: int = 50, show: bool = False, ax=None):
    """Per-cell amortization gap (refined minus encoder ELBO, nats) as a histogram.

    Parameters
    ----------
    result
        What :meth:`~sclatent.SCLatent.get_amortization_gap` returned, or its ``per_cell``
        DataFrame (column ``gap``).
    bins
        Histogram bins.
    show
        Call ``plt.show()``.
    ax
        Axes to draw into.

    Returns
    -------
    matplotlib.figure.Figure
        One histogram of the gaps, a vertical line at their mean and one at 0 (cells left of
        0 were made worse by refinement).
    """
    import matplotlib.pyplot as plt

    per_cell = result if isinstance(result, pd.DataFrame) else result[0]
    if "gap" not in per_cell:
        raise ValueError("Pass what model.get_amortization_gap() returned (or its per_cell frame with a 'gap' column).")
    gaps = per_cell["gap"].to_numpy()
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 4))
    else:
        fig = ax.figure
    ax.hist(gaps, bins=bins, color="tab:blue", alpha=0.8, label=f"{len(gaps)} cells")
    ax.axvline(float(gaps.mean()), color="tab:red", label=f"mean {gaps.mean():.2f} nats")
    ax.axvline(0.0, color="black", linewidth=0.8, linestyle=":", label="no change")
    ax.set_xlabel("ELBO(refined) - ELBO(encoder), nats per cell")
    ax.set_ylabel("cells")
    ax.set_title("amortization gap")
    ax.legend(fontsize="small")
    fig.tight_layout()
    if show:
        plt.show()
    return fig
