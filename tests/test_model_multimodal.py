"""SCLatent on paired + unpaired RNA/ATAC: training, alignment, outputs, save/load.

One small model (shipped MOp subset, all 25,734 peaks, half the training cells unpaired) is
trained once per module and shared by the tests.
"""

from __future__ import annotations


import mudata as md
import numpy as np
import pandas as pd
import pytest
import torch

import sclatent
from conftest import mudata_of
from sclatent.data import organize_multiome
from sclatent.tools import foscttm, knn_transfer_accuracy

md.set_options(pull_on_update=False)

N_TRAIN, N_TEST, N_PEAKS, EPOCHS = 800, 200, 25_734, 25  # all peaks: the ATAC encoder takes its sparse path



@pytest.fixture(scope="module")
def data():
    full = sclatent.datasets.mop_snareseq2()
    rng = np.random.default_rng(0)
    cells = rng.choice(full.n_obs, N_TRAIN + N_TEST, replace=False)
    rna = full.mod["rna"][cells].copy()
    atac = full.mod["atac"][cells]
    detected = np.asarray((atac.X > 0).sum(0)).ravel()
    atac = atac[:, np.sort(np.argsort(-detected)[:N_PEAKS])].copy()
    obs = full.obs.iloc[cells][["batch", "cell_type"]].copy()
    rna.obs, atac.obs = obs.copy(), obs.copy()
    q = N_TRAIN // 4  # half paired, a quarter RNA-only, a quarter ATAC-only
    train = organize_multiome(
        paired=(rna[: 2 * q], atac[: 2 * q]), rna=rna[2 * q : 3 * q], atac=atac[3 * q : N_TRAIN]
    )
    test = mudata_of({"rna": rna[N_TRAIN:].copy(), "atac": atac[N_TRAIN:].copy()}, obs)
    return {"train": train, "test": test, "rna": rna, "atac": atac, "obs": obs}


