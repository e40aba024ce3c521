"""Training: epoch budget, history, KL warm-up, validation, determinism and early stopping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sclatent
import sclatent.train as training
from conftest import TRAIN_EPOCHS, TRAIN_KL_WARMUP
from sclatent.config import default_max_epochs

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)


@pytest.fixture
def tiny(cellbench):
    """120 cells x 200 genes of cellbench, set up with the batch."""
    cells = np.r_[0:60, 300:360]
    totals = np.asarray(cellbench.X.sum(0)).ravel()
    adata = cellbench[cells, np.sort(np.argsort(-totals)[:200])].copy()
    sclatent.SCLatent.setup_anndata(adata, batch_key="batch")
    return adata


@pytest.mark.parametrize("n_cells,epochs", [
    (0, 400), (1, 400), (450, 400), (20_000, 400), (40_000, 200), (100_000, 80),
    (400_000, 20), (1_000_000, 20), (10_000_000, 20),
])
def test_default_max_epochs(n_cells, epochs):
    assert default_max_epochs(n_cells) == epochs


def test_default_max_epochs_is_monotone_and_bounded():
    values = [default_max_epochs(n) for n in np.logspace(0, 8, 60).astype(int)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) == 20 and max(values) == 400


def test_history_has_one_row_per_epoch_with_the_loss_terms(trained_model):
    h = trained_model.history
    assert len(h) == TRAIN_EPOCHS
    assert h.index.tolist() == list(range(TRAIN_EPOCHS))
    for col in ("train_loss", "train_reconstruction", "train_kl", "validation_loss", "validation_reconstruction", "validation_kl", "kl_weight"):
        assert col in h.columns, col
        assert np.isfinite(h[col].to_numpy()).all(), col
    # reconstruction is a log-likelihood of counts (negative); the KL is positive
    assert (h["train_reconstruction"] < 0).all() and (h["train_kl"] > 0).all()
    # the validation loss is the plain negative ELBO (KL weight 1)
    np.testing.assert_allclose(h["validation_loss"], h["validation_kl"] - h["validation_reconstruction"], rtol=1e-5)
    assert trained_model.is_trained


def test_training_lowers_the_validation_loss(trained_model):
    h = trained_model.history
    first, last = h["validation_loss"].iloc[0], h["validation_loss"].iloc[-5:].mean()
    assert last < first - 100, (first, last)  # about 3,900 -> 2,400 nats per cell
    assert h["validation_reconstruction"].iloc[-1] > h["validation_reconstruction"].iloc[0]
    assert h["train_loss"].iloc[-1] < h["train_loss"].iloc[0]


def test_kl_weight_rises_linearly_and_reaches_one_within_warmup(trained_model):
    w = trained_model.history["kl_weight"].to_numpy()
    assert (np.diff(w) >= 0).all()
    assert w[0] == pytest.approx(1 / TRAIN_KL_WARMUP)
    assert (w[: TRAIN_KL_WARMUP - 1] < 1.0).all()
    assert (w[TRAIN_KL_WARMUP - 1 :] == 1.0).all()
    np.testing.assert_allclose(w[:TRAIN_KL_WARMUP], np.arange(1, TRAIN_KL_WARMUP + 1) / TRAIN_KL_WARMUP)


def test_validation_and_training_cells_are_a_disjoint_partition(trained_model):
    n = trained_model.data.n_obs
    train, val = trained_model.train_indices, trained_model.validation_indices
    assert len(val) == round(0.1 * n)
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.union1d(train, val), np.arange(n))


def test_invalid_training_arguments(tiny):
    model = sclatent.SCLatent(tiny, n_latent=3, n_hidden=8)
    with pytest.raises(ValueError, match=r"kl_warmup_epochs=11 must lie in \[0, max_epochs=10\]"):
        model.train(max_epochs=10, kl_warmup_epochs=11, **QUIET)
    with pytest.raises(ValueError, match="max_epochs must be an integer >= 1"):
        model.train(max_epochs=0, **QUIET)
    with pytest.raises(ValueError, match=r"max_epochs must be an integer >= 1, got 1.5"):
        model.train(max_epochs=1.5, **QUIET)
    with pytest.raises(ValueError, match="validation_size"):
        model.train(max_epochs=2, validation_size=1.0, **QUIET)
    assert not model.is_trained


def test_training_is_deterministic_for_a_seed(tiny):
    def latent(seed):
        model = sclatent.SCLatent(tiny, n_latent=4, n_hidden=16, seed=seed)
        model.train(max_epochs=3, batch_size=32, early_stopping=False, seed=seed, **QUIET)
        return model.get_latent_representation(), model.history

    z1, h1 = latent(0)
    z2, h2 = latent(0)
    z3, _ = latent(1)
    np.testing.assert_allclose(z1, z2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(h1["train_loss"], h2["train_loss"], rtol=1e-6)
    assert np.abs(z1 - z3).max() > 1e-3  # another seed gives another model


def test_training_without_validation(tiny):
    model = sclatent.SCLatent(tiny, n_latent=3, n_hidden=8)
    model.train(max_epochs=2, validation_size=0.0, early_stopping=False, **QUIET)
    assert len(model.history) == 2 and "validation_loss" not in model.history.columns
    assert len(model.validation_indices) == 0 and len(model.train_indices) == tiny.n_obs


def test_early_stopping_never_acts_before_warmup_ends(tiny, monkeypatch):
    """A validation loss that only gets worse: patience 1 would stop at epoch 2 without the warm-up rule."""

    def worsening(self, idx, batch_idx):
        self.log("validation_loss", torch.tensor(float(self.current_epoch)), on_epoch=True, batch_size=len(idx))

    monkeypatch.setattr(training.TrainingPlan, "validation_step", worsening)
    warmup = 5
    model = sclatent.SCLatent(tiny, n_latent=3, n_hidden=8)
    model.train(max_epochs=30, batch_size=64, kl_warmup_epochs=warmup, early_stopping_patience=1, **QUIET)
    n_epochs = len(model.history)
    assert n_epochs >= warmup, f"early stopping ended training after {n_epochs} epochs, inside the {warmup}-epoch KL warm-up"
    # once warm-up is over it does stop: best at epoch `warmup`, one epoch of patience
    assert n_epochs <= warmup + 2
    assert model.history["kl_weight"].iloc[-1] == 1.0


def test_early_stopping_stops_on_a_plateau(tiny, monkeypatch):
    def flat(self, idx, batch_idx):
        self.log("validation_loss", torch.tensor(1.0), on_epoch=True, batch_size=len(idx))

    monkeypatch.setattr(training.TrainingPlan, "validation_step", flat)
    model = sclatent.SCLatent(tiny, n_latent=3, n_hidden=8)
    model.train(max_epochs=40, batch_size=64, kl_warmup_epochs=2, early_stopping_patience=3, **QUIET)
    assert 4 <= len(model.history) < 40
