"""SCLatent with a flow posterior (``posterior="flow"``) on small real data: training, every
output method, refinement, the inference-gap decomposition, save/load and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import pbmc_subset, requires_pbmc, torch_threads

import sclatent
from sclatent.inference import FlowPosterior

pytestmark = [
    requires_pbmc,
    pytest.mark.usefixtures("one_thread"),
]


@pytest.fixture(scope="module")
def flow_model():
    with torch_threads(1):
        adata = pbmc_subset()
        sclatent.SCLatent.setup_anndata(adata)
        train, test = adata[:240].copy(), adata[240:].copy()
        model = sclatent.SCLatent(train, n_latent=5, n_hidden=32, posterior="flow", n_flows=3)
        model.train(max_epochs=10, batch_size=128, enable_progress_bar=False)
    return model, test


def test_return_dist_needs_the_diagonal_posterior(flow_model):
    model, test = flow_model
    with pytest.raises(ValueError, match="posterior='diagonal'"):
        model.get_latent_representation(test, return_dist=True)


def test_flow_model_trains_and_its_posterior_is_a_flow(flow_model):
    model, test = flow_model
    assert np.isfinite(model.history["train_loss"]).all() and np.isfinite(model.history["validation_loss"]).all()
    assert model.history["train_loss"].iloc[-1] < model.history["train_loss"].iloc[0]
    assert len(model.module.posterior_flow.layers) == 3
    batch = model._tensors.batch(torch.arange(10), model.module.dense_count_modalities)
    model.module.eval()
    with torch.no_grad():
        q = model.module.inference(batch)
        location = q.location
    assert isinstance(q, FlowPosterior)
    # the flow was trained away from the identity (its output layers start at zero)
    assert any(float(layer.net[-1].weight.abs().max()) > 0 for layer in model.module.posterior_flow.layers)
    # the latent representation is the flow's image of the base mean, not the base mean
    latent = model.get_latent_representation()[:10]
    assert np.allclose(latent, location.numpy(), atol=1e-6)
    assert not np.allclose(latent, q.mean.numpy(), atol=1e-4)


def test_every_output_method_works_with_a_flow(flow_model):
    model, test = flow_model
    latent = model.get_latent_representation(test)
    assert latent.shape == (test.n_obs, 5) and np.isfinite(latent).all()
    assert np.array_equal(latent, model.get_latent_representation(test))  # deterministic
    sample = model.get_latent_representation(test, give_mean=False, seed=1)
    assert not np.allclose(sample, latent)
    expression = model.get_normalized_expression(test, library_size=1e4)
    assert np.allclose(expression.sum(1), 1e4, rtol=1e-4)
    elbo = model.get_elbo(test, n_samples=64)
    marginal = model.get_marginal_ll(test, n_mc_samples=200)
    assert np.isfinite(elbo) and marginal > elbo  # log p(x) bounds the ELBO from above
    per_dim, n_active, kl = model.latent_diagnostics(test)
    assert (per_dim["kl"] >= 0).all() and n_active >= 1 and np.isclose(kl, per_dim["kl"].sum())
    de = model.differential_expression(test, idx1=np.arange(20), idx2=np.arange(20, 60), seed=0)
    assert np.isfinite(de["lfc_mean"]).all() and de["proba_de"].between(0, 1).all()


def test_refinement_of_a_flow_posterior_is_monotone_and_the_gap_decomposes(flow_model):
    model, test = flow_model
    per_cell, summary = model.get_amortization_gap(test, refine_steps=50, n_samples=64, seed=0)
    assert summary["mean_gap"] > 0 and summary["frac_cells_improved"] > 0.5
    per_cell, summary = model.get_inference_gap(test, refine_steps=50, n_samples=256, seed=0)
    assert np.isfinite(per_cell.to_numpy()).all()
    assert (per_cell["approximation_gap"] > -3 * per_cell["approximation_gap_se"]).all()
    # monotone: no cell ends worse than the encoder left it, beyond Monte-Carlo error
    assert (per_cell["amortization_gap"] > -3 * per_cell["amortization_gap_se"] - 1e-9).all()
    assert summary["mean_log_px"] > summary["mean_elbo_refined"] > summary["mean_elbo_amortized"]
    assert summary["frac_cells_ordered"] > 0.9
    # refinement leaves the flow's weights alone
    before = {k: v.clone() for k, v in model.module.posterior_flow.state_dict().items()}
    model.get_latent_representation(test, refine_steps=5)
    assert all(torch.equal(before[k], v) for k, v in model.module.posterior_flow.state_dict().items())


def test_flow_model_saves_and_loads(flow_model, tmp_path):
    model, test = flow_model
    model.save(tmp_path / "flow")
    loaded = sclatent.SCLatent.load(tmp_path / "flow", model.data)
    assert loaded.init_args["posterior"] == "flow" and loaded.init_args["n_flows"] == 3
    assert np.array_equal(loaded.get_latent_representation(test), model.get_latent_representation(test))
    assert loaded.get_elbo(test, seed=3) == model.get_elbo(test, seed=3)


def test_flow_on_paired_and_unpaired_multiome_cells():
    mu = pytest.importorskip("mudata")
    mdata = sclatent.datasets.mop_snareseq2()
    rna, atac = mdata.mod["rna"], mdata.mod["atac"]
    cells = mdata.obs_names[:160]
    genes = np.argsort(-np.asarray(rna[cells].X.sum(0)).ravel())[:150]
    peaks = np.argsort(-np.asarray(atac[cells].X.sum(0)).ravel())[:200]
    rna, atac = rna[cells][:, np.sort(genes)].copy(), atac[cells][:, np.sort(peaks)].copy()
    # 80 paired cells, 40 RNA-only, 40 ATAC-only
    small = mu.MuData({"rna": rna[:120].copy(), "atac": atac[np.r_[0:80, 120:160]].copy()})
    sclatent.SCLatent.setup_mudata(small, modalities={"rna": "rna", "atac": "atac"})
    model = sclatent.SCLatent(small, n_latent=4, n_hidden=32, posterior="flow", n_flows=2)
    model.train(max_epochs=4, batch_size=64, enable_progress_bar=False, sleep_weight=0.5)
    assert np.isfinite(model.history["train_loss"]).all()
    for modality in (None, "rna", "atac"):
        cells_with = small.obs_names if modality is None else small.mod[modality].obs_names
        latent = model.get_latent_representation(small[cells_with] if modality else None, modality=modality)
        assert np.isfinite(latent).all()
    assert np.isfinite(model.get_accessibility_estimates(small[:10]).to_numpy()).all()


def test_bad_posterior_arguments_say_what_to_pass(flow_model):
    model, _ = flow_model
    with pytest.raises(ValueError, match=r"posterior must be one of \['diagonal', 'flow'\]"):
        sclatent.SCLatent(model.data, posterior="full")
    with pytest.raises(ValueError, match="n_latent >= 2"):
        sclatent.SCLatent(model.data, n_latent=1, posterior="flow")
    with pytest.raises(ValueError, match="n_flows must be >= 1"):
        sclatent.SCLatent(model.data, posterior="flow", n_flows=0)