@pytest.fixture(scope="module")
def model(data):
    """Trained on 1 thread: the thresholds below were set on this model, and float sums over
    2 threads give another (here, a less aligned) model from the same seed."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _trained(data)
    torch.set_num_threads(previous)


def _trained(data):
    train = data["train"]
    sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"}, batch_key="batch")
    m = sclatent.SCLatent(train, n_latent=10, seed=0)
    m.train(max_epochs=EPOCHS, batch_size=64, lr=2e-3, validation_size=0.0, early_stopping=False,
            accelerator="cpu", enable_progress_bar=False)
    return m


def test_unpaired_training_aligns_rna_and_atac_latents(model, data):
    test = data["test"]
    z_rna = model.get_latent_representation(test, modality="rna")
    z_atac = model.get_latent_representation(test, modality="atac")
    score = foscttm(z_rna, z_atac)
    assert score < 0.35, f"held-out FOSCTTM {score:.3f}: RNA-only and ATAC-only latents are not aligned"
    rng = np.random.default_rng(1)
    assert foscttm(z_rna, z_atac[rng.permutation(len(z_atac))]) > 0.4  # random pairing is near 0.5
    labels = test.obs["cell_type"].astype(str).to_numpy()
    majority = pd.Series(labels).value_counts(normalize=True).iloc[0]
    accuracy = knn_transfer_accuracy(z_rna, labels, z_atac, labels)
    shuffled = knn_transfer_accuracy(z_rna, labels, z_atac, rng.permutation(labels))
    assert accuracy > majority and accuracy > shuffled + 0.1
    # the per-epoch loss went down
    loss = model.history["train_loss"]
    assert loss.iloc[-1] < loss.iloc[0]


def test_training_cells_use_only_what_they_observed(model, data):
    train = data["train"]
    mask = model.observed_modalities()
    kinds = train.obs["modalities"].astype(str)
    assert (mask["rna"] == kinds.isin(["rna+atac", "rna"])).all()
    assert (mask["atac"] == kinds.isin(["rna+atac", "atac"])).all()
    fused = model.get_latent_representation()
    rna_only_cells = np.flatnonzero(kinds == "rna")
    view = train[train.obs_names[rna_only_cells]].copy()
    np.testing.assert_allclose(fused[rna_only_cells], model.get_latent_representation(view, modality="rna"), atol=1e-5)
    with pytest.raises(ValueError, match="none of the requested modalities"):
        model.get_latent_representation(modality="atac")  # RNA-only cells have no ATAC expert


def test_outputs_aligned_to_obs_names_after_shuffling(model, data):
    test = data["test"]
    rng = np.random.default_rng(2)
    r_perm, a_perm, g_perm = (rng.permutation(test.n_obs) for _ in range(3))
    shuffled = mudata_of(
        {"rna": test.mod["rna"][r_perm].copy(), "atac": test.mod["atac"][a_perm].copy()}, test.obs.iloc[g_perm]
    )
    shuffled = shuffled[test.obs_names[g_perm]].copy()
    assert not (shuffled.obs_names == test.obs_names).all()
    for modality in (None, "rna", "atac"):
        a = pd.DataFrame(model.get_latent_representation(test, modality=modality), index=test.obs_names)
        b = pd.DataFrame(model.get_latent_representation(shuffled, modality=modality), index=shuffled.obs_names)
        np.testing.assert_allclose(a.loc[shuffled.obs_names].to_numpy(), b.to_numpy(), atol=1e-5)
    e1 = model.get_normalized_expression(test, gene_list=test.mod["rna"].var_names[:20])
    e2 = model.get_normalized_expression(shuffled, gene_list=test.mod["rna"].var_names[:20])
    assert list(e2.index) == list(shuffled.obs_names)
    np.testing.assert_allclose(e1.loc[e2.index].to_numpy(), e2.to_numpy(), rtol=1e-4)


def test_imputation_for_every_cell_and_write_back(model, data):
    train = data["train"].copy()
    kinds = train.obs["modalities"].astype(str)
    expr = model.get_normalized_expression(train, key_added="sclatent_expr")
    acc = model.get_accessibility_estimates(train, key_added="sclatent_acc")
    assert list(expr.index) == list(train.obs_names) and list(acc.index) == list(train.obs_names)
    assert expr.shape == (train.n_obs, train.mod["rna"].n_vars) and acc.shape == (train.n_obs, train.mod["atac"].n_vars)
    assert np.isfinite(expr.to_numpy()).all() and np.isfinite(acc.to_numpy()).all()
    np.testing.assert_allclose(expr.sum(1), 1e4, rtol=1e-3)  # ATAC-only cells too
    assert ((acc.to_numpy() >= 0) & (acc.to_numpy() <= 1)).all()
    # imputed values depend on the cell: ATAC-only cells differ from each other in expression
    atac_only = kinds[kinds == "atac"].index
    assert expr.loc[atac_only].std(0).mean() > 0
    # write-back: the layers of the modalities, for the cells they hold
    layer = train.mod["rna"].layers["sclatent_expr"]
    np.testing.assert_allclose(layer, expr.loc[train.mod["rna"].obs_names].to_numpy(), rtol=1e-5)
    layer = train.mod["atac"].layers["sclatent_acc"]
    np.testing.assert_allclose(layer, acc.loc[train.mod["atac"].obs_names].to_numpy(), rtol=1e-5)
    z = model.get_latent_representation(train, key_added="X_sclatent")
    np.testing.assert_array_equal(train.obsm["X_sclatent"], z)
    # imputation from one view only: the test cells without their ATAC / without their RNA
    test = data["test"]
    rna_view = mudata_of({"rna": test.mod["rna"].copy(), "atac": test.mod["atac"][:0].copy()}, test.obs)
    acc_rna = model.get_accessibility_estimates(rna_view)
    assert acc_rna.shape == (test.n_obs, test.mod["atac"].n_vars)
    # it is cell-specific: a cell's imputed profile tracks its own observed ATAC better than
    # another cell's imputed profile does
    observed = (test.mod["atac"].X > 0).toarray().astype(float)
    imputed = acc_rna.loc[test.obs_names].to_numpy()
    other = np.roll(np.arange(test.n_obs), 1)
    own = np.nanmean([np.corrcoef(imputed[i], observed[i])[0, 1] for i in range(test.n_obs)])
    swapped = np.nanmean([np.corrcoef(imputed[other[i]], observed[i])[0, 1] for i in range(test.n_obs)])
    assert own > 0 and own > swapped


def test_elbo_marginal_ll_save_load(model, data, tmp_path):
    test = data["test"]
    elbo = model.get_elbo(test, return_mean=False)
    assert list(elbo.index) == list(test.obs_names) and np.isfinite(elbo).all()
    mll = model.get_marginal_ll(test, n_mc_samples=20, return_mean=False)
    assert np.isfinite(mll).all()
    assert mll.mean() > elbo.mean() - 1.0  # importance sampling tightens the bound (up to noise)
    train_elbo = model.get_elbo(return_mean=False)  # unpaired training cells: only what they observed
    assert np.isfinite(train_elbo).all()
    model.save(tmp_path / "mm")
    loaded = sclatent.SCLatent.load(tmp_path / "mm", test)
    np.testing.assert_allclose(
        loaded.get_latent_representation(modality="atac"), model.get_latent_representation(test, modality="atac"), atol=1e-6
    )
    assert loaded.get_elbo(seed=3) == pytest.approx(model.get_elbo(test, seed=3), rel=1e-5)
    # features that do not match at load time
    fewer = mudata_of({"rna": test.mod["rna"].copy(), "atac": test.mod["atac"][:, 5:].copy()}, test.obs)
    with pytest.raises(ValueError, match=rf"lacks 5 of the model's {N_PEAKS} features of modality 'atac'"):
        sclatent.SCLatent.load(tmp_path / "mm", fewer)
    # peaks in another order are fine
    reordered = mudata_of(
        {"rna": test.mod["rna"].copy(), "atac": test.mod["atac"][:, test.mod["atac"].var_names[::-1]].copy()}, test.obs
    )
    np.testing.assert_allclose(
        sclatent.SCLatent.load(tmp_path / "mm", reordered).get_latent_representation(),
        model.get_latent_representation(test), atol=1e-5,
    )


def test_validation_loss_includes_single_modality_elbos_and_sleep_defaults(data):
    """Validation watches the single-expert ELBOs of paired cells (what early stopping must see);
    the sleep term is on by default for two modalities and recorded in training only."""
    train = data["train"].copy()
    sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"}, batch_key="batch")
    m = sclatent.SCLatent(train, n_latent=5, n_hidden=32, seed=0)
    with pytest.raises(ValueError, match="sleep_weight"):
        m.train(max_epochs=1, sleep_weight=-1.0)
    m.train(max_epochs=2, batch_size=128, validation_size=0.3, early_stopping=False, accelerator="cpu", enable_progress_bar=False)
    h = m.history
    fused_only = h["validation_kl"] - h["validation_reconstruction"]
    # paired validation cells add two single-expert negative ELBOs, each hundreds of nats
    assert (h["validation_loss"] > fused_only + 50).all()
    assert "train_sleep" in h.columns and np.isfinite(h["train_sleep"]).all()  # on by default
    m1 = sclatent.SCLatent(train, n_latent=5, n_hidden=32, seed=0)
    m1.train(max_epochs=1, sleep_weight=0.0, validation_size=0.0, accelerator="cpu", enable_progress_bar=False)
    assert "train_sleep" not in m1.history.columns


def test_chunked_outputs_equal_the_whole_result_and_memory_is_checked(model, data, monkeypatch):
    train = data["train"]
    regions = list(train.mod["atac"].var_names[:30])
    whole = model.get_accessibility_estimates(train, region_list=regions)
    assert list(whole.columns) == regions and whole.dtypes.unique().tolist() == [np.float32]
    chunks = list(model.iter_accessibility_estimates(train, chunk_size=37, region_list=regions, batch_size=16))
    assert [len(c) for c in chunks[:-1]] == [37] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= 37
    joined = pd.concat(chunks)
    assert list(joined.index) == list(whole.index) and list(joined.columns) == regions
    np.testing.assert_allclose(joined.to_numpy(), whole.to_numpy(), rtol=1e-5, atol=1e-7)
    genes = list(train.mod["rna"].var_names[:10])
    expr = pd.concat(model.iter_normalized_expression(train, chunk_size=100, gene_list=genes))
    np.testing.assert_allclose(expr.to_numpy(), model.get_normalized_expression(train, gene_list=genes).to_numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        next(model.iter_normalized_expression(train, chunk_size=0))
    # a dense result larger than the memory there is: refused before anything is computed
    import sclatent.model._outputs as outputs

    monkeypatch.setattr(outputs, "available_memory", lambda: 1 << 20)
    with pytest.raises(MemoryError, match=r"get_accessibility_estimates: .* GiB.*region_list=\[\.\.\.\].*iter_accessibility_estimates"):
        model.get_accessibility_estimates(train)
    with pytest.raises(MemoryError, match=r"gene_list=\[\.\.\.\].*iter_normalized_expression"):
        model.get_normalized_expression(train, key_added="too_big")
    assert "too_big" not in train.mod["rna"].layers  # nothing written
    small = model.get_accessibility_estimates(train, region_list=regions[:2])  # 2 regions fit
    assert small.shape == (train.n_obs, 2)
