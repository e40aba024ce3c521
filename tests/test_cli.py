"""The command line: ``sclatent run`` (the demo) and the pipeline steps train / embed / map / de."""

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
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "model" / "manifest.json").exists()


def test_run_asks_for_kinds_when_no_modality_is_named_after_one(tmp_path):
    import mudata as md

    rng = np.random.default_rng(0)
    mdata = md.MuData({"prot": ad.AnnData(rng.poisson(1.0, (20, 5)).astype(np.float32))})
    path = tmp_path / "prot.h5mu"
    mdata.write(path)
    with pytest.raises(ValueError, match="none named after a kind.*--modality KEY=KIND"):
        from sclatent.cli import run

        run(tmp_path / "out", path, max_epochs=1)


def test_modality_option_must_be_key_equals_kind(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--modality", "gex"])
    assert "--modality takes KEY=KIND" in capsys.readouterr().err



# ------------------------------------------------------------------------ pipeline steps
@pytest.fixture(scope="module")
def rna_file(tmp_path_factory):
    adata = datasets.mop_snareseq2("rna")[:400].copy()
    path = tmp_path_factory.mktemp("cli") / "rna.h5ad"
    adata.write_h5ad(path)
    return path


def test_train_embed_map_de_pass_files_between_them(rna_file, tmp_path, capsys):
    import json

    import pandas as pd

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {"n_latent": 5}, "train": {"max_epochs": 3}}))
    assert main(["train", str(rna_file), "--out", str(tmp_path / "model"), "--config", str(config)]) == 0
    assert (tmp_path / "model" / "manifest.json").exists()
    assert main(["embed", str(tmp_path / "model"), str(rna_file), "--out", str(tmp_path / "z.h5ad")]) == 0
    z = ad.read_h5ad(tmp_path / "z.h5ad")
    assert z.obsm["X_sclatent"].shape == (400, 5) and "cell_type" in z.obs
    query = ad.read_h5ad(rna_file)[:100].copy()
    query.obs["batch"] = "new_library"
    query.write_h5ad(tmp_path / "query.h5ad")
    for flags in ([], ["--refine"]):
        out = tmp_path / ("mapped" + "".join(flags))
        assert main(["map", str(tmp_path / "model"), str(tmp_path / "query.h5ad"), "--out", str(out), *flags]) == 0
        mapped = ad.read_h5ad(out / "query_embedded.h5ad")
        assert mapped.obsm["X_sclatent"].shape == (100, 5) and np.isfinite(mapped.obsm["X_sclatent"]).all()
        assert (out / "model" / "manifest.json").exists()
    assert main(["de", str(tmp_path / "model"), str(rna_file), "--groupby", "cell_type", "--group1", "Astro",
                 "--out", str(tmp_path / "de.csv")]) == 0
    table = pd.read_csv(tmp_path / "de.csv", index_col=0)
    assert {"proba_de", "lfc_mean", "bayes_factor", "is_de_fdr_0.05"} <= set(table.columns) and len(table) == 1677
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary file left


def test_user_errors_are_one_line_and_exit_code_2(rna_file, tmp_path, capsys):
    assert main(["embed", str(tmp_path / "nowhere"), str(rna_file), "--out", str(tmp_path / "z.h5ad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sclatent: error:") and "not a saved sclatent model" in err and err.count("\n") == 1
    assert main(["train", str(tmp_path / "missing.h5ad"), "--out", str(tmp_path / "m")]) == 2
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["train", str(rna_file), "--out", str(tmp_path / "m"), "--config", str(bad)]) == 2
    assert "not a readable JSON file" in capsys.readouterr().err
    assert main(["train", str(rna_file), "--out", str(tmp_path / "m"), "--batch-key", "library"]) == 2
    assert "--batch-key 'library' is not an obs column" in capsys.readouterr().err
    assert not (tmp_path / "z.h5ad").exists() and not (tmp_path / "m").exists()
    with pytest.raises(SystemExit) as usage:  # argparse: a missing argument is a usage error
        main(["de", "model", "in.h5ad"])
    assert usage.value.code == 2
