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
