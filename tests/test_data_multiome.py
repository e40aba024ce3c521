"""organize_multiome and the modality mask of setup_mudata (no training here)."""

from __future__ import annotations

import warnings

import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import sclatent
from sclatent.data import organize_multiome

md.set_options(pull_on_update=False)


@pytest.fixture(scope="module")
def mop():
    """100 cells of the shipped MOp subset, 300 peaks: (rna, atac) AnnDatas with the same cells."""
    mdata = sclatent.datasets.mop_snareseq2()
    rna = mdata.mod["rna"][:100].copy()
    atac = mdata.mod["atac"][:100]
    detected = np.asarray((atac.X > 0).sum(0)).ravel()
    atac = atac[:, np.sort(np.argsort(-detected)[:300])].copy()
    return rna, atac


def _observed(mdata) -> pd.DataFrame:
    """The modality mask as setup_mudata/read_tensors derive it."""
    from sclatent.model._convert import read_tensors, registry_of

    tensors, names = read_tensors(mdata, registry_of(mdata))
    return pd.DataFrame(tensors.observed.numpy().astype(bool), index=names, columns=["rna", "atac"])


def test_organize_multiome_membership_order_and_features(mop):
    rna, atac = mop
    shuffled_peaks = atac[60:, atac.var_names[::-1]].copy()  # ATAC-only cells list peaks in reverse order
    mdata = organize_multiome(paired=(rna[:40], atac[:40]), rna=rna[40:60], atac=shuffled_peaks)
    assert mdata.n_obs == 100
    assert list(mdata.obs_names) == list(rna.obs_names)  # paired, then RNA-only, then ATAC-only
    assert list(mdata.mod["rna"].obs_names) == list(rna.obs_names[:60])
    assert list(mdata.mod["atac"].obs_names) == list(atac.obs_names[:40]) + list(atac.obs_names[60:])
    assert list(mdata.mod["atac"].var_names) == list(atac.var_names)  # aligned to the paired order
    assert sp.issparse(mdata.mod["atac"].X)
    np.testing.assert_array_equal(mdata.mod["atac"].X.toarray(), atac[list(mdata.mod["atac"].obs_names)].X.toarray())
    counts = mdata.obs["modalities"].value_counts()
    assert (counts["rna+atac"], counts["rna"], counts["atac"]) == (40, 20, 40)
    assert (mdata.obs["cell_type"].astype(str) == rna.obs["cell_type"].astype(str)).all()
    # and setup_mudata reads exactly that membership
    sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"}, batch_key="batch", modality_key="modalities")
    observed = _observed(mdata)
    assert observed["rna"].sum() == 60 and observed["atac"].sum() == 80
    assert (observed.all(1).to_numpy() == (mdata.obs["modalities"] == "rna+atac").to_numpy()).all()


def test_organize_multiome_accepts_a_paired_mudata(mop):
    rna, atac = mop
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paired = md.MuData({"gex": rna[:30].copy(), "peaks": atac[:30].copy()})
    paired.obs = rna[:30].obs[["batch", "cell_type"]].copy()
    mdata = organize_multiome(paired=paired, rna=rna[30:50], rna_mod="gex", atac_mod="peaks")
    assert set(mdata.mod) == {"rna", "atac"}
    assert mdata.mod["atac"].n_obs == 30 and mdata.mod["rna"].n_obs == 50
    assert "gex:batch" not in mdata.obs.columns and "batch" in mdata.obs.columns


