"""``sclatent run``: the README's main command trains on the shipped data and writes results."""

import anndata as ad
import numpy as np
import pytest

from sclatent import datasets
from sclatent.cli import main


def test_run_writes_latent_umap_and_model(tmp_path):
    assert main(["run", "--out", str(tmp_path), "--max-epochs", "3", "--n-latent", "8"]) == 0
    result = ad.read_h5ad(tmp_path / "sclatent_mop.h5ad")
    shipped = datasets.mop_snareseq2()
    assert list(result.obs_names) == list(shipped.obs_names)
    assert result.obsm["X_sclatent"].shape == (shipped.n_obs, 8)
    assert np.isfinite(result.obsm["X_sclatent"]).all()
    assert result.obsm["X_umap"].shape == (shipped.n_obs, 2)
    assert result.obs["leiden"].nunique() > 1
    assert (tmp_path / "umap.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "manifest.json").exists()


def test_run_asks_for_kinds_when_no_modality_is_named_after_one(tmp_path):
    import mudata as md

    rng = np.random.default_rng(0)
    mdata = md.MuData({"prot": ad.AnnData(rng.poisson(1.0, (20, 5)).astype(np.float32))})
    path = tmp_path / "prot.h5mu"
    mdata.write(path)
    with pytest.raises(ValueError, match="none named after a kind.*--modality KEY=KIND"):
        main(["run", "--out", str(tmp_path / "out"), "--input", str(path), "--max-epochs", "1"])


def test_modality_option_must_be_key_equals_kind(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--modality", "gex"])
    assert "--modality takes KEY=KIND" in capsys.readouterr().err
