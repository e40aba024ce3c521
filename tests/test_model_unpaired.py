"""Unpaired RNA + ATAC integration through feature links (no paired training cell).

A synthetic dataset plants the structure the links carry: every cell type has marker
genes, and each gene's peaks are open exactly in the types where the gene is expressed.
RNA-only and ATAC-only training cells share no cell, so without links nothing tells the
model which ATAC cluster is which RNA cluster; with them the shared feature embeddings do.
"""

from __future__ import annotations

import anndata as ad
import mudata as md
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import sclatent
from sclatent.module import LossOutput
from sclatent.nn import CountDecoder
from sclatent.nn.linked import EmbeddingDecoder
from sclatent.tools import foscttm, knn_transfer_accuracy

N_TYPES, N_GENES, PEAKS_PER_GENE, N_NOISE_PEAKS = 6, 60, 2, 60


def _planted(seed: int = 0, per_type: int = 60):
    """RNA-only, ATAC-only (training) and paired (test) cells, and the genes x peaks links."""
    rng = np.random.default_rng(seed)
    gene_logit = np.zeros((N_TYPES, N_GENES))
    markers = rng.permutation(N_GENES) % N_TYPES  # each gene marks one type
    gene_logit[markers, np.arange(N_GENES)] = 3.0
    peak_gene = np.repeat(np.arange(N_GENES), PEAKS_PER_GENE)
    n_peaks = len(peak_gene) + N_NOISE_PEAKS
    peak_logit = np.zeros((N_TYPES, n_peaks))
    peak_logit[:, : len(peak_gene)] = gene_logit[:, peak_gene]
    links = sp.csr_matrix((np.ones(len(peak_gene)), (peak_gene, np.arange(len(peak_gene)))), shape=(N_GENES, n_peaks))

    def cells(types, prefix):
        p_rna = np.exp(gene_logit[types]) / np.exp(gene_logit[types]).sum(1, keepdims=True)
        p_atac = np.exp(peak_logit[types]) / np.exp(peak_logit[types]).sum(1, keepdims=True)
        rna = rng.poisson(p_rna * rng.uniform(150, 300, (len(types), 1))).astype(np.float32)
        atac = rng.poisson(p_atac * rng.uniform(60, 120, (len(types), 1))).astype(np.float32)
        obs = pd.DataFrame({"cell_type": [f"type{t}" for t in types]}, index=[f"{prefix}{i}" for i in range(len(types))])
        genes = pd.DataFrame(index=[f"gene{g}" for g in range(N_GENES)])
        peaks = pd.DataFrame(index=[f"peak{p}" for p in range(n_peaks)])
        return ad.AnnData(sp.csr_matrix(rna), obs=obs, var=genes), ad.AnnData(sp.csr_matrix(atac), obs=obs.copy(), var=peaks)

    types = np.repeat(np.arange(N_TYPES), per_type)
    rna_only, _ = cells(rng.permutation(types), "r")
    _, atac_only = cells(rng.permutation(types), "a")
    test_rna, test_atac = cells(np.repeat(np.arange(N_TYPES), 20), "t")
    train = sclatent.data.organize_multiome(rna=rna_only, atac=atac_only)
    test = md.MuData({"rna": test_rna, "atac": test_atac})
    return train, test, links


def _fit(train, test, links):
    kwargs = {} if links is None else {"feature_links": links}
    sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"}, **kwargs)
    model = sclatent.SCLatent(train, n_latent=8, n_hidden=64)
    model.train(max_epochs=60, enable_progress_bar=False, accelerator="cpu")
    z_rna = model.get_latent_representation(test, modality="rna")
    z_atac = model.get_latent_representation(test, modality="atac")
    labels = test.mod["rna"].obs["cell_type"].to_numpy()
    return model, foscttm(z_rna, z_atac), knn_transfer_accuracy(z_rna, labels, z_atac, labels)


