"""The vignettes run end to end (with a short training budget) and reach sensible numbers."""

import os
import runpy
from pathlib import Path

VIGNETTES = Path(__file__).resolve().parents[1] / "vignettes"


def test_rna_batch_integration_vignette(shared_data_dir, tmp_path, monkeypatch):
    # 450 cells: 200 epochs at the default batch size is ~400 steps, ~1.5 min on 2 cores
    monkeypatch.setenv("SCLATENT_VIGNETTE_EPOCHS", "200")
    monkeypatch.setenv("SCLATENT_VIGNETTE_OUT", str(tmp_path))
    monkeypatch.setenv("SCLATENT_SHARED_DATA", str(shared_data_dir))
    ns = runpy.run_path(str(VIGNETTES / "01_rna_batch_integration.py"), run_name="__main__")
    scores = ns["scores"]
    # the latent keeps cell types apart at least as well as PCA, and mixes libraries better
    assert scores["X_sclatent"]["cell_type"] >= scores["X_pca"]["cell_type"] - 0.05
    assert scores["X_sclatent"]["batch"] <= scores["X_pca"]["batch"] - 0.05  # PCA separates the technologies perfectly
    assert (tmp_path / "umap_sclatent.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "manifest.json").exists()
    assert os.path.exists(tmp_path / "model" / "model.safetensors")


def test_unpaired_rna_atac_vignette(tmp_path, monkeypatch):
    # 1,500 RNA-only + 1,500 ATAC-only shipped cells, no paired cell, package defaults
    # (early stopping ends training after ~90 epochs, ~2.5 min on 2 cores)
    monkeypatch.delenv("SCLATENT_VIGNETTE_EPOCHS", raising=False)
    monkeypatch.setenv("SCLATENT_VIGNETTE_OUT", str(tmp_path))
    ns = runpy.run_path(str(VIGNETTES / "02_unpaired_rna_atac.py"), run_name="__main__")
    # each ATAC-only cell lands near its own hidden RNA (0.5 would be no alignment at all)
    assert ns["fosc"] < 0.42, ns["fosc"]
    # and label transfer beats guessing the most common type (0.44 vs 0.37 measured)
    assert ns["transfer"] >= ns["majority"] + 0.03, (ns["transfer"], ns["majority"])
    # expression imputed for ATAC-only cells follows their hidden RNA, per cell type
    assert min(ns["pseudobulk_corr"].values()) > 0.5, ns["pseudobulk_corr"]
    # the figure shows both colourings, with every category in its legend
    fig = ns["fig"]
    titles = [ax.get_title() for ax in fig.axes]
    assert "modalities" in titles and "cell_type" in titles
    legend_labels = {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}
    assert {"rna", "atac"} <= legend_labels
    assert set(ns["mdata"].obs["cell_type"].astype(str)) <= legend_labels
    assert (tmp_path / "umap_unpaired.png").stat().st_size > 10_000
    assert ns["mdata"].obsm["X_sclatent"].shape == (3000, ns["model"].module.n_latent)
