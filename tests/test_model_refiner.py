"""SCLatent.train_refiner and refine_method="learned" on small real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import pbmc_subset, requires_pbmc, torch_threads

import sclatent

pytestmark = [
    requires_pbmc,
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def refined_model():
    with torch_threads(1):
        adata = pbmc_subset(n_cells=400)
        sclatent.SCLatent.setup_anndata(adata)
        train, test = adata[:320].copy(), adata[320:].copy()
        model = sclatent.SCLatent(train, n_latent=5, n_hidden=32)
        model.train(max_epochs=15, batch_size=128, enable_progress_bar=False)
        before = {k: v.clone() for k, v in model.module.state_dict().items()}
        history = model.train_refiner(steps=3, max_epochs=15, batch_size=128, patience=15)
    return model, test, before, history


def test_train_refiner_leaves_the_model_alone_and_keeps_its_best_epoch(refined_model):
    model, _, before, history = refined_model
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # encoders, decoders, dispersions untouched
    assert any(k.startswith("refiner.") for k in after)
    assert all(p.grad is None for name, p in model.module.named_parameters() if not name.startswith("refiner."))
    assert list(history.columns) == ["train_loss", "validation_loss", "seconds", "kept"]
    assert history["kept"].sum() == 1
    assert history.loc[history["kept"], "validation_loss"].iloc[0] == history["validation_loss"].min()
    assert history["validation_loss"].min() < history["validation_loss"].iloc[0]  # it learned something
    assert model.refiner_history is history


def test_learned_refinement_closes_more_gap_than_as_many_adam_steps(refined_model):
    model, test, _, _ = refined_model
    options = dict(refine_steps=3, n_samples=64, seed=0)
    learned, s_learned = model.get_amortization_gap(test, refine_method="learned", **options)
    _, s_adam = model.get_amortization_gap(test, **options)
    assert (learned["gap"] > -0.5).all()  # monotone, up to the noise of this evaluation (other draws than the choice's)
    assert s_learned["mean_gap"] > 0
    assert s_learned["mean_gap"] > s_adam["mean_gap"], (s_learned["mean_gap"], s_adam["mean_gap"])
    z = model.get_latent_representation(test, refine_steps=3, refine_method="learned")
    assert np.isfinite(z).all() and not np.allclose(z, model.get_latent_representation(test))


def test_the_refiner_is_saved_and_loaded(refined_model, tmp_path):
    model, test, _, _ = refined_model
    model.save(tmp_path / "m")
    loaded = sclatent.SCLatent.load(tmp_path / "m", model.data)
    assert loaded.init_args["learned_refiner"] == {"n_hidden": 128, "steps": 3}
    options = dict(refine_steps=3, refine_method="learned", seed=1)
    assert np.array_equal(loaded.get_latent_representation(test, **options), model.get_latent_representation(test, **options))


def test_refiner_errors_say_what_to_do(refined_model):
    model, test, _, _ = refined_model
    untrained = sclatent.SCLatent(model.data, n_latent=5, n_hidden=32)
    with pytest.raises(ValueError, match=r"call model.train\(\) first"):
        untrained.train_refiner()
    fresh = sclatent.SCLatent(model.data, n_latent=5, n_hidden=32).train(max_epochs=1, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"train one first with model.train_refiner\(\)"):
        fresh.get_latent_representation(test, refine_steps=2, refine_method="learned")
    with pytest.raises(ValueError, match="refine_method must be 'adam' or 'learned'"):
        model.get_latent_representation(test, refine_steps=2, refine_method="newton")
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        fresh.train_refiner(steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        fresh.train_refiner(lr=0)
    with pytest.raises(ValueError, match="start_jitter must be a finite number >= 0"):
        fresh.train_refiner(start_jitter=-1.0)
