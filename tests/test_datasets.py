"""The shipped MOp SNARE-seq2 subset."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

import sclatent


@pytest.fixture(scope="module")
def mop():
    return sclatent.datasets.mop_snareseq2()


def _values(x) -> np.ndarray:
    return x.data if sp.issparse(x) else np.asarray(x).ravel()


def test_mudata_has_both_modalities_and_annotations(mop):
    assert mop.n_obs == 3000
    assert set(mop.mod) == {"rna", "atac"}
    assert mop.mod["rna"].shape == (3000, 1677)
    assert mop.mod["atac"].shape == (3000, 25734)
    # fully paired: the same nuclei in both modalities
    assert (mop.mod["rna"].obs_names == mop.mod["atac"].obs_names).all()
    assert mop.obs_names.is_unique
    # cell-level annotations in the global obs (8 libraries, 15 classes)
    assert mop.obs["batch"].nunique() == 8
    assert mop.obs["cell_type"].nunique() == 15
    assert mop.obs[["batch", "cell_type"]].notna().all().all()
    assert mop.mod["atac"].var_names[0].startswith("chr")


@pytest.mark.parametrize("modality,n_features", [("rna", 1677), ("atac", 25734)])
def test_single_modality_is_an_anndata_of_raw_counts(modality, n_features):
    adata = sclatent.datasets.mop_snareseq2(modality)
    assert isinstance(adata, ad.AnnData)
    assert adata.shape == (3000, n_features)
    values = _values(adata.X)
    assert values.size > 0
    assert (values >= 0).all() and (values == np.round(values)).all()  # integers, not normalized
    assert values.max() > 1  # counts, not a binarized matrix
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert (totals > 0).mean() > 0.99
    assert {"batch", "cell_type"} <= set(adata.obs.columns)
    assert adata.obs["cell_type"].nunique() >= 10
    assert adata.obs["batch"].nunique() >= 2


def test_rna_passes_setup(tmp_path):
    adata = sclatent.datasets.mop_snareseq2("rna")
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    sclatent.SCLatent.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    assert sclatent.SCLatent(adata, n_latent=4, n_hidden=16).get_latent_representation().shape == (adata.n_obs, 4)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="modality must be"):
        sclatent.datasets.mop_snareseq2("protein")
    with pytest.raises(ValueError, match="Unknown dataset"):
        sclatent.datasets.data_path("pbmc_1m")
    assert sclatent.datasets.data_path("mop_snareseq2").exists()


def test_loading_the_shipped_data_warns_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # mudata's pull_on_update FutureWarning would fail here
        mdata = sclatent.datasets.mop_snareseq2()
    assert list(mdata.obs.columns) == ["batch", "cell_type", "subtype"]
