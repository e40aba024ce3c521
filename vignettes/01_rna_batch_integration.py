# %% [markdown]
# # Batch integration of scRNA-seq with sclatent
#
# From raw counts to a batch-corrected latent space and a UMAP coloured by batch and cell
# type, on CellBench (Tian et al. 2019): a mixture of three lung-adenocarcinoma cell lines
# profiled with two technologies (CEL-seq2 and Drop-seq), a strong batch effect with known
# ground truth. The file comes from the project's shared data folder (`../shared/data`,
# or set `SCLATENT_SHARED_DATA`). Run it as a script
# (`python vignettes/01_rna_batch_integration.py`) or open it as a notebook with jupytext. `SCLATENT_VIGNETTE_EPOCHS` shortens training
# (the test suite uses it); figures go to `SCLATENT_VIGNETTE_OUT` (default `vignette_out/`).

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
import scanpy as sc
from sklearn.neighbors import KNeighborsClassifier
from sklearn.model_selection import cross_val_score

import sclatent

try:
    repo = Path(__file__).resolve().parents[1]
except NameError:  # running as a notebook from vignettes/
    repo = Path.cwd().parent
shared = Path(os.environ.get("SCLATENT_SHARED_DATA", repo.parent / "shared" / "data"))
out = Path(os.environ.get("SCLATENT_VIGNETTE_OUT", "vignette_out"))
out.mkdir(exist_ok=True)
epochs = int(os.environ["SCLATENT_VIGNETTE_EPOCHS"]) if "SCLATENT_VIGNETTE_EPOCHS" in os.environ else None

# %% [markdown]
# ## Load raw counts
# sclatent models raw counts: never normalize or log-transform before `setup_anndata`.

# %%
adata = sc.read_h5ad(shared / "cellbench_3cl_celseq2_dropseq.h5ad")
print(adata)
print(adata.obs["batch"].value_counts().sort_index())

# %% [markdown]
# ## Set up, train, and write the latent back
# `batch_key` names the batch column (here the technology); the batch is injected into every
# decoder layer, so the latent space does not need to encode it.

# %%
sclatent.SCLatent.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
model = sclatent.SCLatent(adata, n_latent=10)
model.train(max_epochs=epochs, enable_progress_bar=False)
print(model)
print(model.history[["train_loss", "validation_loss", "kl_weight"]].tail())
adata.obsm["X_sclatent"] = model.get_latent_representation()

# %% [markdown]
# ## Compare with PCA on log-normalized counts
# A good integration keeps cell types apart (high kNN cell-type accuracy) and mixes batches
# (low kNN batch accuracy).

# %%
pca = adata.copy()
sc.pp.normalize_total(pca, target_sum=1e4)
sc.pp.log1p(pca)
sc.pp.pca(pca, n_comps=10)
adata.obsm["X_pca"] = pca.obsm["X_pca"]


def knn_accuracy(rep: str, key: str) -> float:
    clf = KNeighborsClassifier(15)
    return float(cross_val_score(clf, adata.obsm[rep], adata.obs[key].astype(str), cv=5).mean())


scores = {rep: {key: knn_accuracy(rep, key) for key in ("cell_type", "batch")} for rep in ("X_pca", "X_sclatent")}
for rep, s in scores.items():
    print(f"{rep:11s} cell-type kNN accuracy {s['cell_type']:.3f}   batch kNN accuracy {s['batch']:.3f}")

# %% [markdown]
# ## Neighbors, Leiden, UMAP on the sclatent latent

# %%
sc.pp.neighbors(adata, use_rep="X_sclatent")
sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)
sc.tl.umap(adata, random_state=0)
fig = sc.pl.umap(adata, color=["batch", "cell_type", "leiden"], return_fig=True, show=False)
fig.savefig(out / "umap_sclatent.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# ## Batch-corrected expression and saving the model
# `transform_batch` decodes every cell as if it came from one technology.

# %%
expr = model.get_normalized_expression(transform_batch=adata.obs["batch"].cat.categories[0], gene_list=list(adata.var_names[:5]))
print(expr.head())
model.save(out / "model", overwrite=True)
reloaded = sclatent.SCLatent.load(out / "model", adata)
assert np.allclose(reloaded.get_latent_representation(), adata.obsm["X_sclatent"], atol=1e-5)
