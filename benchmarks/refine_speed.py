"""Cost of one refinement step, measured in the process of whichever sclatent is importable.

Trains a model on 90 % of PBMC (fixed 20 epochs: the same model size for any version of
the package), then times ``get_latent_representation(test, refine_steps=K)`` on the 427
held-out cells (one batch) for K = 20 and K = 120, ``--repeats`` times each, and reports
the per-step cost ``(T(120) - T(20)) / 100`` (fixed costs, such as encoding and the
monotone check, cancel), per 1,000 cells. Also the mean ELBO after 100 steps
(``get_elbo(refine_steps=100, n_samples=16)``) to show the result is the same, and the
floor a step cannot go below in float32: the decoder's output matrix products alone
(forward ``addmm`` and the backward product to the hidden layer at the batch's shapes,
``(n_cells, n_hidden) x (n_hidden, n_genes)``), timed in the same process.

Run it side by side for two versions (e.g. an older commit checked out in a worktree)::

    PYTHONPATH=/path/to/old/checkout .venv/bin/python benchmarks/refine_speed.py
    .venv/bin/python benchmarks/refine_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import numpy as np
import torch

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")


def gemm_floor_seconds(n_cells: int, decoder, repeats: int = 50) -> float:
    """Median time of the output layer's forward and backward products at ``n_cells``."""
    weight = decoder.logits.weight.detach()  # (n_genes, n_hidden)
    hidden, grad = torch.randn(n_cells, weight.shape[1]), torch.randn(n_cells, weight.shape[0])
    bias = torch.zeros(weight.shape[0])
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.addmm(bias, hidden, weight.t())
        torch.mm(grad, weight)
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import anndata as ad

    import sclatent

    adata = ad.read_h5ad(f"{DATA}/pbmc4k_scdcc_top2000.h5ad")
    sclatent.SCLatent.setup_anndata(adata)
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    k = int(round(0.9 * adata.n_obs))
    train, test = adata[np.sort(perm[:k])].copy(), adata[np.sort(perm[k:])].copy()
    model = sclatent.SCLatent(train, n_latent=10)
    model.train(max_epochs=20, enable_progress_bar=False)
    times = {}
    for steps in (20, 120):
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.get_latent_representation(test, refine_steps=steps, batch_size=test.n_obs)
            runs.append(time.perf_counter() - t)
        times[steps] = statistics.median(runs)
    per_step = (times[120] - times[20]) / 100
    floor = gemm_floor_seconds(test.n_obs, model.module.decoders["rna"])
    out = {
        "sclatent": os.path.dirname(sclatent.__file__),
        "threads": args.threads,
        "n_cells": test.n_obs,
        "seconds_K20": round(times[20], 3),
        "seconds_K120": round(times[120], 3),
        "ms_per_step_per_1000_cells": round(1000 * per_step * 1000 / test.n_obs, 2),
        "gemm_floor_ms_per_step_per_1000_cells": round(1000 * floor * 1000 / test.n_obs, 2),
        "elbo_refined_100": round(float(model.get_elbo(test, refine_steps=100, n_samples=16)), 2),
        "elbo_encoder": round(float(model.get_elbo(test, n_samples=16)), 2),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