@pytest.fixture(scope="module")
def planted():
    return _planted()


def test_links_are_what_aligns_unpaired_cells(planted):
    train, test, links = planted
    _, f_without, _ = _fit(train.copy(), test, None)
    model, f_with, transfer = _fit(train.copy(), test, links)
    assert f_without > 0.4, f"without links the modalities should not align (FOSCTTM {f_without:.3f})"
    assert f_with < 0.2, f"with links the modalities should align (FOSCTTM {f_with:.3f})"
    assert transfer > 0.8
    print(f"planted: FOSCTTM without links {f_without:.3f}, with {f_with:.3f}; transfer {transfer:.3f}")
    assert {"train_links", "train_align"} <= set(model.history.columns)
    # the adversary's model keeps its last epoch (the validation ELBO does not see the alignment)
    assert model.history["kept"].tolist() == [False] * (len(model.history) - 1) + [True]


def test_links_model_round_trips_without_the_links_in_the_new_data(planted, tmp_path):
    train, test, links = planted
    train = train.copy()
    sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"}, feature_links=links)
    model = sclatent.SCLatent(train, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, enable_progress_bar=False, accelerator="cpu")
    model.save(tmp_path / "m")
    loaded = sclatent.SCLatent.load(tmp_path / "m", test)  # the test MuData has no links: they travel with the model
    np.testing.assert_allclose(
        loaded.get_latent_representation(test, modality="atac"), model.get_latent_representation(test, modality="atac"), rtol=1e-5
    )
    assert isinstance(loaded.module.decoders["atac"], EmbeddingDecoder)


def test_without_links_the_model_is_the_plain_product_of_experts(planted):
    train, _, _ = planted
    train = train.copy()
    sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"})
    model = sclatent.SCLatent(train, n_latent=4, n_hidden=16)
    assert model.registry.feature_links is None
    assert all(isinstance(d, CountDecoder) for d in model.module.decoders.values())
    assert model.module.discriminator is None and model.module.feature_embeddings is None
    out: LossOutput = model.module.loss(model._tensors.batch(torch.arange(20)))
    assert set(out.terms) == {"fused", "single_rna", "single_atac"}


def test_feature_links_by_key_read_the_varp_written_by_link_peaks_to_genes(planted):
    train, _, links = planted
    train = train.copy()
    with pytest.raises(ValueError, match="link_peaks_to_genes"):
        sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"}, feature_links=True)
    assert "feature_links" not in train.varp and "_sclatent" not in train.uns
    sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"}, feature_links=links)
    stored = train.varp["feature_links"]
    assert stored.nnz == 2 * links.nnz  # both orientations, like link_peaks_to_genes
    other = train.copy()
    del other.uns["_sclatent"]
    with pytest.raises(ValueError, match="exists already"):
        sclatent.SCLatent.setup_mudata(other, {"rna": "rna", "atac": "atac"}, feature_links=links)
    sclatent.SCLatent.setup_mudata(other, {"rna": "rna", "atac": "atac"}, feature_links="feature_links")
    a = sclatent.SCLatent(train, n_latent=4).module.feature_embeddings
    b = sclatent.SCLatent(other, n_latent=4).module.feature_embeddings
    assert a.n_links == b.n_links == links.nnz


@pytest.mark.parametrize(
    "bad, message",
    [
        (sp.csr_matrix((3, 4)), "must be genes x peaks"),
        (sp.csr_matrix((N_GENES, N_GENES * PEAKS_PER_GENE + N_NOISE_PEAKS)), "links no gene"),
    ],
)
def test_bad_feature_links_are_refused_without_touching_the_data(planted, bad, message):
    train, _, _ = planted
    train = train.copy()
    with pytest.raises(ValueError, match=message):
        sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"}, feature_links=bad)
    assert "feature_links" not in train.varp and "_sclatent" not in train.uns


