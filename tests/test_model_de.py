"""Differential expression and accessibility: scvi-tools' columns, biology, FDR, Monte-Carlo error."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import sclatent
from sclatent.model._de import _fold_change_summaries, _posterior_fdr

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)
INHIBITORY = ["Pvalb", "Sst", "CGE", "Npy"]
EXCITATORY = ["L2/3", "L4/5", "L6"]


@pytest.mark.parametrize("mode", ["change", "vanilla"])
def test_blocked_summaries_equal_the_direct_ones(mode):
    """The feature-blocked summaries of the sampled proportions against numpy on the whole
    ``(n_samples, n_features)`` fold-change matrix (300 features: blocks of 128, 128 and 44;
    the medians selected inline with one torch thread and by worker threads with several)."""
    import torch

    rng = np.random.default_rng(0)
    rho1 = rng.dirichlet(np.ones(300), size=501).astype(np.float32)  # odd: the median is the middle value
    rho2 = rng.dirichlet(np.ones(300) * 0.5, size=501).astype(np.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fold_change_summaries(torch.tensor(rho1), torch.tensor(rho2), 1e-4, 0.25, mode)
        torch.set_num_threads(3)
        got = _fold_change_summaries(torch.tensor(rho1), torch.tensor(rho2), 1e-4, 0.25, mode)
    finally:
        torch.set_num_threads(threads)
    for name in got:
        np.testing.assert_array_equal(one[name], got[name], err_msg=name)
    lfc = np.log2(rho1.astype(np.float64) + 1e-4) - np.log2(rho2.astype(np.float64) + 1e-4)
    proba = (np.abs(lfc) > 0.25).mean(0) if mode == "change" else (rho1 > rho2).mean(0)
    np.testing.assert_allclose(got["proba_de"], proba, atol=1.5 / 501)  # float32 rounding may flip an entry at the threshold
    np.testing.assert_allclose(got["proba_de_se"], np.sqrt(got["proba_de"] * (1 - got["proba_de"]) / 501))
    for name, expected in (("lfc_mean", lfc.mean(0)), ("lfc_std", lfc.std(0)), ("lfc_median", np.median(lfc, 0)),
                           ("lfc_min", lfc.min(0)), ("lfc_max", lfc.max(0)), ("scale1", rho1.mean(0)), ("scale2", rho2.mean(0))):
        np.testing.assert_allclose(got[name], expected, rtol=2e-5, atol=2e-5, err_msg=name)
    np.testing.assert_allclose(got["bayes_factor"], np.log(got["proba_de"] + 1e-8) - np.log(1 - got["proba_de"] + 1e-8))


@pytest.fixture(scope="module")
def mop_rna():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = sclatent.datasets.mop_snareseq2("rna")
    sclatent.SCLatent.setup_anndata(adata, batch_key="batch")
    model = sclatent.SCLatent(adata, seed=0).train(max_epochs=30, **QUIET)
    return model, adata


def test_inhibitory_vs_excitatory_neurons_recover_the_markers(mop_rna):
    model, adata = mop_rna
    cell_type = adata.obs["cell_type"].astype(str)
    de = model.differential_expression(idx1=cell_type.isin(INHIBITORY).to_numpy(), idx2=cell_type.isin(EXCITATORY).to_numpy())
    for column in ("proba_de", "proba_not_de", "bayes_factor", "lfc_mean", "lfc_median", "lfc_std", "scale1", "scale2",
                   "raw_mean1", "raw_mean2", "non_zeros_proportion1", "raw_normalized_mean1", "is_de_fdr_0.05", "proba_de_se"):
        assert column in de.columns, column
    assert len(de) == adata.n_vars and de["proba_de"].is_monotonic_decreasing
    up = de[de["lfc_mean"] > 0].sort_values("lfc_mean", ascending=False).index[:10]
    down = de[de["lfc_mean"] < 0].sort_values("lfc_mean").index[:10]
    assert {"Gad1", "Gad2"} <= set(up)  # GABA synthesis: inhibitory neurons
    assert "Slc17a7" in set(down)  # VGLUT1: excitatory neurons
    assert de.loc[["Gad1", "Gad2", "Slc17a7"], "is_de_fdr_0.05"].all()
    # the data's own means agree in direction
    assert (de.loc["Gad1", "raw_normalized_mean1"] > 5 * de.loc["Gad1", "raw_normalized_mean2"])


def test_groups_seeds_and_the_monte_carlo_error(mop_rna):
    model, adata = mop_rna
    a = model.differential_expression(groupby="cell_type", group1="Astro", n_samples=2000, seed=1)
    b = model.differential_expression(groupby="cell_type", group1="Astro", n_samples=2000, seed=1)
    pd.testing.assert_frame_equal(a, b)  # seeded
    c = model.differential_expression(groupby="cell_type", group1="Astro", n_samples=2000, seed=2).loc[a.index]
    gap = np.abs(a["proba_de"] - c["proba_de"])
    se = np.sqrt(a["proba_de_se"] ** 2 + c["proba_de_se"] ** 2)
    assert (gap <= 5 * se + 1e-3).mean() > 0.99  # two seeds differ by their Monte-Carlo error
    assert set(a["comparison"]) == {"Astro vs rest"}
    several = model.differential_expression(groupby="cell_type", group1=["Astro", "Oligo"], group2="L6", n_samples=500,
                                            batch_correction=True, gene_list=["Gad1", "Slc17a7", "Neurod6"])
    assert set(several["comparison"]) == {"Astro vs L6", "Oligo vs L6"} and len(several) == 6
    vanilla = model.differential_expression(groupby="cell_type", group1="Oligo", mode="vanilla", n_samples=500)
    assert vanilla["bayes_factor"].is_monotonic_decreasing


def test_group_statistics_are_the_data_means(mop_rna):
    """raw_mean, non_zeros_proportion and raw_normalized_mean of both groups against numpy on
    the counts: against the rest (made from the sums over all cells less the group's) and
    against an explicit group, with gene_list."""
    import scipy.sparse as sp

    model, adata = mop_rna
    x = sp.csr_matrix(adata.X).astype(np.float64)
    normalized = sp.diags(1e4 / np.maximum(np.asarray(x.sum(1)).ravel(), 1.0)) @ x
    cell_type = adata.obs["cell_type"].astype(str).to_numpy()

    def expected(mask, genes):
        cols = adata.var_names.get_indexer(genes)
        return (np.asarray(x[mask][:, cols].mean(0)).ravel(), np.asarray((x[mask][:, cols] > 0).mean(0)).ravel(),
                np.asarray(normalized[mask][:, cols].mean(0)).ravel())

    every = model.differential_expression(groupby="cell_type", n_samples=50)
    for group in ("Astro", "L6"):
        de = every[every["group1"] == group]
        for k, mask in (("1", cell_type == group), ("2", cell_type != group)):
            raw, nonzero, norm = expected(mask, de.index)
            np.testing.assert_allclose(de[f"raw_mean{k}"], raw, rtol=1e-9)
            np.testing.assert_allclose(de[f"non_zeros_proportion{k}"], nonzero, rtol=1e-9)
            np.testing.assert_allclose(de[f"raw_normalized_mean{k}"], norm, rtol=1e-7)
    genes = ["Gad1", "Slc17a7"]
    de = model.differential_expression(groupby="cell_type", group1="Astro", group2="L6", n_samples=50, gene_list=genes)
    for k, group in (("1", "Astro"), ("2", "L6")):
        raw, nonzero, norm = expected(cell_type == group, de.index)
        np.testing.assert_allclose(de[f"raw_mean{k}"], raw, rtol=1e-9)
        np.testing.assert_allclose(de[f"raw_normalized_mean{k}"], norm, rtol=1e-7)


def test_bad_arguments_say_what_is_wrong(mop_rna):
    model, _ = mop_rna
    with pytest.raises(ValueError, match="mode must be 'change' or 'vanilla'"):
        model.differential_expression(groupby="cell_type", group1="Astro", mode="bayes")
    with pytest.raises(ValueError, match="has no group 'Neuron'"):
        model.differential_expression(groupby="cell_type", group1="Neuron")
    with pytest.raises(ValueError, match="not an obs column"):
        model.differential_expression(groupby="celltype", group1="Astro")
    with pytest.raises(ValueError, match="Give groupby="):
        model.differential_expression()
    with pytest.raises(ValueError, match="no modality of this model has a kind that gives accessibility"):
        model.differential_accessibility(groupby="cell_type", group1="Astro")


def test_posterior_fdr_matches_its_definition():
    rng = np.random.default_rng(0)
    proba = rng.random(200)
    chosen = _posterior_fdr(proba, 0.1)
    order = np.argsort(-proba)
    best = 0
    for k in range(1, 201):  # the largest top-k set whose mean 1 - proba is <= 0.1
        if (1 - proba[order[:k]]).mean() <= 0.1:
            best = k
    assert chosen.sum() == best and chosen[order[:best]].all()


def test_differential_accessibility_on_paired_data():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mudata as md

        md.set_options(pull_on_update=False)
        mdata = sclatent.datasets.mop_snareseq2()[:800].copy()
    sclatent.SCLatent.setup_mudata(mdata, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    model = sclatent.SCLatent(mdata, seed=0).train(max_epochs=2, **QUIET)
    regions = list(mdata.mod["atac"].var_names[:50])
    da = model.differential_accessibility(groupby="cell_type", group1="L2/3", region_list=regions, n_samples=300)
    assert len(da) == 50 and set(da.index) == set(regions)
    assert da["proba_de"].between(0, 1).all() and np.isfinite(da["lfc_mean"]).all()


def _pseudobulk_lfc(adata, cells) -> np.ndarray:
    """log2 of the mean depth-normalized expression of ``cells`` (boolean), per gene, +1e-4."""
    x = adata.X[np.flatnonzero(cells)]
    totals = np.asarray(x.sum(1)).ravel()
    return np.log2(np.asarray((x.multiply(1e4 / totals[:, None])).mean(0)).ravel() + 1e-4)


@pytest.mark.parametrize("pair", [("H1975", "H2228"), ("H2228", "HCC827")])
def test_cell_line_de_with_batch_correction_agrees_with_each_technology(trained_model, pair):
    """CellBench: two lung cancer cell lines measured by two technologies. DE between the lines,
    batch-corrected over both, must agree with each technology's own fold changes (computed on
    that technology's cells alone): the top genes change in the same direction in both."""
    from scipy.stats import spearmanr

    adata = trained_model.adata
    line, tech = adata.obs["cell_type"].astype(str), adata.obs["batch"].astype(str)
    de = trained_model.differential_expression(groupby="cell_type", group1=pair[0], group2=pair[1], batch_correction=True, seed=0)
    de = de.loc[adata.var_names]
    top = np.argsort(-(de["proba_de"].to_numpy() + 1e-3 * np.abs(de["lfc_mean"].to_numpy())))[:50]
    for t in ("sc_celseq2", "sc_dropseq"):
        raw = _pseudobulk_lfc(adata, (line == pair[0]) & (tech == t)) - _pseudobulk_lfc(adata, (line == pair[1]) & (tech == t))
        agree = np.mean(np.sign(raw[top]) == np.sign(de["lfc_mean"].to_numpy()[top]))
        assert agree >= 0.95, (t, agree)
        expressed = (de["raw_mean1"] + de["raw_mean2"]).to_numpy() > 0.1
        rho = spearmanr(raw[expressed], de["lfc_mean"].to_numpy()[expressed]).statistic
        assert rho > 0.85, (t, rho)
    assert de["is_de_fdr_0.05"].sum() >= 50  # distinct cell lines differ in many genes
