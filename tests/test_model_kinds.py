"""Modalities by kind in the model layer: any mod keys, a third modality, one conversion."""

from __future__ import annotations


import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sclatent
from conftest import mudata_of
from sclatent.model import _convert

md.set_options(pull_on_update=False)
QUIET = dict(enable_progress_bar=False, accelerator="cpu")



@pytest.fixture(scope="module")
def parts():
    """300 paired MOp cells, 400 genes, 2,000 peaks (shipped data)."""
    full = sclatent.datasets.mop_snareseq2()
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(full.n_obs, 300, replace=False))
    rna, atac = full.mod["rna"][cells], full.mod["atac"][cells]
    rna = rna[:, np.sort(np.argsort(-np.asarray(rna.X.sum(0)).ravel())[:400])].copy()
    atac = atac[:, np.sort(np.argsort(-np.asarray((atac.X > 0).sum(0)).ravel())[:2000])].copy()
    keep = (np.asarray(rna.X.sum(1)).ravel() > 0) & (np.asarray(atac.X.sum(1)).ravel() > 0)
    obs = full.obs.iloc[cells][["batch", "cell_type"]][keep].copy()
    return rna[keep].copy(), atac[keep].copy(), obs


def _train(mdata, **setup):
    sclatent.SCLatent.setup_mudata(mdata, batch_key="batch", **setup)
    model = sclatent.SCLatent(mdata, n_latent=5, n_hidden=32, seed=1)
    return model.train(max_epochs=3, batch_size=64, **QUIET)


def test_mod_keys_gex_and_peaks_train_exactly_like_rna_and_atac(parts):
    """Behaviour follows the kind: renaming the modalities changes no number."""
    rna, atac, obs = parts
    named = _train(mudata_of({"rna": rna, "atac": atac}, obs), modalities={"rna": "rna", "atac": "atac"})
    other = _train(mudata_of({"gex": rna.copy(), "peaks": atac.copy()}, obs), modalities={"gex": "rna", "peaks": "atac"})
    assert [(m.name, m.likelihood) for m in other.module.modalities] == [("gex", "nb"), ("peaks", "poisson")]
    np.testing.assert_array_equal(other.get_latent_representation(), named.get_latent_representation())
    losses = [c for c in named.history.columns if c != "seconds"]
    renamed = [c.replace("single_rna", "single_gex").replace("single_atac", "single_peaks") for c in losses]
    np.testing.assert_array_equal(other.history[renamed].to_numpy(), named.history[losses].to_numpy())
    np.testing.assert_array_equal(
        other.get_latent_representation(modality="peaks"), named.get_latent_representation(modality="atac")
    )
    # the output methods find their modality by kind
    access = other.get_accessibility_estimates(region_list=atac.var_names[:20])
    np.testing.assert_array_equal(access.to_numpy(), named.get_accessibility_estimates(region_list=atac.var_names[:20]).to_numpy())
    assert list(other.get_normalized_expression(gene_list=rna.var_names[:5]).columns) == list(rna.var_names[:5])
    assert other.get_elbo() == named.get_elbo()


def test_spec_form_and_the_deprecated_kind_first_form(parts):
    rna, atac, obs = parts
    mdata = mudata_of({"gex": rna.copy(), "peaks": atac.copy()}, obs)
    mdata.mod["gex"].layers["raw"] = mdata.mod["gex"].X.copy()
    sclatent.SCLatent.setup_mudata(mdata, {"gex": {"kind": "rna", "layer": "raw"}, "peaks": {"kind": "atac"}})
    reg = _convert.registry_of(mdata)
    assert [(m.name, m.kind, m.layer) for m in reg.modalities] == [("gex", "rna", "raw"), ("peaks", "atac", None)]
    with pytest.warns(DeprecationWarning, match=r"modalities=\{'gex': 'rna'\}"):
        sclatent.SCLatent.setup_mudata(mdata, {"rna": "gex", "atac": "peaks"})
    assert [(m.name, m.kind) for m in _convert.registry_of(mdata).modalities] == [("gex", "rna"), ("peaks", "atac")]
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['likelihood'\]"):
        sclatent.SCLatent.setup_mudata(mdata, {"gex": {"kind": "rna", "likelihood": "nb"}})


