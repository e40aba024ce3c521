"""The trained RNA model on cellbench: latent quality, batch correction, outputs, save/load, scanpy."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import torch
import pytest
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import sclatent
from conftest import N_LATENT

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def knn_accuracy(x: np.ndarray, labels) -> float:
    """5-fold cross-validated accuracy of a 15-nearest-neighbour classifier."""
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=15), x, np.asarray(labels), cv=cv).mean())


@pytest.fixture(scope="module")
def pca10(cellbench) -> np.ndarray:
    import scanpy as sc

    adata = cellbench.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=10, random_state=0)
    return adata.obsm["X_pca"]


# ------------------------------------------------------------------ latent quality
def test_latent_separates_cell_types_better_than_a_random_projection(trained_model, trained_latent, log_normalized):
    labels = trained_model.data.obs["cell_type"]
    acc_latent = knn_accuracy(trained_latent, labels)
    random_accs = [
        knn_accuracy(log_normalized @ np.random.default_rng(seed).normal(size=(log_normalized.shape[1], N_LATENT)), labels)
        for seed in range(3)
    ]
    print(f"kNN cell-type accuracy: latent {acc_latent:.3f}, random projections {np.round(random_accs, 3)}")
    assert acc_latent >= 0.95  # three cell lines: near perfect (1.00 observed)
    assert acc_latent >= np.mean(random_accs) + 0.1  # random projections: 0.64-0.84


def test_latent_removes_batch_effect_compared_to_pca(trained_model, trained_latent, pca10):
    """Batch predictability by kNN: PCA of log-normalized data keeps the technology; the latent much less."""
    obs = trained_model.data.obs
    batch_latent = knn_accuracy(trained_latent, obs["batch"])
    batch_pca = knn_accuracy(pca10, obs["batch"])
    celltype_pca = knn_accuracy(pca10, obs["cell_type"])
    print(f"kNN batch accuracy: latent {batch_latent:.3f}, PCA {batch_pca:.3f}")
    assert batch_pca >= 0.95  # the technology effect is strong...
    assert celltype_pca >= 0.95  # ...but not at the expense of the cell lines
    assert batch_latent <= batch_pca - 0.15  # 0.71-0.75 observed vs 1.00


def test_latent_shape_and_key_added(trained_model, trained_latent):
    assert trained_latent.shape == (trained_model.data.n_obs, N_LATENT)
    assert np.isfinite(trained_latent).all()
    adata = trained_model.data[:30].copy()
    z = trained_model.get_latent_representation(adata, key_added="X_sclatent")
    np.testing.assert_array_equal(adata.obsm["X_sclatent"], z)
    np.testing.assert_allclose(z, trained_latent[:30], rtol=0, atol=1e-6)
    # a posterior sample differs from the mean, reproducibly for a seed
    s1 = trained_model.get_latent_representation(adata, give_mean=False, seed=4)
    s2 = trained_model.get_latent_representation(adata, give_mean=False, seed=4)
    np.testing.assert_array_equal(s1, s2)
    assert np.abs(s1 - z).max() > 1e-3


def test_return_dist_gives_the_posterior_mean_and_variance(trained_model, trained_latent):
    adata = trained_model.data[:40].copy()
    mean, variance = trained_model.get_latent_representation(adata, return_dist=True, key_added="X_sclatent")
    np.testing.assert_allclose(mean, trained_latent[:40], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(adata.obsm["X_sclatent"], mean)  # the means, as without return_dist
    # the closed-form product of experts' variance, as the module computes it
    batch = trained_model._tensors.batch(torch.arange(40), trained_model.module.dense_count_modalities)
    trained_model.module.eval()
    with torch.no_grad():
        q = trained_model.module.inference(batch)
    np.testing.assert_allclose(variance, q.logvar.exp().numpy(), rtol=1e-5)
    assert (variance > 0).all() and (variance < 1).all()  # the data narrow the N(0, 1) prior
    # and the spread of posterior draws: 300 draws per cell, ratio of mean variances within 5 %
    draws = np.stack([trained_model.get_latent_representation(adata, give_mean=False, seed=s) for s in range(300)])
    assert abs(draws.var(0).mean() / variance.mean() - 1) < 0.05


# ------------------------------------------------------------------------- outputs
def test_elbo_per_cell_is_aligned_with_obs_names(trained_model):
    elbo = trained_model.get_elbo(return_mean=False)
    assert isinstance(elbo, pd.Series)
    assert elbo.index.equals(trained_model.data.obs_names)
    assert np.isfinite(elbo).all() and (elbo < 0).all()
    assert trained_model.get_elbo() == pytest.approx(float(elbo.mean()), rel=1e-6)
    # per-cell values do not depend on which other cells are in the batch
    sub = trained_model.data[::-7].copy()
    sub_elbo = trained_model.get_elbo(sub, return_mean=False, n_samples=20, seed=2)
    full_elbo = trained_model.get_elbo(return_mean=False, n_samples=20, seed=5)
    assert sub_elbo.index.equals(sub.obs_names)
    np.testing.assert_allclose(sub_elbo.to_numpy(), full_elbo[sub.obs_names].to_numpy(), rtol=0.01)


def test_normalized_expression_is_aligned_and_sums_to_library_size(trained_model):
    adata = trained_model.data
    expr = trained_model.get_normalized_expression()
    assert expr.index.equals(adata.obs_names)
    assert list(expr.columns) == adata.var_names.tolist()
    assert (expr.to_numpy() > 0).all()
    np.testing.assert_allclose(expr.sum(1).to_numpy(), 1e4, rtol=1e-4)
    np.testing.assert_allclose(trained_model.get_normalized_expression(library_size=50.0).sum(1).to_numpy(), 50.0, rtol=1e-4)
    genes = adata.var_names[[5, 0, 17]].tolist()
    sub = trained_model.get_normalized_expression(gene_list=genes)
    assert list(sub.columns) == genes
    np.testing.assert_allclose(sub.to_numpy(), expr[genes].to_numpy(), rtol=1e-6)
    # denoised expression tracks the observed proportions (cell-averaged)
    x = adata.X.toarray()
    observed = (x / x.sum(1, keepdims=True)).mean(0)
    assert np.corrcoef(np.log(observed + 1e-6), np.log(expr.to_numpy().mean(0) / 1e4))[0, 1] > 0.9


def test_transform_batch(trained_model):
    adata = trained_model.data
    plain = trained_model.get_normalized_expression()
    as_drop = trained_model.get_normalized_expression(transform_batch="sc_dropseq")
    as_cel = trained_model.get_normalized_expression(transform_batch="sc_celseq2")
    np.testing.assert_allclose(as_drop.sum(1).to_numpy(), 1e4, rtol=1e-4)
    drop = (adata.obs["batch"] == "sc_dropseq").to_numpy()
    # cells already from that batch are unchanged; the others change
    np.testing.assert_allclose(as_drop.to_numpy()[drop], plain.to_numpy()[drop], rtol=1e-5)
    np.testing.assert_allclose(as_cel.to_numpy()[~drop], plain.to_numpy()[~drop], rtol=1e-5)
    assert np.abs(np.log(as_drop.to_numpy()[~drop]) - np.log(plain.to_numpy()[~drop])).max() > 0.1
    with pytest.raises(ValueError, match=r"transform_batch='smart_seq2' is not a batch.*sc_celseq2"):
        trained_model.get_normalized_expression(transform_batch="smart_seq2")


def test_marginal_ll_is_at_least_the_elbo(trained_model):
    """The importance-weighted bound (K = 50) is tighter than the ELBO."""
    cells = trained_model.data[::5].copy()
    elbo = trained_model.get_elbo(cells, n_samples=50, return_mean=False)
    mll = trained_model.get_marginal_ll(cells, n_mc_samples=50, return_mean=False)
    assert mll.index.equals(cells.obs_names) and np.isfinite(mll).all()
    print(f"mean ELBO {elbo.mean():.2f}, IWAE-50 {mll.mean():.2f}")
    assert mll.mean() >= elbo.mean() - 0.5
    assert (mll >= elbo - 5.0).mean() > 0.95
    assert trained_model.get_marginal_ll(cells, n_mc_samples=50) == pytest.approx(float(mll.mean()), rel=1e-6)


def test_reconstruction_error_is_a_positive_nll(trained_model):
    err = trained_model.get_reconstruction_error()
    assert set(err) == {"reconstruction_loss"}
    assert isinstance(err["reconstruction_loss"], float)
    assert err["reconstruction_loss"] > 0 and np.isfinite(err["reconstruction_loss"])
    # it is the negative reconstruction term of the ELBO, up to Monte-Carlo noise
    h = trained_model.history
    assert err["reconstruction_loss"] == pytest.approx(-h["train_reconstruction"].iloc[-1], rel=0.05)


# --------------------------------------------------------------------- save / load
def test_save_load_round_trip(trained_model, trained_latent, tmp_path):
    path = tmp_path / "model"
    trained_model.save(path)
    loaded = sclatent.SCLatent.load(path, trained_model.data)
    np.testing.assert_allclose(loaded.get_latent_representation(), trained_latent, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        loaded.get_normalized_expression().to_numpy()[:20], trained_model.get_normalized_expression().to_numpy()[:20], rtol=1e-5
    )
    assert loaded.is_trained
    assert loaded.registry == trained_model.registry
    pd.testing.assert_frame_equal(loaded.history, trained_model.history, check_dtype=False)
    # loading onto other data with the genes in another order works too
    shuffled = trained_model.data[:, ::-1].copy()
    np.testing.assert_allclose(sclatent.SCLatent.load(path, shuffled).get_latent_representation(), trained_latent, atol=1e-6)


def test_manifest_is_json_without_pickles(trained_model, tmp_path):
    path = tmp_path / "model"
    trained_model.save(path)
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "sclatent-model"
    assert manifest["format_version"] == 2
    assert manifest["package_version"] == sclatent.__version__
    assert manifest["init_args"] == json.loads(json.dumps(trained_model.init_args))
    assert manifest["registry"]["modalities"][0]["var_names"] == trained_model.data.var_names.tolist()
    assert manifest["registry"]["batch_key"] == "batch"
    # the weights are plain safetensors: an 8-byte header length, a JSON header, raw tensor bytes
    raw = (path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert set(header) - {"__metadata__"} == set(trained_model.module.state_dict())
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    assert b"torch._utils" not in raw and b"_rebuild_tensor" not in raw  # no torch.save pickle anywhere


def test_load_rejects_data_missing_features(trained_model, tmp_path):
    path = tmp_path / "model"
    trained_model.save(path)
    missing = trained_model.data.var_names[[3, 7]].tolist()
    data = trained_model.data[:, ~trained_model.data.var_names.isin(missing)].copy()
    with pytest.raises(ValueError, match=r"lacks 2 of the model's 2000 features") as info:
        sclatent.SCLatent.load(path, data)
    assert all(g in str(info.value) for g in missing)


def test_save_refuses_to_overwrite_unless_asked(trained_model, tmp_path):
    path = tmp_path / "model"
    untrained = sclatent.SCLatent(trained_model.data, n_latent=N_LATENT, seed=9)
    untrained.save(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained_model.save(path)
    assert not sclatent.SCLatent.load(path, trained_model.data).is_trained
    trained_model.save(path, overwrite=True)
    reloaded = sclatent.SCLatent.load(path, trained_model.data)
    assert reloaded.is_trained
    np.testing.assert_allclose(reloaded.get_latent_representation()[:10], trained_model.get_latent_representation()[:10], atol=1e-6)
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no backup or temporary directories left


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_behind(trained_model, tmp_path, monkeypatch, existing):
    import sclatent.model._io as io

    path = tmp_path / "model"
    if existing:
        sclatent.SCLatent(trained_model.data, n_latent=N_LATENT, seed=9).save(path)
        before = {name: (path / name).read_bytes() for name in os.listdir(path)}

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        trained_model.save(path, overwrite=True)
    if existing:
        assert sorted(os.listdir(tmp_path)) == ["model"]
        assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before  # old model intact
        monkeypatch.undo()
        assert not sclatent.SCLatent.load(path, trained_model.data).is_trained
    else:
        assert os.listdir(tmp_path) == []  # no model directory, no temporary directory


def test_load_rejects_directories_that_are_not_models(tmp_path, trained_model):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        sclatent.SCLatent.load(tmp_path, trained_model.data)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "sclatent-model", "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        sclatent.SCLatent.load(tmp_path, trained_model.data)


# -------------------------------------------------------------------------- scanpy
def test_scanpy_neighbors_leiden_umap_on_the_latent(trained_model, trained_latent):
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    adata = trained_model.data.copy()
    adata.obsm["X_sclatent"] = trained_latent
    sc.pp.neighbors(adata, use_rep="X_sclatent", n_neighbors=15, random_state=0)
    assert adata.obsp["connectivities"].shape == (adata.n_obs, adata.n_obs)
    sc.tl.leiden(adata, resolution=0.2, flavor="igraph", n_iterations=2, random_state=0)
    ari = adjusted_rand_score(adata.obs["cell_type"], adata.obs["leiden"])
    print(f"leiden clusters {adata.obs['leiden'].nunique()}, ARI {ari:.3f}")
    assert ari > 0.8
    sc.tl.umap(adata, random_state=0)
    umap = adata.obsm["X_umap"]
    assert umap.shape == (adata.n_obs, 2) and np.isfinite(umap).all()
    # the embedding keeps the cell lines apart: 15-NN accuracy on the UMAP
    assert knn_accuracy(umap, adata.obs["cell_type"]) > 0.9
