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


# ------------------------------------------------------------------ checkpoints and resume
class _InterruptAfter(__import__("lightning").pytorch.Callback):
    """Ctrl-C at the end of an epoch (before that epoch's checkpoint is written)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_resumed_training_ends_with_the_weights_of_an_uninterrupted_run(tiny, tmp_path):
    options = dict(QUIET, max_epochs=6, kl_warmup_epochs=2, batch_size=32, lr_patience=1)
    plain = sclatent.SCLatent(tiny, n_latent=4, seed=0).train(**options)
    model = sclatent.SCLatent(tiny, n_latent=4, seed=0)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        model.train(checkpoint_dir=tmp_path / "run", callbacks=[_InterruptAfter(3)], **options)
    assert len(model.history) == 3  # epochs 0-2 finished; the last checkpoint is epoch 2's
    assert (tmp_path / "run" / "training_state.ckpt").is_file()
    model.train(checkpoint_dir=tmp_path / "run", **options)  # the same call again: resume
    assert list(model.history.index) == list(range(6))
    np.testing.assert_array_equal(model.history["train_loss"].to_numpy(), plain.history["train_loss"].to_numpy())
    np.testing.assert_array_equal(model.history["lr"].to_numpy(), plain.history["lr"].to_numpy())
    assert model.history["kept"].tolist() == plain.history["kept"].tolist()
    a, b = _weights(plain), _weights(model)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # a finished run is not trained again: same weights, same history, no new epoch
    model.train(checkpoint_dir=tmp_path / "run", **options)
    assert len(model.history) == 6
    for k, v in _weights(model).items():
        torch.testing.assert_close(v, a[k], rtol=0, atol=0)


def test_a_checkpoint_of_another_run_is_refused(tiny, tmp_path):
    sclatent.SCLatent(tiny, n_latent=4, seed=0).train(checkpoint_dir=tmp_path, max_epochs=2, **QUIET)
    with pytest.raises(ValueError, match=r"different run \(options \['batch_size'\] differ\).*new directory"):
        sclatent.SCLatent(tiny, n_latent=4, seed=0).train(checkpoint_dir=tmp_path, max_epochs=2, batch_size=16, **QUIET)
    with pytest.raises(ValueError, match="is a file"):
        sclatent.SCLatent(tiny, n_latent=4, seed=0).train(checkpoint_dir=tmp_path / "training_state.ckpt", max_epochs=2, **QUIET)


def test_training_again_trains_in_train_mode(tiny, monkeypatch):
    """A trained model is in eval mode; a second train() must turn dropout back on."""
    model = sclatent.SCLatent(tiny, n_latent=4, seed=0).train(max_epochs=1, **QUIET)
    assert not model.module.training
    modes = []
    original = training.TrainingPlan.training_step

    def spy(self, idx, batch_idx):
        modes.append(self.module.training)
        return original(self, idx, batch_idx)

    monkeypatch.setattr(training.TrainingPlan, "training_step", spy)
    model.train(max_epochs=1, **QUIET)
    assert modes and all(modes)


# ---------------------------------------------------------------------------- DDP (gloo)
DDP_SCRIPT = __import__("pathlib").Path(__file__).parent / "scripts" / "train_ddp.py"


def _run_ddp(tmp_path, devices: int, batch_size: int, *flags: str) -> dict:
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / f"ddp_{devices}_{batch_size}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)
    done = subprocess.run(
        [sys.executable, str(DDP_SCRIPT), str(out), str(devices), str(batch_size), *flags],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_on_two_cpu_processes_matches_one_process_at_the_same_global_batch(tmp_path):
    two = _run_ddp(tmp_path, 2, 32)
    one = _run_ddp(tmp_path, 1, 64)
    # every rank read only its own shard, and together they covered the training cells
    assert len(two["cells"]) == 2 and not set(two["cells"][0]) & set(two["cells"][1])
    assert sorted(two["cells"][0] + two["cells"][1]) == sorted(one["cells"][0])
    # the history is aggregated over the ranks: the loss curve follows the one-process run's
    for key in ("train_loss", "validation_loss"):
        a, b = np.asarray(two["history"][key]), np.asarray(one["history"][key])
        assert len(a) == len(b) == 4 and a[-1] < a[0]
        np.testing.assert_allclose(a, b, rtol=0.03, err_msg=key)


def test_ddp_with_batches_lacking_a_modality_and_the_adversary(tmp_path):
    """Blocks of RNA-only and ATAC-only cells: batches with one modality, or one kind of
    cell for the discriminator; DDP would fail on a parameter without gradient."""
    run = _run_ddp(tmp_path, 2, 32, "--unpaired")
    history = run["history"]
    assert len(history["epoch"]) == 4 and np.isfinite(history["train_loss"]).all()
    assert "train_align" in history and "train_links" in history
    assert not set(run["cells"][0]) & set(run["cells"][1])


def test_training_prints_no_lightning_banners_unless_verbose(tiny, capfd, caplog):
    import logging

    caplog.set_level(logging.INFO)
    sclatent.SCLatent(tiny, n_latent=4).train(max_epochs=1, **QUIET)
    out = capfd.readouterr()
    text = out.out + out.err + caplog.text
    assert "GPU available" not in text and "Tip" not in text and "LeafSpec" not in text
    assert logging.getLogger("lightning.pytorch").level < logging.WARNING or logging.getLogger("lightning.pytorch").level == 0
    caplog.clear()
    sclatent.SCLatent(tiny, n_latent=4).train(max_epochs=1, verbose=True, **QUIET)
    out = capfd.readouterr()
    assert "GPU available" in out.out + out.err + caplog.text


def test_progress_bar_counts_epochs_and_the_summary_says_why_training_stopped(tiny, capfd, monkeypatch):
    def flat(self, idx, batch_idx):
        self.log("validation_loss", torch.tensor(1.0), on_epoch=True, batch_size=len(idx))

    monkeypatch.setattr(training.TrainingPlan, "validation_step", flat)
    model = sclatent.SCLatent(tiny, n_latent=3, n_hidden=8)
    model.train(max_epochs=40, batch_size=64, kl_warmup_epochs=2, early_stopping_patience=3, accelerator="cpu", devices=1)
    out = capfd.readouterr()
    n = len(model.history)
    assert n < 40
    # one bar over epochs (not Lightning's batch bar), ending at the last epoch
    assert f"{n}/40" in out.err and "epoch" in out.err and "Epoch 0" not in out.err
    kept = int(model.history.index[model.history["kept"]][0])
    summary = [line for line in out.out.splitlines() if line.startswith("sclatent: trained")]
    assert summary == [
        f"sclatent: trained {n} epochs in {summary[0].split(' in ')[1].split(' (')[0]} "
        f"(early stopping: no better validation loss for 3 epochs); kept the weights of epoch {kept} "
        "(validation loss 1.00 per cell)."
    ]
    model.train(max_epochs=2, early_stopping=False, enable_progress_bar=False, **{k: v for k, v in QUIET.items() if k != "enable_progress_bar"})
    out = capfd.readouterr()
    assert "sclatent" not in out.out + out.err  # no bar, no summary


def test_training_summary_of_a_run_that_used_its_budget():
    import pandas as pd

    from sclatent.model._model import training_summary

    history = pd.DataFrame({"seconds": [30.0, 40.0, 50.0], "validation_loss": [3.0, 2.0, 2.5], "kept": [False, True, False]})
    assert training_summary(history, False, 20) == (
        "sclatent: trained 3 epochs in 2 min 0 s (epoch budget reached); kept the weights of epoch 1 (validation loss 2.00 per cell)."
    )
    assert "no epoch finished" in training_summary(pd.DataFrame(), False, 20)


def test_the_best_epoch_is_chosen_after_kl_warm_up(tiny, monkeypatch):
    """An epoch still in warm-up (trained with KL weight < 1) cannot be the kept best one."""
    losses = [1.0, 0.5, 3.0, 2.5, 2.0, 2.2, 1.8, 2.4]  # lowest at epoch 1, in warm-up; after it, at epoch 6

    real = training.TrainingPlan._log_epoch

    def scripted(self, stage):
        real(self, stage)
        if stage == "validation":  # what early stopping and the best-weights choice read
            self._validation_loss = losses[self.current_epoch]

    monkeypatch.setattr(training.TrainingPlan, "_log_epoch", scripted)
    model = sclatent.SCLatent(tiny, n_latent=3, n_hidden=8)
    model.train(max_epochs=8, batch_size=64, kl_warmup_epochs=4, early_stopping=False, **QUIET)
    assert model.history.index[model.history["kept"]].tolist() == [6]
    # interrupted before warm-up ends: the last finished epoch is kept, not the initial weights
    model = sclatent.SCLatent(tiny, n_latent=3, n_hidden=8)
    with pytest.warns(RuntimeWarning, match="interrupted"):
        model.train(max_epochs=8, batch_size=64, kl_warmup_epochs=4, early_stopping=False, callbacks=[_InterruptAfter(2)], **QUIET)
    assert model.history.index[model.history["kept"]].tolist() == [1]


def test_mixed_precision_trains_to_the_full_precision_elbo_with_float32_outputs(tiny):
    """bf16 products under autocast; what comes out (posteriors, likelihoods, latents) is float32,
    and the held-out ELBO is that of full precision within a few tenths of a percent."""
    results = {}
    for precision in ("32-true", "bf16-mixed"):
        model = sclatent.SCLatent(tiny, n_latent=4, n_hidden=32, seed=0)
        model.train(max_epochs=15, batch_size=32, early_stopping=False, precision=precision, **QUIET)
        z = model.get_latent_representation()
        assert z.dtype == np.float32 and np.isfinite(z).all()
        assert np.isfinite(model.history["train_loss"]).all()
        results[precision] = float(model.get_elbo(n_samples=8))
    full, mixed = results["32-true"], results["bf16-mixed"]
    assert abs(mixed - full) < 0.01 * abs(full), results