def test_organize_multiome_clear_errors(mop):
    rna, atac = mop
    with pytest.raises(ValueError, match=r"lacks 10 of them"):
        organize_multiome(paired=(rna[:40], atac[:40]), atac=atac[60:, 10:])
    renamed = rna[40:60].copy()
    renamed.var_names = [f"g{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match="Features are matched by name"):
        organize_multiome(paired=(rna[:40], atac[:40]), rna=renamed)
    with pytest.raises(ValueError, match="more than one input"):
        organize_multiome(paired=(rna[:40], atac[:40]), rna=rna[30:60])
    with pytest.raises(ValueError, match="do not hold the same cells"):
        organize_multiome(paired=(rna[:40], atac[:50]))
    with pytest.raises(ValueError, match="at least one"):
        organize_multiome()
    with pytest.raises(TypeError, match="MuData or a pair"):
        organize_multiome(paired=rna)


def test_measured_zero_count_cell_is_not_missing(mop):
    """Membership, not counts, decides whether a cell has a modality."""
    rna, atac = mop
    atac = atac.copy()
    x = atac.X.tolil()
    x[5, :] = 0  # cell 5: measured in ATAC, zero counts in every selected peak
    atac.X = sp.csr_matrix(x)
    mdata = organize_multiome(paired=(rna[:50], atac[:50]), rna=rna[50:70], atac=atac[70:])
    sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"}, batch_key="batch")
    observed = _observed(mdata)
    zero_cell, rna_only_cell = rna.obs_names[5], rna.obs_names[55]
    assert observed.loc[zero_cell, "atac"] and observed.loc[zero_cell, "rna"]
    assert not observed.loc[rna_only_cell, "atac"] and observed.loc[rna_only_cell, "rna"]
    # an RNA-only cell whose (absent) ATAC would be zero is not confused with a measured one
    assert observed["atac"].sum() == 80
    # the model sees the same: the measured cell's fused posterior uses its ATAC expert,
    # the missing cell's fused posterior is its RNA posterior exactly
    model = sclatent.SCLatent(mdata, n_latent=4, n_hidden=16)
    fused = pd.DataFrame(model.get_latent_representation(), index=mdata.obs_names)
    mask = model.observed_modalities()
    has_rna = mask.index[mask["rna"]]
    rna_view = mdata[has_rna.to_numpy()].copy()
    rna_only = pd.DataFrame(model.get_latent_representation(rna_view, modality="rna"), index=rna_view.obs_names)
    np.testing.assert_allclose(fused.loc[rna_only_cell], rna_only.loc[rna_only_cell], atol=1e-6)
    assert np.abs(fused.loc[zero_cell] - rna_only.loc[zero_cell]).max() > 1e-4
    # a modality_key column can only remove modalities that membership implies
    mdata.obs["mods"] = np.where(mdata.obs_names == zero_cell, "rna", mdata.obs["modalities"].astype(str))
    sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"}, batch_key="batch", modality_key="mods")
    assert not _observed(mdata).loc[zero_cell, "atac"]
    mdata.obs["mods"] = np.where(mdata.obs_names == rna_only_cell, "rna+atac", mdata.obs["modalities"].astype(str))
    with pytest.raises(ValueError, match="not in that modality's AnnData"):
        sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"}, batch_key="batch", modality_key="mods")


def test_setup_mudata_clear_errors(mop):
    rna, atac = mop
    # a modality without any counts
    empty = atac[:50].copy()
    empty.X = sp.csr_matrix(empty.shape, dtype=np.float32)
    mdata = organize_multiome(paired=(rna[:50], empty))
    with pytest.raises(ValueError, match="no counts at all"):
        sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"})
    # cells that are in no modality (the modality was replaced without mdata.update())
    mdata = organize_multiome(paired=(rna[:50], atac[:50]))
    mdata.mod["rna"] = rna[:40].copy()
    mdata.mod["atac"] = atac[:40].copy()
    with pytest.raises(ValueError, match=r"10 cell\(s\) of mdata are in none of the modalities"):
        sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"})
    # cells measured only in modalities where they have zero counts
    zero = atac[:50].copy()
    x = zero.X.tolil()
    x[:3, :] = 0
    zero.X = sp.csr_matrix(x)
    only_zero = organize_multiome(paired=(rna[3:40], atac[3:40]), atac=zero[:3])
    with pytest.raises(ValueError, match="zero counts in every modality"):
        sclatent.SCLatent.setup_mudata(only_zero, {"rna": "rna", "atac": "atac"})
    # unknown modality, non-count values
    mdata = organize_multiome(paired=(rna[:40], atac[:40]))
    with pytest.raises(ValueError, match="mdata.mod has no 'peaks'"):
        sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "peaks": "atac"})
    with pytest.raises(ValueError, match="Unknown modality kind 'peak'.*choose one of"):
        sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "peak"})
    norm = organize_multiome(paired=(rna[:40], atac[:40]))
    norm.mod["rna"].X = norm.mod["rna"].X * 0.5
    with pytest.raises(ValueError, match="non-integer"):
        sclatent.SCLatent.setup_mudata(norm, {"rna": "rna", "atac": "atac"})
