"""Where zero-paired cell-type transfer is lost: per cell type, and how good cross-modal neighbours are.

The split of ``benchmarks/multimodal.py --protocol links`` with zero paired training cells
(20 % test cells by ``numpy.random.default_rng(0).permutation``; the training cells' first
half RNA-only, second half ATAC-only; links from the mm10 TSS table, 150 kb window). Trains
``SCLatent(mdata)`` with the package defaults (plus the ``train`` keywords of the JSON
argument), then reports:

* per cell type of the test cells, 15-NN label transfer ATAC -> RNA (ATAC-expert latents
  classified by the RNA-expert latents), ATAC -> ATAC and RNA -> RNA (each modality's
  latents classified by the others of the same modality, leaving the cell itself out);
* for the training cells, how often mutual k-nearest neighbours between the RNA-only and
  the ATAC-only latents (k = 1 ... 20) share a cell type, and how many ATAC-only cells have one.

Usage
-----
``python benchmarks/unpaired_by_cell_type.py '{}'`` (package defaults)
``python benchmarks/unpaired_by_cell_type.py '{"sleep_weight": 1}'``
"""

from __future__ import annotations

import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def _knn_predict(reference, labels, query, k: int = 15, leave_out_self: bool = False):
    import numpy as np
    import pandas as pd
    from scipy.spatial.distance import cdist

    distance = cdist(query, reference)
    if leave_out_self:
        np.fill_diagonal(distance, np.inf)
    nearest = np.argsort(distance, 1)[:, :k]
    return np.array([pd.Series(labels[row]).value_counts().index[0] for row in nearest])


def main(argv=None) -> dict:
    import numpy as np
    import pandas as pd
    import torch
    from scipy.spatial.distance import cdist

    import sclatent
    from multimodal import DATA, TSS, _views, links_split, links_training_mudata, load

    argv = sys.argv[1:] if argv is None else argv
    options = json.loads(argv[0]) if argv else {}
    warnings.simplefilter("ignore")
    torch.set_num_threads(options.pop("threads", 1))
    rna, atac = load(DATA, None)
    test, paired, rna_only, atac_only = links_split(rna.n_obs, 0.2, 0.0, 0)
    mtrain = links_training_mudata(rna, atac, paired, rna_only, atac_only, TSS)
    model = sclatent.SCLatent(mtrain, seed=0)
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False, **options)

    # per cell type of the test cells
    _, _, paired_test, _, _ = _views(rna, atac, test)
    labels = rna[test].obs["cell_type"].astype(str).to_numpy()
    z_rna = model.get_latent_representation(paired_test, modality="rna")
    z_atac = model.get_latent_representation(paired_test, modality="atac")
    table = pd.DataFrame({"cells": pd.Series(labels).value_counts()})
    overall = {}
    for name, (reference, query, own) in {
        "atac_to_rna": (z_rna, z_atac, False), "atac_to_atac": (z_atac, z_atac, True), "rna_to_rna": (z_rna, z_rna, True),
    }.items():
        right = _knn_predict(reference, labels, query, leave_out_self=own) == labels
        table[name] = pd.Series(right).groupby(labels).mean()
        overall[name] = float(right.mean())

    # mutual nearest neighbours between the RNA-only and ATAC-only training cells
    cell_type = pd.concat([rna.obs["cell_type"], atac.obs["cell_type"]]).astype(str)
    cell_type = cell_type[~cell_type.index.duplicated()]
    is_rna = mtrain.obs_names.isin(rna.obs_names[rna_only])
    is_atac = mtrain.obs_names.isin(atac.obs_names[atac_only])
    zr = model.get_latent_representation(mtrain[is_rna].copy(), modality="rna")
    za = model.get_latent_representation(mtrain[is_atac].copy(), modality="atac")
    lr, la = cell_type.reindex(mtrain.obs_names[is_rna]).to_numpy(), cell_type.reindex(mtrain.obs_names[is_atac]).to_numpy()
    distance = cdist(za, zr)
    mnn = {}
    for k in (1, 3, 5, 10, 20):
        near_r = np.argsort(distance, 1)[:, :k]  # each ATAC cell's k nearest RNA cells
        near_a = np.argsort(distance.T, 1)[:, :k]  # each RNA cell's k nearest ATAC cells
        forward = np.zeros(distance.shape, bool)
        forward[np.arange(len(za))[:, None], near_r] = True
        backward = np.zeros(distance.shape, bool)
        backward[near_a, np.arange(len(zr))[:, None]] = True
        ia, ir = np.nonzero(forward & backward)
        mnn[k] = {"pairs": int(len(ia)), "atac_cells_with_one": float(len(np.unique(ia)) / len(za)),
                  "same_type": float((la[ia] == lr[ir]).mean()) if len(ia) else float("nan")}
    print(table.round(2).to_string())
    print(json.dumps({"overall": overall, "mutual_neighbours": mnn}, indent=1))
    return {"table": table, "overall": overall, "mutual_neighbours": mnn}


if __name__ == "__main__":
    main()