def test_a_third_modality_is_one_spec_entry(parts):
    """RNA + ATAC + synthetic ADT counts (NB, kind "protein"): nothing but the spec table changes."""
    rna, atac, obs = parts
    rng = np.random.default_rng(4)
    # ADT counts that depend on cell type, plus NB noise
    codes = pd.Categorical(obs["cell_type"]).codes
    profile = rng.gamma(2.0, 20.0, size=(codes.max() + 1, 12))
    mean = profile[codes] * rng.lognormal(0, 0.3, size=(len(codes), 1))
    adt = ad.AnnData(sp.csr_matrix(rng.negative_binomial(5, 5 / (5 + mean)).astype(np.float32)), obs=obs.copy())
    adt.obs_names, adt.var_names = rna.obs_names, [f"CD{i}" for i in range(12)]
    mdata = mudata_of({"gex": rna.copy(), "peaks": atac.copy(), "adt": adt}, obs)
    model = _train(mdata, modalities={"gex": "rna", "peaks": "atac", "adt": "protein"})
    assert [(m.name, m.likelihood) for m in model.module.modalities] == [("gex", "nb"), ("peaks", "poisson"), ("adt", "nb")]
    assert {"train_single_adt", "validation_single_adt"} <= set(model.history.columns)
    z = model.get_latent_representation()
    z_adt = model.get_latent_representation(modality="adt")
    assert z.shape == z_adt.shape == (len(obs), 5) and np.isfinite(z).all() and np.isfinite(z_adt).all()
    denoised = model.get_normalized_expression(modality="adt", library_size=1.0)
    np.testing.assert_allclose(denoised.sum(1), 1.0, rtol=1e-4)
    errors = model.get_reconstruction_error()
    assert set(errors) == {"reconstruction_loss", "reconstruction_loss_gex", "reconstruction_loss_peaks", "reconstruction_loss_adt"}
    np.testing.assert_allclose(
        errors["reconstruction_loss"], sum(errors[f"reconstruction_loss_{m}"] for m in ("gex", "peaks", "adt")), rtol=1e-5
    )
    # the default expression modality is the first expression kind in model order
    assert list(model.get_normalized_expression(gene_list=rna.var_names[:3]).columns) == list(rna.var_names[:3])


def test_an_anndata_of_another_kind(parts):
    _, atac, obs = parts
    adata = atac.copy()
    adata.obs = obs.copy()
    sclatent.SCLatent.setup_anndata(adata, batch_key="batch", modality_kind="atac")
    model = sclatent.SCLatent(adata, n_latent=3, n_hidden=16)
    assert [(m.name, m.likelihood) for m in model.module.modalities] == [("atac", "poisson")]
    p = model.get_accessibility_estimates(region_list=adata.var_names[:4])
    assert p.shape == (adata.n_obs, 4) and ((p >= 0) & (p <= 1)).all().all()
    with pytest.raises(ValueError, match="no modality of this model has a kind that gives expression"):
        model.get_normalized_expression()


def test_setup_and_model_read_and_check_each_matrix_once(parts, monkeypatch):
    rna, atac, obs = parts
    calls = []
    real = _convert.check_counts
    monkeypatch.setattr(_convert, "check_counts", lambda m, where, *a, **k: calls.append(where) or real(m, where, *a, **k))
    mdata = mudata_of({"gex": rna.copy(), "peaks": atac.copy()}, obs)
    sclatent.SCLatent.setup_mudata(mdata, {"gex": "rna", "peaks": "atac"}, batch_key="batch")
    sclatent.SCLatent(mdata, n_latent=3, n_hidden=8)
    assert sorted(calls) == ["mdata.mod['gex'].X", "mdata.mod['peaks'].X"]
    # data changed after setup: the kept conversion is not used, the new data are read and checked
    calls.clear()
    sclatent.SCLatent.setup_mudata(mdata, {"gex": "rna", "peaks": "atac"}, batch_key="batch")
    mdata.obs["batch"] = mdata.obs["batch"].iloc[::-1].to_numpy()
    model = sclatent.SCLatent(mdata, n_latent=3, n_hidden=8)
    assert len(calls) == 4
    expected = pd.Categorical(mdata.obs["batch"].astype(str), categories=model.registry.categories["batch"]).codes
    np.testing.assert_array_equal(model._tensors.covariates.code("batch").numpy(), expected)