def test_feature_links_need_one_rna_and_one_atac_modality(planted):
    train, _, links = planted
    train = train.copy()
    with pytest.raises(ValueError, match="one modality of kind 'rna' and one of kind 'atac'"):
        sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "counts"}, feature_links=links)


def test_linked_models_read_atac_through_the_embeddings_and_older_saved_models_load_as_they_were(planted, tmp_path):
    import json

    from sclatent.nn import StatisticEncoder

    train, test, links = planted
    train = train.copy()
    sclatent.SCLatent.setup_mudata(train, {"rna": "rna", "atac": "atac"}, feature_links=links)
    model = sclatent.SCLatent(train, n_latent=4, n_hidden=16)
    assert model.module.statistic_modalities == ("atac",)  # Poisson ATAC: the statistic; NB RNA: features
    assert isinstance(model.module.encoders["atac"], StatisticEncoder)
    old = sclatent.SCLatent(train, n_latent=4, n_hidden=16, linked_encoder="features")
    old.train(max_epochs=1, enable_progress_bar=False, accelerator="cpu")
    old.save(tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["init_args"]["linked_encoder"]  # as written before the option existed
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    loaded = sclatent.SCLatent.load(tmp_path / "old", test)
    assert loaded.module.statistic_modalities == ()
    np.testing.assert_allclose(
        loaded.get_latent_representation(test, modality="atac"), old.get_latent_representation(test, modality="atac"), rtol=1e-5
    )
    with pytest.raises(ValueError, match="linked_encoder must be one of"):
        sclatent.SCLatent(train, linked_encoder="peaks")


def test_auto_reads_atac_through_the_embeddings_only_when_few_cells_are_paired(planted, tmp_path):
    """``linked_encoder="auto"`` looks at the training data once: with few paired ATAC cells
    the statistic encoder, with many the feature encoder (what the benchmark measured best),
    and a saved model keeps the choice whatever data it is loaded with."""
    from sclatent.model._model import STATISTIC_MAX_PAIRED_SHARE, choose_linked_encoder

    train, test, links = planted
    paired = test.copy()  # 120 paired cells against 360 ATAC-only: a quarter of the ATAC cells
    few = sclatent.data.organize_multiome(paired=paired[:60].copy(), rna=train.mod["rna"].copy(), atac=train.mod["atac"].copy())
    many = sclatent.data.organize_multiome(paired=paired.copy(), rna=train.mod["rna"][:40].copy(), atac=train.mod["atac"][:40].copy())
    chosen = {}
    for name, data in (("few", few), ("many", many)):
        sclatent.SCLatent.setup_mudata(data, {"rna": "rna", "atac": "atac"}, feature_links=links)
        model = sclatent.SCLatent(data, n_latent=4, n_hidden=16)
        chosen[name] = model
        observed = model._tensors.observed_host
        share = float((observed[:, 0] & observed[:, 1]).sum() / observed[:, 1].sum())
        assert (share < STATISTIC_MAX_PAIRED_SHARE) == (name == "few"), share
    assert chosen["few"].module.statistic_modalities == ("atac",)
    assert chosen["many"].module.statistic_modalities == ()
    assert chosen["many"].init_args["linked_encoder"] == "auto" and chosen["many"].init_args["linked_encoder_chosen"] == "features"
    chosen["many"].save(tmp_path / "many")
    loaded = sclatent.SCLatent.load(tmp_path / "many", few)  # other data: the saved choice stands
    assert loaded.module.statistic_modalities == ()
    observed = torch.tensor([[True, True], [False, True], [False, True], [True, False]])  # 1 of 3 ATAC cells paired
    module_links = sclatent.module.FeatureLinks("rna", "atac", torch.zeros(2, 0, dtype=torch.long), torch.zeros(0))
    assert choose_linked_encoder(observed, chosen["few"].registry, module_links) == "features"
    assert choose_linked_encoder(observed[1:], chosen["few"].registry, module_links) == "auto"
