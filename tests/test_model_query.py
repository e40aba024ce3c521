"""Query mapping: a trained reference applied to new batches (load_query_data, map_by_refinement)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import sclatent

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False)


@pytest.fixture(scope="module")
def split(cellbench):
    """Reference: the CEL-seq2 cells; query: the Drop-seq cells (a batch the reference never saw)."""
    batch = cellbench.obs["batch"].astype(str)
    first = batch.unique()[0]
    ref, query = cellbench[batch == first].copy(), cellbench[batch != first].copy()
    sclatent.SCLatent.setup_anndata(ref, batch_key="batch")
    reference = sclatent.SCLatent(ref, n_latent=6, seed=0).train(max_epochs=15, **QUIET)
    return reference, ref, query


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_query_trains_only_the_new_batch_rows_and_saves_like_any_model(split, tmp_path):
    reference, ref, query = split
    query = query.copy()
    model = sclatent.SCLatent.load_query_data(query, reference)
    assert model.registry.categories["batch"] == reference.registry.categories["batch"] + tuple(query.obs["batch"].astype(str).unique())
    trainable = [k for k, p in model.module.named_parameters() if p.requires_grad]
    assert trainable and all(k.endswith("embeddings.0.weight") for k in trainable)
    before = _state(model.module)
    model.train(max_epochs=5, **QUIET)
    after = _state(model.module)
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == sorted(trainable)  # nothing but the new rows moved
    ref_state = reference.module.state_dict()
    for key, table in after.items():
        if key.endswith("embeddings.0.frozen"):  # the reference's batch rows, kept as they were
            torch.testing.assert_close(table, ref_state[key.replace(".frozen", ".weight")], rtol=0, atol=0)
    z = model.get_latent_representation()
    assert z.shape == (query.n_obs, 6) and np.isfinite(z).all()
    model.save(tmp_path / "query")
    loaded = sclatent.SCLatent.load(tmp_path / "query", query)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)
    again = sclatent.SCLatent.load_query_data(query.copy(), tmp_path / "query")  # a saved model as the reference
    assert len(again.registry.categories["batch"]) == len(model.registry.categories["batch"])


def test_mapping_by_refinement_fits_the_new_rows_without_a_training_loop(split):
    reference, _, query = split
    model = sclatent.SCLatent.load_query_data(query.copy(), reference)
    before = _state(model.module)
    report = model.map_by_refinement(steps=30)
    assert (report["elbo_end"] > report["elbo_start"]).all()
    after = _state(model.module)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed and all(k.endswith("embeddings.0.weight") for k in changed)
    z = model.get_latent_representation(refine_steps=10)
    assert np.isfinite(z).all()
    with pytest.raises(ValueError, match="no new batch|not made by load_query_data"):
        reference.map_by_refinement()


def test_fine_tune_also_trains_the_named_parts(split):
    reference, _, query = split
    model = sclatent.SCLatent.load_query_data(query.copy(), reference, fine_tune=("encoders",))
    before = _state(model.module)
    model.train(max_epochs=3, **QUIET)
    after = _state(model.module)
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("encoders."))
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("decoders.") and "embeddings" not in k)
    with pytest.raises(ValueError, match="fine_tune takes 'encoders' and/or 'decoders'"):
        sclatent.SCLatent.load_query_data(query.copy(), reference, fine_tune=("everything",))


def test_missing_genes_are_zero_filled_up_to_a_threshold(split):
    reference, _, query = split
    few = query[:, query.var_names[: int(0.9 * query.n_vars)]].copy()  # 10 % of the genes missing
    with pytest.warns(UserWarning, match=r"lacks 200 of the model's 2000 features.*read as zero counts"):
        model = sclatent.SCLatent.load_query_data(few, reference)
    assert model._tensors.counts["rna"].shape == (few.n_obs, 2000)
    dense, _ = model._tensors.counts["rna"].rows(torch.arange(few.n_obs))
    missing = ~np.isin(np.asarray(reference.registry.modality("rna").var_names), few.var_names)
    assert float(dense[:, torch.as_tensor(missing)].abs().sum()) == 0.0
    shuffled = few[:, few.var_names[::-1]].copy()  # any column order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z1 = model.get_latent_representation()
        z2 = model.get_latent_representation(shuffled)
    np.testing.assert_allclose(z1, z2, rtol=1e-5, atol=1e-6)
    too_few = query[:, query.var_names[: int(0.7 * query.n_vars)]].copy()
    with pytest.raises(ValueError, match=r"lacks 600 of the model's 2000 features.*at most 20% may be missing"):
        sclatent.SCLatent.load_query_data(too_few, reference)


def test_bad_query_obs_is_a_clear_error(split):
    reference, _, query = split
    nan = query.copy()
    nan.obs["batch"] = nan.obs["batch"].astype(object)
    nan.obs.iloc[:3, nan.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(ValueError, match=r"obs\['batch'\] has 3 missing value\(s\) \(NaN\)"):
        sclatent.SCLatent.load_query_data(nan, reference)
    none = query.copy()
    del none.obs["batch"]
    with pytest.raises(ValueError, match=r"lacks the column 'batch'.*query_batch"):
        sclatent.SCLatent.load_query_data(none, reference)
    with pytest.raises(TypeError, match="trained SCLatent or the directory"):
        sclatent.SCLatent.load_query_data(query.copy(), 42)


def test_an_atac_only_query_onto_a_paired_reference():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import mudata as md

        md.set_options(pull_on_update=False)
        mdata = sclatent.datasets.mop_snareseq2()
    libraries = mdata.obs["batch"].astype(str)
    ref_cells = libraries.isin(sorted(libraries.unique())[:4]).to_numpy()
    reference_data = mdata[ref_cells].copy()
    reference_data.obs["batch"] = reference_data.obs["batch"].astype(str)  # its own 4 libraries only
    sclatent.SCLatent.setup_mudata(reference_data, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    reference = sclatent.SCLatent(reference_data, seed=0).train(max_epochs=3, **QUIET)
    atac = mdata.mod["atac"][~ref_cells].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query = sclatent.data.organize_multiome(atac=atac)
    query.obs["batch"] = atac.obs["batch"].astype(str).values
    model = sclatent.SCLatent.load_query_data(query, reference)
    assert model.observed_modalities()["atac"].all() and not model.observed_modalities()["rna"].any()
    model.map_by_refinement(steps=5)
    z = model.get_latent_representation(key_added="X_sclatent")
    assert z.shape == (atac.n_obs, reference.module.n_latent) and "X_sclatent" in query.obsm
    expr = model.get_normalized_expression(gene_list=list(mdata.mod["rna"].var_names[:5]))
    assert expr.shape == (atac.n_obs, 5) and np.isfinite(expr.to_numpy()).all()
