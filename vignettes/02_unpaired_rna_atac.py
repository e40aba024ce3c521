# %% [markdown]
# # Integrating scRNA-seq and scATAC-seq measured in different cells
#
# Most labs have an scRNA-seq experiment and an scATAC-seq experiment on different cells of
# the same tissue, with no multiome cell linking them. sclatent aligns them through prior
# knowledge: each peak is linked to the genes whose promoter or body it lies near, the
# decoders of both modalities share feature embeddings tied by those links, and an
# adversary makes RNA-only and ATAC-only cells indistinguishable in the latent space.
#
# The shipped data (`sclatent.datasets.mop_snareseq2()`, 3,000 nuclei of mouse motor
# cortex, SNARE-seq2) are in fact paired, which lets us check the result: we split the
# nuclei into an "RNA experiment" and an "ATAC experiment" that share no cell, integrate
# them, and compare with the truth the pairing gives. Everything needed (counts and mm10
# gene positions) ships with the package: no download.
#
# Run it as a script (`python vignettes/02_unpaired_rna_atac.py`) or open it as a notebook
# with jupytext. `SCLATENT_VIGNETTE_EPOCHS` shortens training (the test suite uses it);
# figures go to `SCLATENT_VIGNETTE_OUT` (default `vignette_out/`).

# %%
import os
from pathlib import Path

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import numpy as np
import scanpy as sc

import sclatent
from sclatent.tools import foscttm, knn_transfer_accuracy

out = Path(os.environ.get("SCLATENT_VIGNETTE_OUT", "vignette_out"))
out.mkdir(exist_ok=True)
epochs = int(os.environ["SCLATENT_VIGNETTE_EPOCHS"]) if "SCLATENT_VIGNETTE_EPOCHS" in os.environ else None

# %% [markdown]
# ## Two experiments that share no cell
# Half of the nuclei keep only their RNA, the other half only their ATAC.
# `organize_multiome` puts them into one MuData: a cell belongs to a modality exactly when it
# was measured in it.

# %%
paired = sclatent.datasets.mop_snareseq2()
order = np.random.default_rng(0).permutation(paired.n_obs)
rna_cells, atac_cells = order[: paired.n_obs // 2], order[paired.n_obs // 2 :]
rna_experiment = paired.mod["rna"][rna_cells].copy()
atac_experiment = paired.mod["atac"][atac_cells].copy()
mdata = sclatent.data.organize_multiome(rna=rna_experiment, atac=atac_experiment)
mdata.obs["batch"] = paired.obs.loc[mdata.obs_names, "batch"].astype(str).to_numpy()
mdata.obs["cell_type"] = paired.obs.loc[mdata.obs_names, "cell_type"].astype(str).to_numpy()
print(mdata)
print(mdata.obs["modalities"].value_counts())

# %% [markdown]
# ## Link peaks to genes
# Gene positions for the shipped genes are in `sclatent.datasets.mop_gene_tss()` (mm10, the
# peaks' assembly). A peak is linked to a gene it overlaps (body plus 2 kb promoter) with
# weight 1, and to genes within 150 kb with a weight decaying with distance. The links go
# to `mdata.varp["peak_gene_links"]`.

# %%
links = sclatent.data.link_peaks_to_genes(mdata, annotation=sclatent.datasets.mop_gene_tss())
print(f"{links.nnz} gene-peak links; {np.mean(links.getnnz(axis=0) > 0):.0%} of the peaks are linked to a gene")

# %% [markdown]
# ## Set up with the links, train with the defaults

# %%
sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"}, batch_key="batch", feature_links=True)
model = sclatent.SCLatent(mdata)
model.train(max_epochs=epochs, enable_progress_bar=False)
print(model)
mdata.obsm["X_sclatent"] = model.get_latent_representation()

# %% [markdown]
# ## Label transfer from the RNA experiment to the ATAC experiment
# Each ATAC-only cell takes the majority cell type of its 15 nearest RNA-only cells in the
# shared latent space; the pairing tells us whether that is right. Guessing the most common
# type for every cell is the baseline to beat.

# %%
is_rna = mdata.obs["modalities"].astype(str).to_numpy() == "rna"
labels = mdata.obs["cell_type"].to_numpy()
z = mdata.obsm["X_sclatent"]
transfer = knn_transfer_accuracy(z[is_rna], labels[is_rna], z[~is_rna], labels[~is_rna])
majority = float(mdata.obs.loc[~is_rna, "cell_type"].value_counts(normalize=True).iloc[0])
print(f"label transfer RNA -> ATAC: {transfer:.3f} (majority class: {majority:.3f})")

# %% [markdown]
# ## How close is each ATAC cell to its own hidden RNA?
# The pairing we removed is the ground truth: encode the ATAC-only cells' hidden RNA with
# the RNA expert and their ATAC with the ATAC expert, and count, for each cell, the
# fraction of cells closer than its true match (FOSCTTM: 0 is perfect, 0.5 is random).

# %%
atac_names = mdata.obs_names[~is_rna]
hidden = paired[atac_names].copy()
z_hidden_rna = model.get_latent_representation(hidden, modality="rna")
z_own_atac = model.get_latent_representation(hidden, modality="atac")
fosc = foscttm(z_hidden_rna, z_own_atac)
print(f"FOSCTTM between the ATAC-only cells and their hidden RNA: {fosc:.3f}")

# %% [markdown]
# ## Expression imputed for the ATAC-only cells
# `get_normalized_expression` decodes expression for every cell, also those measured only in
# ATAC. Against the hidden truth (their RNA, which the split removed), per cell type:

# %%
imputed = model.get_normalized_expression(modality="rna")
truth = paired.mod["rna"][atac_names].X
truth = np.asarray(truth.todense() if hasattr(truth, "todense") else truth)
truth = truth / truth.sum(1, keepdims=True)
types = labels[~is_rna]
pseudobulk_corr = {
    t: float(np.corrcoef(imputed.loc[atac_names[types == t]].mean(0), truth[types == t].mean(0))[0, 1])
    for t in np.unique(types)
    if (types == t).sum() >= 20
}
print("imputed vs held-out expression, pseudobulk correlation per cell type:")
print({t: round(c, 3) for t, c in pseudobulk_corr.items()})

# %% [markdown]
# ## UMAP coloured by modality and by cell type
# A good integration mixes the two experiments within each cell type. Scanpy works on an
# AnnData: one with the cells' annotations and the joint latent is all it needs.

# %%
obs = mdata.obs[["modalities", "cell_type", "batch"]].astype(str).astype("category")
joint = ad.AnnData(obs=obs, obsm={"X_sclatent": z})
sc.pp.neighbors(joint, use_rep="X_sclatent")
sc.tl.umap(joint, random_state=0)
fig = sc.pl.umap(joint, color=["modalities", "cell_type"], return_fig=True, show=False, wspace=0.4)
fig.savefig(out / "umap_unpaired.png", dpi=100, bbox_inches="tight")
