"""Why zero-paired cell-type transfer stops near 0.54 on MOp: three probes of the ATAC side.

The split of ``benchmarks/multimodal.py --protocol links`` with zero paired training cells
(20 % test cells by ``numpy.random.default_rng(0).permutation``; the training cells' first
half RNA-only, second half ATAC-only; links from the mm10 TSS table, 150 kb window). Trains
``SCLatent(mdata)`` with the package defaults, then on the test cells:

* ``refined``: 15-NN transfer ATAC -> RNA and FOSCTTM with both experts' latents refined
  per cell (``refine_steps`` 0, 20, 100): does fitting each cell's posterior to the decoder
  align the modalities better than the encoder does?
* ``gene_activity``: each test cell's peaks summed onto their linked genes (binarized links
  within 150 kb, or gene body + promoter only, and the distance-weighted links), rounded, fed
  to the RNA expert as if they were expression; 15-NN transfer of those latents to the RNA
  latents, and their own leave-one-out 15-NN (a Seurat-style gene-activity bridge as a teacher
  for the ATAC side).
* ``atac_alone``: a model of the ATAC-only training cells alone (package defaults, one
  modality); leave-one-out 15-NN of the test cells' latents (how well ATAC alone separates
  the cell types), next to the linked model's ATAC expert.

Usage
-----
``python benchmarks/unpaired_probes.py`` (one thread; about 20 minutes on 2 cores)
"""

from __future__ import annotations

import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main() -> dict:
    import mudata as md
    import numpy as np
    import scipy.sparse as sp
    import torch

    import sclatent
    from multimodal import DATA, TSS, _views, links_split, links_training_mudata, load
    from sclatent.tools import foscttm, knn_transfer_accuracy
    from unpaired_by_cell_type import _knn_predict

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    quiet = dict(accelerator="cpu", devices=1, enable_progress_bar=False)
    rna, atac = load(DATA, None)
    test, paired, rna_only, atac_only = links_split(rna.n_obs, 0.2, 0.0, 0)
    mtrain = links_training_mudata(rna, atac, paired, rna_only, atac_only, TSS)
    model = sclatent.SCLatent(mtrain, seed=0)
    model.train(**quiet)
    r_te, a_te, paired_te, _, _ = _views(rna, atac, test)
    labels = r_te.obs["cell_type"].astype(str).to_numpy()

    def loo15(z):
        return float((_knn_predict(z, labels, z, leave_out_self=True) == labels).mean())

    out = {"refined": {}, "gene_activity": {}}
    for steps in (0, 20, 100):
        z_rna = model.get_latent_representation(paired_te, modality="rna", refine_steps=steps)
        z_atac = model.get_latent_representation(paired_te, modality="atac", refine_steps=steps)
        out["refined"][steps] = {"knn15_atac_to_rna": knn_transfer_accuracy(z_rna, labels, z_atac, labels, k=15),
                                 "foscttm": foscttm(z_rna, z_atac), "atac_to_atac15_loo": loo15(z_atac)}
        if steps == 0:
            reference = z_rna
        print(json.dumps({"refine_steps": steps, **out["refined"][steps]}), flush=True)
    counts = sp.csr_matrix(a_te.X).astype(np.float32)
    for name, window, binarize in (("binary_150kb", 150_000, True), ("binary_promoter_body", 0, True), ("weighted_150kb", 150_000, False)):
        links = sclatent.data.link_peaks_to_genes(md.MuData({"rna": r_te.copy(), "atac": a_te.copy()}), annotation=TSS, window=window)
        if binarize:
            links = (links > 0).astype(np.float32)
        activity = (counts @ links.T.tocsr()).tocsr()
        activity.data = np.round(activity.data)
        activity.eliminate_zeros()
        as_rna = r_te.copy()
        as_rna.X = activity.astype(np.float32)
        view = md.MuData({"rna": as_rna, "atac": a_te[:0].copy()})
        view.obs = r_te.obs.loc[view.obs_names].copy()
        z = model.get_latent_representation(view, modality="rna")
        out["gene_activity"][name] = {"knn15_to_rna": knn_transfer_accuracy(reference, labels, z, labels, k=15), "own_loo15": loo15(z)}
        print(json.dumps({"gene_activity": name, **out["gene_activity"][name]}), flush=True)
    alone = atac[atac_only].copy()
    alone.obs["batch"] = alone.obs["batch"].astype(str)
    sclatent.SCLatent.setup_anndata(alone, batch_key="batch")
    atac_model = sclatent.SCLatent(alone, seed=0)
    atac_model.train(**quiet)
    te = a_te.copy()
    te.obs["batch"] = te.obs["batch"].astype(str)
    out["atac_alone"] = {"own_loo15": loo15(atac_model.get_latent_representation(te))}
    print(json.dumps({"atac_alone": out["atac_alone"]}), flush=True)
    return out


if __name__ == "__main__":
    main()
