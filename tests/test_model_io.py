"""Saved models of format version 1 (written by sclatent before modality kinds) still load."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import mudata as md
import numpy as np
import pytest

import sclatent

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize(
    "model_dir, data_file, latent_file",
    [
        ("v1_rna_model", "v1_rna.h5ad", "v1_rna_latent.npy"),
        ("v1_multiome_model", "v1_multiome.h5mu", "v1_multiome_latent.npy"),
    ],
)
def test_format_1_model_loads_and_gives_the_latent_it_gave(model_dir, data_file, latent_file, tmp_path):
    """The format-1 folders in tests/data were saved by sclatent 0.1.0 before the redesign
    (RNA: ZINB, gene-batch dispersion, a second categorical and a continuous covariate)."""
    assert json.loads((DATA / model_dir / "manifest.json").read_text())["format_version"] == 1
    data = md.read_h5mu(DATA / data_file) if data_file.endswith(".h5mu") else ad.read_h5ad(DATA / data_file)
    model = sclatent.SCLatent.load(DATA / model_dir, data)
    assert model.is_trained and len(model.history) == 3
    np.testing.assert_allclose(model.get_latent_representation(), np.load(DATA / latent_file), rtol=1e-5, atol=1e-6)
    assert {m.kind for m in model.registry.modalities} <= {"rna", "atac"}
    # saved again, it is a format-2 model that loads the same
    model.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["format_version"] == 2
    again = sclatent.SCLatent.load(tmp_path / "again", data)
    np.testing.assert_array_equal(again.get_latent_representation(), model.get_latent_representation())
