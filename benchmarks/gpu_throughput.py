"""Training throughput on one accelerator: synthetic data resident on the device.

Protocol
--------
* Synthetic counts built in memory (no file): ``--cells`` x ``--genes`` RNA at
  ``--density`` (default 1M x 2,000 at 10 %), and optionally ``--atac-cells`` x
  ``--peaks`` ATAC (default off; e.g. 200k x 100k at 2 %) as a one-modality ATAC model.
* sclatent with package defaults for the model (``SCLatent(adata)``) and
  ``train(max_epochs=--epochs, batch_size=B, validation_size=0, accelerator=--accelerator)``
  for every ``--batch-sizes`` B; the counts are moved to the device once, at the start of
  training. Reported per B: seconds per epoch (the last epoch's ``history["seconds"]``, so
  the first epoch's warm-up is excluded when ``--epochs`` >= 2) and cells/s.
* ``--scvi``: the same for scvi-tools ``SCVI`` (when installed; ``n_latent=10``,
  ``n_hidden=128``, batch covariate), timed by its epoch timer over the same epochs.
* The script also runs on CPU (``--accelerator cpu``) with small sizes, which is how CI-less
  machines check it.

Usage
-----
``python benchmarks/gpu_throughput.py --accelerator gpu --cells 1000000 --batch-sizes 1024 4096 8192 --epochs 2``
``python benchmarks/gpu_throughput.py --accelerator cpu --cells 20000 --genes 2000 --batch-sizes 1024 --epochs 1``
Writes ``--out`` (JSON) and prints one line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def synthetic(n_cells: int, n_features: int, density: float, seed: int = 0):
    """A CSR AnnData of Poisson-ish counts with ``density`` nonzeros, two batches, built in chunks."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    per_cell = max(1, int(round(density * n_features)))
    chunk = max(1, 20_000_000 // per_cell)
    parts = []
    for a in range(0, n_cells, chunk):
        b = min(n_cells, a + chunk)
        cols = np.sort(rng.integers(0, n_features, size=(b - a, per_cell), dtype=np.int32), axis=1)
        vals = (rng.geometric(0.5, size=cols.shape)).astype(np.float32)
        m = sp.csr_matrix((vals.ravel(), cols.ravel(), np.arange(b - a + 1, dtype=np.int64) * per_cell), shape=(b - a, n_features))
        m.sum_duplicates()
        parts.append(m)
    x = sp.vstack(parts, format="csr")
    obs = pd.DataFrame({"batch": np.where(np.arange(n_cells) % 2, "a", "b")}, index=[f"c{i}" for i in range(n_cells)])
    return ad.AnnData(x, obs=obs)


def time_sclatent(adata, kind: str, batch_sizes, epochs: int, accelerator: str) -> list[dict]:
    import sclatent

    sclatent.SCLatent.setup_anndata(adata, batch_key="batch", modality_kind=kind)
    rows = []
    for bs in batch_sizes:
        model = sclatent.SCLatent(adata)
        t0 = time.perf_counter()
        model.train(max_epochs=epochs, batch_size=bs, validation_size=0, accelerator=accelerator, devices=1,
                    enable_progress_bar=False, early_stopping=False)
        wall = time.perf_counter() - t0
        sec = float(model.history["seconds"].iloc[-1])
        rows.append({"method": "sclatent", "kind": kind, "n_cells": adata.n_obs, "n_features": adata.n_vars,
                     "nnz": int(adata.X.nnz), "batch_size": bs, "epochs": epochs, "s_per_epoch": sec,
                     "cells_per_s": adata.n_obs / sec, "train_wall_s": wall})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def time_scvi(adata, batch_sizes, epochs: int, accelerator: str) -> list[dict]:
    try:
        import scvi
    except ImportError:
        print("scvi-tools is not installed: skipped", flush=True)
        return []
    rows = []
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    for bs in batch_sizes:
        model = scvi.model.SCVI(adata, n_latent=10, n_hidden=128)
        t0 = time.perf_counter()
        model.train(max_epochs=epochs, batch_size=bs, train_size=1.0, accelerator=accelerator, devices=1,
                    enable_progress_bar=False, early_stopping=False)
        wall = time.perf_counter() - t0
        rows.append({"method": "scvi-tools SCVI", "kind": "rna", "n_cells": adata.n_obs, "n_features": adata.n_vars,
                     "batch_size": bs, "epochs": epochs, "s_per_epoch": wall / epochs,
                     "cells_per_s": adata.n_obs * epochs / wall, "train_wall_s": wall,
                     "note": "wall time of train() / epochs (set-up included)"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--atac-cells", type=int, default=0)
    p.add_argument("--peaks", type=int, default=100_000)
    p.add_argument("--atac-density", type=float, default=0.02)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--scvi", action="store_true")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_throughput.json"))
    args = p.parse_args()
    import torch

    rows = [{"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "torch": torch.__version__}]
    print(json.dumps(rows[0]), flush=True)
    if args.cells:
        rna = synthetic(args.cells, args.genes, args.density)
        rows += time_sclatent(rna, "rna", args.batch_sizes, args.epochs, args.accelerator)
        if args.scvi:
            rows += time_scvi(rna, args.batch_sizes, args.epochs, args.accelerator)
        del rna
    if args.atac_cells:
        atac = synthetic(args.atac_cells, args.peaks, args.atac_density, seed=1)
        rows += time_sclatent(atac, "atac", args.batch_sizes, args.epochs, args.accelerator)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
