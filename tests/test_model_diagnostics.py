"""Inference diagnostics of SCLatent on small real models: amortization gap, the
inference-gap decomposition, refined marginal likelihood, posterior collapse,
semi-amortized training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import pbmc_subset, requires_pbmc, torch_threads

import sclatent
from sclatent.model._diagnostics import INFERENCE_GAP_TERMS

pytestmark = [
    requires_pbmc,
    pytest.mark.usefixtures("one_thread"),
]


def _fit(adata, seed: int = 0, **train_kwargs) -> sclatent.SCLatent:
    model = sclatent.SCLatent(adata, n_latent=5, n_hidden=32, seed=seed)
    kwargs = dict(max_epochs=8, batch_size=128, enable_progress_bar=False, seed=seed)
    kwargs.update(train_kwargs)
    return model.train(**kwargs)


@pytest.fixture(scope="module")
def rna_model():
    with torch_threads(1):
        adata = pbmc_subset()
        sclatent.SCLatent.setup_anndata(adata)
        train, test = adata[:240].copy(), adata[240:].copy()
        return _fit(train), test


@pytest.fixture(scope="module")
def multiome_model():
    mu = pytest.importorskip("mudata")
    with torch_threads(1):
        return _small_multiome_model(mu)


def _small_multiome_model(mu):
    mdata = sclatent.datasets.mop_snareseq2()
    rna, atac = mdata.mod["rna"], mdata.mod["atac"]
    cells = mdata.obs_names[:200]
    genes = np.argsort(-np.asarray(rna[cells].X.sum(0)).ravel())[:200]
    peaks = np.argsort(-np.asarray(atac[cells].X.sum(0)).ravel())[:300]
    small = mu.MuData({"rna": rna[cells][:, np.sort(genes)].copy(), "atac": atac[cells][:, np.sort(peaks)].copy()})
    keep = (np.asarray(small.mod["rna"].X.sum(1)).ravel() > 0) & (np.asarray(small.mod["atac"].X.sum(1)).ravel() > 0)
    small = small[keep].copy()
    sclatent.SCLatent.setup_mudata(small, modalities={"rna": "rna", "atac": "atac"})
    model = sclatent.SCLatent(small, n_latent=5, n_hidden=32)
    return model.train(max_epochs=5, batch_size=64, enable_progress_bar=False)


# ------------------------------------------------------------------ amortization gap
def test_gap_is_nonnegative_and_refined_elbo_is_higher(rna_model):
    model, test = rna_model
    per_cell, summary = model.get_amortization_gap(test, refine_steps=30, n_samples=64, seed=0)
    assert list(per_cell.columns) == ["elbo_amortized", "elbo_refined", "gap"]
    assert per_cell.index.equals(pd.Index(test.obs_names.astype(str)))
    assert np.isfinite(per_cell.to_numpy()).all()
    assert np.allclose(per_cell["gap"], per_cell["elbo_refined"] - per_cell["elbo_amortized"])
    assert summary["mean_gap"] > 0
    assert summary["mean_elbo_refined"] > summary["mean_elbo_amortized"]
    assert summary["frac_cells_improved"] > 0.5
    assert summary["n_cells"] == test.n_obs and summary["refine_steps"] == 30
    assert summary["ms_per_1000_cells"] > 0
    # the amortized column is the ELBO get_elbo reports (same estimator, other noise)
    elbo = model.get_elbo(test, n_samples=64, return_mean=False)
    assert abs(float(elbo.mean()) - summary["mean_elbo_amortized"]) < 1.0


def test_gap_is_deterministic_and_zero_without_refinement(rna_model):
    model, test = rna_model
    a = model.get_amortization_gap(test, refine_steps=5, n_samples=4, seed=3)
    b = model.get_amortization_gap(test, refine_steps=5, n_samples=4, seed=3)
    pd.testing.assert_frame_equal(a.per_cell, b.per_cell)
    c = model.get_amortization_gap(test, refine_steps=5, n_samples=4, seed=4)
    assert not np.allclose(a.per_cell["elbo_refined"], c.per_cell["elbo_refined"])
    zero = model.get_amortization_gap(test, refine_steps=0, n_samples=4, seed=3)
    assert (zero.per_cell["gap"] == 0).all()
    # the evaluation noise does not depend on K: the amortized column is identical
    pd.testing.assert_series_equal(zero.per_cell["elbo_amortized"], a.per_cell["elbo_amortized"])
    # batch size only changes how cells are grouped, not the amortized ELBO's definition
    small = model.get_amortization_gap(test, refine_steps=0, n_samples=256, batch_size=7, seed=1)
    assert abs(small.summary["mean_elbo_amortized"] - zero.summary["mean_elbo_amortized"]) < 1.0


def test_refinement_leaves_weights_untouched(rna_model):
    model, test = rna_model
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    model.get_amortization_gap(test, refine_steps=3, n_samples=2)
    model.get_latent_representation(test, refine_steps=3)
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.module.parameters())


def test_refined_marginal_ll_is_finite(rna_model):
    model, test = rna_model
    plain = model.get_marginal_ll(test, n_mc_samples=64, return_mean=False)
    refined = model.get_marginal_ll(test, n_mc_samples=64, refine_steps=20, return_mean=False)
    assert np.isfinite(refined).all() and refined.index.equals(plain.index)
    elbo = model.get_elbo(test, n_samples=64)
    assert float(refined.mean()) >= elbo - 0.5  # an importance-weighted bound is at least the ELBO


def test_latent_representation_refinement_is_deterministic(rna_model):
    model, test = rna_model
    a = model.get_latent_representation(test, refine_steps=5, seed=1)
    b = model.get_latent_representation(test, refine_steps=5, seed=1)
    plain = model.get_latent_representation(test)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain)


# ------------------------------------------------------------------ inference gap
def test_inference_gap_terms_are_ordered_as_theory_says(rna_model):
    model, test = rna_model
    per_cell, summary = model.get_inference_gap(test, refine_steps=100, n_samples=256, seed=0)
    assert list(per_cell.columns) == [c for t in INFERENCE_GAP_TERMS for c in (t, f"{t}_se")]
    assert per_cell.index.equals(pd.Index(test.obs_names.astype(str)))
    assert np.isfinite(per_cell.to_numpy()).all()
    se = per_cell[[f"{t}_se" for t in INFERENCE_GAP_TERMS]]
    assert (se >= 0).all().all()
    assert (per_cell[["log_px_se", "elbo_refined_se", "elbo_amortized_se"]] > 0).all().all()
    # the gaps are the differences of the columns
    assert np.allclose(per_cell["approximation_gap"], per_cell["log_px"] - per_cell["elbo_refined"])
    assert np.allclose(per_cell["amortization_gap"], per_cell["elbo_refined"] - per_cell["elbo_amortized"])
    assert np.allclose(per_cell["inference_gap"], per_cell["approximation_gap"] + per_cell["amortization_gap"])
    # log p(x) >= ELBO(q*) >= ELBO(q_enc) for every cell, up to its reported Monte-Carlo error
    assert (per_cell["approximation_gap"] > -3 * per_cell["approximation_gap_se"]).all()
    assert (per_cell["amortization_gap"] > -3 * per_cell["amortization_gap_se"]).all()
    assert summary["mean_log_px"] > summary["mean_elbo_refined"] > summary["mean_elbo_amortized"]
    assert summary["mean_approximation_gap"] > 3 * summary["mean_approximation_gap_se"]
    assert summary["frac_cells_ordered"] > 0.9
    # the importance-sampled log p(x) is precise: its error is small next to the gaps
    assert summary["mean_log_px_se"] < 0.1 and summary["max_log_px_se"] < 1.0
    # the summary: means over cells, their Monte-Carlo errors and the settings
    for t in INFERENCE_GAP_TERMS:
        assert np.isclose(summary[f"mean_{t}"], per_cell[t].mean())
        assert np.isclose(summary[f"mean_{t}_se"], np.sqrt((per_cell[f"{t}_se"] ** 2).sum()) / len(per_cell))
    assert summary["n_cells"] == test.n_obs and summary["refine_steps"] == 100 and summary["n_samples"] == 256
    assert summary["seconds"] >= summary["refine_seconds"] > 0


def test_inference_gap_agrees_with_amortization_gap_and_marginal_ll(rna_model):
    model, test = rna_model
    options = dict(refine_steps=20, n_samples=128, batch_size=32, seed=2)
    per_cell, summary = model.get_inference_gap(test, **options)
    pd.testing.assert_frame_equal(per_cell, model.get_inference_gap(test, **options).per_cell)  # deterministic
    # the same refinement and evaluation noise as get_amortization_gap: its columns, exactly
    gap = model.get_amortization_gap(test, **options).per_cell
    for column in ("elbo_amortized", "elbo_refined"):
        np.testing.assert_allclose(per_cell[column], gap[column], rtol=0, atol=1e-3)
    np.testing.assert_allclose(per_cell["amortization_gap"], gap["gap"], rtol=0, atol=1e-3)
    # log p(x) is get_marginal_ll's estimator with the refined proposal (other noise): equal within MC error
    marginal = model.get_marginal_ll(test, n_mc_samples=128, refine_steps=20, batch_size=32, seed=2, return_mean=False)
    assert abs(float(marginal.mean()) - summary["mean_log_px"]) < 5 * np.sqrt(2) * summary["mean_log_px_se"]
    # without refinement q* is the encoder's posterior: no amortization gap, all of it approximation
    none = model.get_inference_gap(test, refine_steps=0, n_samples=128, seed=2).per_cell
    assert (none["amortization_gap"] == 0).all() and (none["amortization_gap_se"] == 0).all()
    assert (none["approximation_gap"] > per_cell["approximation_gap"]).mean() > 0.9
    # the refined proposal gives the tighter (higher) estimate of log p(x)
    assert none["log_px"].mean() < per_cell["log_px"].mean()


def test_inference_gap_of_a_single_modality_view(multiome_model):
    model = multiome_model
    fused = model.get_inference_gap(refine_steps=20, n_samples=64).per_cell
    rna = model.get_inference_gap(refine_steps=20, n_samples=64, modality="rna").per_cell
    for per_cell in (fused, rna):
        assert np.isfinite(per_cell.to_numpy()).all() and (per_cell["log_px_se"] > 0).all()
        assert (per_cell["approximation_gap"] > -3 * per_cell["approximation_gap_se"]).all()
        assert per_cell["amortization_gap"].mean() > 0
    # counts have probability <= 1, so p(x_rna) >= p(x_rna, x_atac): log_px of the RNA view is higher
    assert (rna["log_px"] > fused["log_px"] - 3 * (rna["log_px_se"] + fused["log_px_se"])).all()
    with pytest.raises(ValueError, match="Unknown modality"):
        model.get_inference_gap(refine_steps=1, n_samples=4, modality="protein")


def test_inference_gap_rejects_bad_arguments(rna_model):
    model, test = rna_model
    with pytest.raises(ValueError, match="n_samples >= 2"):
        model.get_inference_gap(test, n_samples=1)
    with pytest.raises(ValueError, match="n_samples must be an integer >= 1"):
        model.get_inference_gap(test, n_samples=0)
    with pytest.raises(ValueError, match="refine_steps must be an integer >= 0"):
        model.get_inference_gap(test, refine_steps=-1)
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['n_mc_samples'\]"):
        model.get_inference_gap(test, n_mc_samples=100)  # get_marginal_ll's name: here it is n_samples


# --------------------------------------------------------------- posterior collapse
def test_latent_diagnostics_kl_and_active_units(rna_model):
    model, test = rna_model
    per_dim, n_active, kl = model.latent_diagnostics(test)
    assert list(per_dim.index) == [f"z{d}" for d in range(5)]
    assert list(per_dim.columns) == ["kl", "active", "mean_variance"]
    assert (per_dim["kl"] >= 0).all()
    assert np.isclose(per_dim["kl"].sum(), kl, rtol=1e-6)
    assert n_active == int((per_dim["kl"] > 0.01).sum())
    assert per_dim["active"].equals(per_dim["kl"] > 0.01)
    # the mean KL is the KL term of the ELBO, computed directly
    tensors = model._tensors_for(test)[0]
    with torch.no_grad():
        q = model.module.inference(tensors.batch(torch.arange(tensors.n_cells)))
    assert np.isclose(kl, float(q.kl_to_standard().sum(-1).double().mean()), rtol=1e-5)
    assert model.latent_diagnostics(test, threshold=1e9).n_active == 0


# ---------------------------------------------------------------- multimodal views
def test_single_modality_gaps(multiome_model):
    model = multiome_model
    fused = model.get_amortization_gap(refine_steps=10, n_samples=16)
    rna = model.get_amortization_gap(refine_steps=10, n_samples=16, modality="rna")
    atac = model.get_amortization_gap(refine_steps=10, n_samples=16, modality="atac")
    for result in (fused, rna, atac):
        assert np.isfinite(result.per_cell.to_numpy()).all()
        assert result.summary["mean_gap"] > 0
    # an RNA-only ELBO scores only the RNA likelihood: it is higher than the two-modality ELBO
    assert rna.summary["mean_elbo_amortized"] > fused.summary["mean_elbo_amortized"]
    per_dim, _, _ = model.latent_diagnostics(modality="atac")
    assert len(per_dim) == 5
    with pytest.raises(ValueError, match="Unknown modality"):
        model.get_amortization_gap(refine_steps=1, modality="protein")


# ------------------------------------------------------------- semi-amortized training
def test_semi_amortized_training_runs_and_is_deterministic(rna_model):
    _, test = rna_model
    adata = pbmc_subset(n_cells=160, n_genes=100)
    sclatent.SCLatent.setup_anndata(adata)
    a = _fit(adata, max_epochs=2, refine_steps=3)
    b = _fit(adata, max_epochs=2, refine_steps=3)
    assert a.is_trained and len(a.history) == 2
    assert np.isfinite(a.history.to_numpy(dtype=float)).all()
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert np.isfinite(a.get_latent_representation(refine_steps=2)).all()


def test_semi_amortized_loss_routes_gradients(rna_model):
    """SA-VAE with stop-gradient: the decoder learns only from the refined posterior's ELBO,
    the encoder only from its own ELBO (through a frozen decoder)."""
    model, test = rna_model
    module = model.module.eval()
    tensors = model._tensors_for(test)[0]
    batch = tensors.batch(torch.arange(32))
    enc = [p for n, p in module.named_parameters() if n.startswith("encoders.")]
    dec = [p for n, p in module.named_parameters() if not n.startswith("encoders.")]

    torch.manual_seed(0)
    loss = module.loss(batch, kl_weight=1.0, subset_weight=0.0, refine_steps=4, refine_lr=0.05).loss
    g_enc = torch.autograd.grad(loss, enc, allow_unused=True)
    torch.manual_seed(0)
    loss = module.loss(batch, kl_weight=1.0, subset_weight=0.0, refine_steps=4, refine_lr=0.05).loss
    g_dec = torch.autograd.grad(loss, dec, allow_unused=True)

    torch.manual_seed(0)  # the same draws, in the same order, by hand
    q = module.inference(batch)
    rec, kl = module.elbo(batch, q)
    encoder_term = -(rec - kl).mean()
    refined = module.refine(batch, q, 4, 0.05, keep_best=False)  # as training refines
    rec_k, kl_k = module.elbo(batch, refined)
    decoder_term = -(rec_k - kl_k).mean()
    want_enc = torch.autograd.grad(encoder_term, enc)
    want_dec = torch.autograd.grad(decoder_term, dec, allow_unused=True)
    for got, want in zip(g_enc, want_enc):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(g_dec, want_dec):
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)
