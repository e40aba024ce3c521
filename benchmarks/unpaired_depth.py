"""Zero-paired cell-type transfer against the ATAC depth of the test cells (MOp).

The split of ``benchmarks/multimodal.py --protocol links`` with zero paired training cells
(20 % test cells by ``numpy.random.default_rng(0).permutation``; the training cells' first
half RNA-only, second half ATAC-only; links from the mm10 TSS table, 150 kb window). Trains
``SCLatent(mdata)`` with the package defaults (``--seed`` the model's seed), then on the
test cells' RNA-expert and ATAC-expert latents:

* 15-NN transfer ATAC -> RNA (Euclidean, as in ``multimodal.py``) within thirds of the test
  cells ordered by their ATAC counts: how much of the transfer error is shallow cells;
* the correlation between a cell's log ATAC counts and its ATAC posterior's log precision
  averaged over the latent dimensions (``get_latent_representation(..., return_dist=True)``);
* FOSCTTM and 15-NN / 1-NN transfer with the latents scaled to unit length (cosine
  neighbours): a posterior mean of a shallow cell is pulled towards the prior's mean, which
  moves it in Euclidean distance but not in direction. This is a diagnostic, not the
  benchmark's metric.

Usage
-----
``python benchmarks/unpaired_depth.py --seed 0`` (one thread; about 7 minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main() -> dict:
    import numpy as np
    import torch

    import sclatent
    from multimodal import DATA, TSS, _views, links_split, links_training_mudata, load
    from sclatent.tools import foscttm, knn_transfer_accuracy
    from unpaired_by_cell_type import _knn_predict

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rna, atac = load(DATA, None)
    test, paired, rna_only, atac_only = links_split(rna.n_obs, 0.2, 0.0, 0)
    mtrain = links_training_mudata(rna, atac, paired, rna_only, atac_only, TSS)
    model = sclatent.SCLatent(mtrain, seed=args.seed)
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False, seed=args.seed)
    _, _, paired_te, _, _ = _views(rna, atac, test)
    labels = rna[test].obs["cell_type"].astype(str).to_numpy()
    z_rna = model.get_latent_representation(paired_te, modality="rna")
    z_atac, atac_variance = model.get_latent_representation(paired_te, modality="atac", return_dist=True)  # the means are the latents
    depth = np.asarray(paired_te["atac"].X.sum(1)).ravel()

    def scores(a, b) -> dict:
        return {
            "foscttm": foscttm(a, b),
            "knn15": knn_transfer_accuracy(a, labels, b, labels, k=15),
            "knn1": knn_transfer_accuracy(a, labels, b, labels, k=1),
        }

    out = {"seed": args.seed, "euclidean": scores(z_rna, z_atac)}
    unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    out["unit_length"] = scores(unit(z_rna), unit(z_atac))
    predicted = _knn_predict(z_rna, labels, z_atac)
    edges = np.quantile(depth, [0, 1 / 3, 2 / 3, 1])
    thirds = np.clip(np.searchsorted(edges, depth, side="right") - 1, 0, 2)
    out["by_depth"] = [
        {
            "third": name,
            "cells": int((thirds == t).sum()),
            "median_atac_counts": float(np.median(depth[thirds == t])),
            "knn15": float((predicted[thirds == t] == labels[thirds == t]).mean()),
        }
        for t, name in enumerate(("shallow", "middle", "deep"))
    ]
    log_precision = np.log(1.0 / atac_variance).mean(1)
    out["corr_log_counts_log_precision"] = float(np.corrcoef(np.log1p(depth), log_precision)[0, 1])
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
