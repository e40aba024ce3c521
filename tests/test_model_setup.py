"""setup_anndata: input validation with helpful messages, storage formats, no side effects, new data."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sclatent
from conftest import matrix_digest
from sclatent.data.registry import REGISTRY_UNS_KEY
from sclatent.model import _convert


@pytest.fixture
def small(cellbench) -> ad.AnnData:
    """90 cells (both batches) x 300 genes of cellbench, raw counts in CSR float32, no empty cells."""
    cells = np.arange(0, cellbench.n_obs, 5)
    totals = np.asarray(cellbench.X.sum(0)).ravel()
    genes = np.sort(np.argsort(-totals)[:300])
    adata = cellbench[cells, genes].copy()
    assert (np.asarray(adata.X.sum(1)).ravel() > 0).all()
    assert set(adata.obs["batch"]) == {"sc_celseq2", "sc_dropseq"}
    return adata


def _setup(adata, **kwargs):
    sclatent.SCLatent.setup_anndata(adata, **kwargs)
    return adata


def _tensors(adata):
    tensors, names = _convert.read_tensors(adata, _convert.registry_of(adata))
    dense = tensors.counts["rna"].rows(torch.arange(tensors.n_cells))
    dense = dense[0] if isinstance(dense, tuple) else dense
    return dense, tensors, names


# ------------------------------------------------------------------- invalid input
def test_non_integer_values_are_rejected_and_counts_layer_suggested(small):
    adata = small.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = adata.X.multiply(1e4 / adata.X.sum(1)).tocsr()
    adata.X.data = np.log1p(adata.X.data)
    with pytest.raises(ValueError, match=r"non-integer.*layers\['counts'\]") as info:
        _setup(adata)
    assert "normalized or log-transformed" in str(info.value)
    assert REGISTRY_UNS_KEY not in adata.uns  # nothing was written
    _setup(adata, layer="counts")  # the suggested fix works
    assert json.loads(adata.uns[REGISTRY_UNS_KEY])["modalities"][0]["layer"] == "counts"


def test_non_integer_values_without_counts_layer_say_raw_counts_are_needed(small):
    adata = small.copy()
    adata.X = adata.X.astype(np.float64) * 0.5
    with pytest.raises(ValueError, match=r"non-integer.*raw, unnormalized counts"):
        _setup(adata)


@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_negative_values_are_rejected(small, fmt):
    x = small.X.toarray()
    x[4, 7] = -2
    small.X = sp.csr_matrix(x) if fmt == "csr" else x
    with pytest.raises(ValueError, match="negative values"):
        _setup(small)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_nan_and_inf_are_rejected(small, bad, fmt):
    x = small.X.toarray()
    x[10, 3] = bad
    small.X = sp.csr_matrix(x) if fmt == "csr" else x
    with pytest.raises(ValueError, match="NaN or infinite"):
        _setup(small)


@pytest.mark.parametrize("kwargs,missing", [
    ({"batch_key": "donor"}, "donor"),
    ({"labels_key": "celltype"}, "celltype"),
    ({"categorical_covariate_keys": ["batch", "plate"]}, "plate"),
    ({"continuous_covariate_keys": ["pct_mito"]}, "pct_mito"),
])
def test_missing_obs_key_is_named_with_the_available_columns(small, kwargs, missing):
    with pytest.raises(ValueError, match=rf"no column\(s\) \['{missing}'\].*available columns.*'batch'"):
        _setup(small, **kwargs)


@pytest.mark.parametrize("categorical", [True, False])
def test_nan_in_batch_covariate_is_rejected(small, categorical):
    batch = small.obs["batch"].astype(object)
    batch.iloc[[2, 5]] = np.nan
    small.obs["batch"] = batch.astype("category") if categorical else batch
    with pytest.raises(ValueError, match=r"obs\['batch'\] has 2 missing value"):
        _setup(small, batch_key="batch")


def test_cells_with_zero_counts_are_counted_in_the_message(small):
    x = small.X.toarray()
    x[[0, 17, 42]] = 0
    small.X = sp.csr_matrix(x)
    with pytest.raises(ValueError, match=r"3 cell\(s\) with zero total counts") as info:
        _setup(small)
    assert "filter_cells" in str(info.value)


def test_empty_matrices_are_rejected(small):
    with pytest.raises(ValueError, match=r"empty \(shape \(90, 0\)\)"):
        _setup(small[:, []].copy())
    with pytest.raises(ValueError, match=r"empty \(shape \(0, 300\)\)"):
        _setup(small[[], :].copy())


def test_duplicate_gene_names_are_rejected(small):
    names = small.var_names.tolist()
    names[5] = names[4]
    small.var_names = names
    with pytest.raises(ValueError, match="var_names has duplicates"):
        _setup(small)


def test_unknown_layer_lists_the_available_ones(small):
    small.layers["raw"] = small.X.copy()
    with pytest.raises(ValueError, match=r"no 'counts'.*\['raw'\]"):
        _setup(small, layer="counts")


# ------------------------------------------------------------ formats and layers
def test_csr_csc_and_dense_give_identical_tensors_and_models(small):
    variants = {
        "csr": small.X.tocsr(),
        "csc": small.X.tocsc(),
        "dense": small.X.toarray(),
        "dense_int": small.X.toarray().astype(np.int64),
    }
    results = {}
    for name, x in variants.items():
        adata = ad.AnnData(X=x, obs=small.obs.copy(), var=small.var.copy())
        _setup(adata, batch_key="batch")
        dense, tensors, names = _tensors(adata)
        model = sclatent.SCLatent(adata, n_latent=4, n_hidden=16, seed=3)
        results[name] = (dense, tensors, list(names), model.get_latent_representation(), model.get_elbo(seed=1))
    ref = results["csr"]
    np.testing.assert_array_equal(ref[0].numpy(), small.X.toarray())
    for name, (dense, tensors, names, latent, elbo) in results.items():
        assert torch.equal(dense, ref[0]), name
        assert torch.equal(tensors.log_library, ref[1].log_library), name
        assert torch.equal(tensors.covariates.code("batch"), ref[1].covariates.code("batch")), name
        assert names == ref[2] == small.obs_names.tolist()
        np.testing.assert_array_equal(latent, ref[3])
        assert elbo == ref[4]
    # the library size is the observed total per cell
    np.testing.assert_allclose(ref[1].log_library[:, 0].exp().numpy(), np.asarray(small.X.sum(1)).ravel(), rtol=1e-6)


def test_layer_is_read_instead_of_x(small):
    raw = small.copy()
    _setup(raw)
    adata = small.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # what X typically holds after preprocessing
    _setup(adata, layer="counts")
    assert torch.equal(_tensors(adata)[0], _tensors(raw)[0])
    m1 = sclatent.SCLatent(adata, n_latent=3, n_hidden=8, seed=0)
    m2 = sclatent.SCLatent(raw, n_latent=3, n_hidden=8, seed=0)
    np.testing.assert_array_equal(m1.get_latent_representation(), m2.get_latent_representation())


def test_registry_is_a_json_string_and_h5ad_writing_works(small, tmp_path):
    _setup(small, batch_key="batch", labels_key="cell_type")
    text = small.uns[REGISTRY_UNS_KEY]
    assert isinstance(text, str)
    reg = json.loads(text)
    assert reg["batch_key"] == "batch" and reg["labels_key"] == "cell_type"
    assert reg["categories"]["batch"] == ["sc_celseq2", "sc_dropseq"]
    assert reg["modalities"][0]["var_names"] == small.var_names.tolist()
    assert reg["package_version"] == sclatent.__version__
    path = tmp_path / "setup.h5ad"
    small.write_h5ad(path)
    back = ad.read_h5ad(path)
    assert back.uns[REGISTRY_UNS_KEY] == text
    # the data read back can be used directly, without a second setup
    model = sclatent.SCLatent(back, n_latent=3, n_hidden=8)
    assert model.registry == _convert.registry_of(small)
    assert model.get_latent_representation().shape == (small.n_obs, 3)


def test_model_requires_setup(small):
    with pytest.raises(ValueError, match="setup_anndata"):
        sclatent.SCLatent(small)


# ---------------------------------------------------------------- no side effects
def _noncanonical_csr(x: np.ndarray) -> sp.csr_matrix:
    """CSR with reversed column order within rows and an explicit zero per row (as some tools write)."""
    data, indices, indptr = [], [], [0]
    for row in x:
        cols = np.flatnonzero(row)[::-1]
        data += [0.0] + row[cols].tolist()
        indices += [int(np.argmin(row != 0)) if (row == 0).any() else int(cols[0])] + cols.tolist()
        indptr.append(len(data))
    m = sp.csr_matrix((np.array(data, dtype=np.float32), np.array(indices, dtype=np.int32), np.array(indptr)), shape=x.shape)
    np.testing.assert_array_equal(m.toarray(), x)
    assert not m.has_sorted_indices
    return m


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "noncanonical_csr"])
def test_user_matrix_is_never_modified(small, fmt, tmp_path):
    x = small.X.toarray()
    matrix = {
        "csr": sp.csr_matrix(x),
        "csc": sp.csc_matrix(x),
        "dense": x.copy(),
        "noncanonical_csr": _noncanonical_csr(x) if fmt == "noncanonical_csr" else None,
    }[fmt]
    adata = ad.AnnData(X=matrix, obs=small.obs.copy(), var=small.var.copy())
    adata.layers["counts"] = matrix.copy()
    digests = (matrix_digest(adata.X), matrix_digest(adata.layers["counts"]))
    obs_before = adata.obs.copy()

    def unchanged(stage):
        assert adata.X is matrix, stage
        assert (matrix_digest(adata.X), matrix_digest(adata.layers["counts"])) == digests, f"modified by {stage}"

    _setup(adata, batch_key="batch", layer="counts" if fmt == "csr" else None)
    unchanged("setup_anndata")
    model = sclatent.SCLatent(adata, n_latent=3, n_hidden=16, seed=0)
    unchanged("SCLatent()")
    model.train(max_epochs=1, batch_size=64, early_stopping=False, accelerator="cpu", devices=1, enable_progress_bar=False)
    unchanged("train")
    model.get_latent_representation()
    model.get_normalized_expression(transform_batch="sc_dropseq")
    model.get_elbo()
    model.get_reconstruction_error()
    model.get_marginal_ll(n_mc_samples=3)
    model.save(tmp_path / "m")
    sclatent.SCLatent.load(tmp_path / "m", adata).get_latent_representation()
    unchanged("outputs / save / load")
    pd.testing.assert_frame_equal(adata.obs, obs_before)


# ------------------------------------------------------------------------ new data
def test_new_data_with_shuffled_gene_order_gives_the_same_latent(trained_model, trained_latent):
    adata = trained_model.data
    perm = np.random.default_rng(0).permutation(adata.n_vars)
    shuffled = adata[:, perm].copy()
    del shuffled.uns[REGISTRY_UNS_KEY]  # new data need no setup of their own
    assert not (shuffled.var_names == adata.var_names).all()
    z = trained_model.get_latent_representation(shuffled)
    np.testing.assert_allclose(z, trained_latent, rtol=0, atol=1e-6)
    # and cells in another order come back in that order
    order = np.random.default_rng(1).permutation(adata.n_obs)
    np.testing.assert_allclose(trained_model.get_latent_representation(adata[order].copy()), trained_latent[order], rtol=0, atol=1e-6)


def test_new_data_with_extra_genes_is_reindexed(trained_model, trained_latent, cellbench_full):
    full = cellbench_full[trained_model.data.obs_names]  # all 15,073 genes; the model uses 2,000 of them
    z = trained_model.get_latent_representation(full)
    np.testing.assert_allclose(z, trained_latent, rtol=0, atol=1e-6)


def test_new_data_with_unknown_batch_is_rejected(trained_model):
    new = trained_model.data[:20].copy()
    new.obs["batch"] = new.obs["batch"].astype(str)
    new.obs.loc[new.obs_names[:3], "batch"] = "smart_seq2"
    with pytest.raises(ValueError, match=r"categories the model has not seen: \['smart_seq2'\].*sc_celseq2"):
        trained_model.get_latent_representation(new)


def test_new_data_missing_a_gene_is_rejected(trained_model):
    new = trained_model.data[:20, 1:].copy()
    with pytest.raises(ValueError, match=r"lacks 1 of the model's 2000 features.*" + trained_model.data.var_names[0]):
        trained_model.get_latent_representation(new)
