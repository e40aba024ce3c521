"""Mixed precision against full precision: package-default training of one RNA dataset, twice.

Trains ``SCLatent(train)`` with ``train()`` defaults (only ``precision`` differs:
``"32-true"``, then ``"bf16-mixed"``) on 90 % of the cells
(``numpy.random.default_rng(0).permutation``) and reports, for each, the epochs, the
training wall time and seconds per epoch, the ELBO per held-out cell (16 samples, KL
weight 1) and the 15-NN accuracy of the held-out latents' labels from the training
latents. bfloat16 products are fast only on hardware with bfloat16 units (e.g. Intel AMX).

Usage
-----
``python benchmarks/mixed_precision.py ../shared/data/pbmc4k_scdcc_top2000.h5ad cell_type --threads 1``
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="an .h5ad file of raw counts")
    p.add_argument("label", help="obs column of cell labels for the 15-NN score")
    p.add_argument("--batch-key", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    args = p.parse_args()
    import anndata as ad
    import torch
    from sklearn.neighbors import KNeighborsClassifier

    import sclatent

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(args.data)
    sclatent.SCLatent.setup_anndata(adata, batch_key=args.batch_key)
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    k = int(0.9 * adata.n_obs)
    train, test = adata[np.sort(perm[:k])].copy(), adata[np.sort(perm[k:])].copy()
    for precision in args.precisions:
        model = sclatent.SCLatent(train, seed=0)
        t = time.perf_counter()
        model.train(enable_progress_bar=False, precision=precision)
        wall = time.perf_counter() - t
        knn = KNeighborsClassifier(15).fit(model.get_latent_representation(train), train.obs[args.label])
        print(json.dumps({
            "precision": precision, "epochs": len(model.history), "train_s": round(wall, 1),
            "s_per_epoch": round(wall / len(model.history), 3),
            "heldout_elbo": round(float(model.get_elbo(test, n_samples=16)), 2),
            "knn15": round(knn.score(model.get_latent_representation(test), test.obs[args.label]), 3),
        }), flush=True)


if __name__ == "__main__":
    main()
