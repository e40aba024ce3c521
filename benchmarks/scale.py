"""Scale: training throughput and peak memory as cells grow, in memory vs read from disk.

Protocol
--------
* Synthetic RNA counts, ``--cells`` (default 100k, 300k, 1M) x ``--genes`` (2,000), 60
  nonzeros per cell on average (negative binomial around gene-specific means, two batches);
  written once per size to ``--workdir`` as a CSR ``.h5ad``.
* For every size and source (``memory``: ``read_h5ad(path)``; ``backed``:
  ``read_h5ad(path, backed="r")``; ``zarr``: a zarr copy of the same file, written once,
  opened with ``sclatent.data.open_zarr``), a fresh subprocess runs package defaults
  (``setup_anndata(batch_key="batch")``, ``SCLatent(adata)``, ``train(max_epochs=E)``,
  validation on), and reports: set-up + model build time, seconds per epoch (median over the
  epochs of ``history["seconds"]``), training cells/s, and the process's peak RSS
  (``ru_maxrss``). In-memory and backed runs alternate size by size, so both see the same
  machine load.
* ``--randomness``: the loss of randomness from block sampling. The RNA of the shared MOp
  SNARE-seq2 data (6,968 cells, in the file's order) is written as ``.h5ad``, read backed, and
  trained with ``block_size`` 1 (free shuffling) and the backed default 64, the same
  epochs (``--randomness-epochs``, no early stopping), validation held out by the default
  split; reported: the held-out ELBO per cell (``get_elbo`` on the validation cells, KL
  weight 1, 20 samples) of each.

* ``--reads PATH``: how to read a block-sampled batch (16 blocks of 16 cells, 256 cells)
  from a backed CSR ``.h5ad``: anndata's ``CSRDataset`` indexed with the sorted cells,
  anndata with one slice per block, and ``h5py`` span reads with ``indptr`` in memory (what
  :class:`sclatent.data.BackedMatrix` does); milliseconds per batch, median of 5 x 50.

Usage
-----
``python benchmarks/scale.py --cells 100000 300000 1000000 --epochs 2 --threads 2 --out benchmarks/results/scale``
``python benchmarks/scale.py --cells 100000 --sources memory backed zarr --epochs 2 --threads 1``
``python benchmarks/scale.py --randomness --randomness-epochs 30``
Writes ``<out>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def make_h5ad(path: str, n_cells: int, n_genes: int, per_cell: int = 60, seed: int = 0) -> None:
    """Synthetic CSR counts written in row chunks (memory bounded by the chunk)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    weights = rng.gamma(0.6, 1.0, n_genes)
    weights /= weights.sum()
    obs = pd.DataFrame({"batch": np.where(np.arange(n_cells) % 2, "a", "b")}, index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    # write a small AnnData for the layout, then replace X by the full matrix, chunk by chunk
    ad.AnnData(sp.csr_matrix((n_cells, n_genes), dtype=np.float32), obs=obs, var=var).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        del f["X"]
        g = f.create_group("X")
        g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        chunk = 50_000
        indptr = [np.zeros(1, np.int64)]
        ind = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
        dat = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 16,))
        total = 0
        for a in range(0, n_cells, chunk):
            b = min(n_cells, a + chunk)
            depth = rng.poisson(per_cell * 1.6, b - a) + 5
            genes = [np.unique(rng.choice(n_genes, size=d, p=weights)) for d in depth]
            lengths = np.array([len(x) for x in genes])
            cols = np.concatenate(genes).astype(np.int32)
            vals = (rng.negative_binomial(2, 0.5, len(cols)) + 1).astype(np.float32)
            ind.resize((total + len(cols),))
            dat.resize((total + len(cols),))
            ind[total:] = cols
            dat[total:] = vals
            indptr.append(total + np.cumsum(lengths))
            total += len(cols)
        g.create_dataset("indptr", data=np.concatenate(indptr))


def zarr_copy(path: str) -> str:
    """The zarr store holding the same AnnData as the ``.h5ad`` at ``path`` (written once)."""
    import anndata as ad

    out = path[: -len(".h5ad")] + ".zarr"
    if not os.path.exists(out):
        ad.read_h5ad(path).write_zarr(out)
    return out


def worker(path: str, source: str, epochs: int, threads: int) -> dict:
    """One run in this process: set-up, build, train; timings and peak RSS."""
    import resource
    import warnings

    import anndata as ad
    import torch

    import sclatent

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    if source == "zarr":
        adata = sclatent.data.open_zarr(zarr_copy(path))
    else:
        adata = ad.read_h5ad(path, backed="r") if source == "backed" else ad.read_h5ad(path)
    sclatent.SCLatent.setup_anndata(adata, batch_key="batch")
    model = sclatent.SCLatent(adata)
    setup_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
    train_s = time.perf_counter() - t1
    per_epoch = float(np.median(model.history["seconds"]))
    n_train = len(model.train_indices)
    return {
        "source": source, "n_cells": adata.n_obs, "n_genes": adata.n_vars, "setup_s": setup_s, "train_s": train_s,
        "epochs": len(model.history), "s_per_epoch": per_epoch, "cells_per_s": n_train / per_epoch,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "block_size": 1 if source == "memory" else 64,
    }


def run_worker(path: str, source: str, epochs: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, source, str(epochs), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def randomness(epochs: int, threads: int, workdir: str) -> list[dict]:
    """Held-out ELBO with block sampling (64) vs free shuffling (1), same epochs, backed MOp RNA."""
    import warnings

    import anndata as ad
    import torch

    import sclatent

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    import mudata as md

    path = os.path.join(workdir, "mop_rna.h5ad")
    if not os.path.exists(path):
        md.read_h5mu(os.path.join(SHARED, "mop_snareseq2_rna_atac.h5mu")).mod["rna"].write_h5ad(path)
    rows = []
    for block in (1, 64):
        adata = ad.read_h5ad(path, backed="r")
        sclatent.SCLatent.setup_anndata(adata, batch_key="batch")
        model = sclatent.SCLatent(adata)
        t0 = time.perf_counter()
        model.train(max_epochs=epochs, early_stopping=False, block_size=block, accelerator="cpu", devices=1, enable_progress_bar=False)
        wall = time.perf_counter() - t0
        held_out = adata[np.sort(model.validation_indices)].to_memory()
        elbo = model.get_elbo(held_out, n_samples=20)
        rows.append({"block_size": block, "epochs": epochs, "heldout_elbo": float(elbo), "train_s": wall,
                     "n_heldout": int(held_out.n_obs), "order": "file order"})
        print(rows[-1], flush=True)
    return rows


def reads(path: str) -> dict:
    """Milliseconds per block-sampled batch for three ways of reading a backed CSR matrix."""
    import h5py
    from anndata.io import sparse_dataset

    f = h5py.File(path, "r")
    X = sparse_dataset(f["X"])
    n = X.shape[0]
    indptr = f["X"]["indptr"][:]
    indices, data = f["X"]["indices"], f["X"]["data"]
    rng = np.random.default_rng(0)

    def starts():
        return np.sort(rng.integers(0, n - 16, 16))

    def anndata_sorted():
        X[np.unique(np.concatenate([np.arange(a, a + 16) for a in starts()]))]

    def anndata_slices():
        [X[a : a + 16] for a in starts()]

    def h5py_spans():
        [(indices[indptr[a] : indptr[a + 16]], data[indptr[a] : indptr[a + 16]]) for a in starts()]

    out = {}
    for name, fn in (("anndata CSRDataset[sorted cells]", anndata_sorted), ("anndata one slice per block", anndata_slices),
                     ("h5py span reads (sclatent)", h5py_spans)):
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(50):
                fn()
            times.append((time.perf_counter() - t) / 50 * 1e3)
        out[name] = float(np.median(times))
        print(f"{name}: {out[name]:.2f} ms per 256-cell batch", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/sclatent_scale")
    p.add_argument("--out", default=os.path.join(HERE, "results", "scale"))
    p.add_argument("--sources", nargs="+", default=["memory", "backed"])
    p.add_argument("--randomness", action="store_true")
    p.add_argument("--randomness-epochs", type=int, default=30)
    p.add_argument("--reads", metavar="PATH", help="time three ways of reading block-sampled batches of PATH")
    p.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reads:
        print(json.dumps(reads(args.reads)))
        return
    if args.worker:
        path, source, epochs, threads = args.worker
        print(json.dumps(worker(path, source, int(epochs), int(threads))))
        return
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.randomness:
        rows = randomness(args.randomness_epochs, args.threads, args.workdir)
        with open(args.out + "_randomness.json", "w") as f:
            json.dump(rows, f, indent=1)
        return
    rows = []
    for n in args.cells:
        path = os.path.join(args.workdir, f"rna_{n}x{args.genes}.h5ad")
        if not os.path.exists(path):
            t0 = time.perf_counter()
            make_h5ad(path, n, args.genes)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s ({os.path.getsize(path) / 2**20:.0f} MB)", flush=True)
        if "zarr" in args.sources:
            zarr_copy(path)  # written before the timed runs
        for source in args.sources:
            row = run_worker(path, source, args.epochs, args.threads)
            row["file_mb"] = os.path.getsize(path) / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out + ".json", "w") as f:
                json.dump(rows, f, indent=1)
    print("| cells | source | file MB | setup s | s/epoch | cells/s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n_cells']:,} | {r['source']} | {r['file_mb']:.0f} | {r['setup_s']:.1f} | {r['s_per_epoch']:.1f} | "
              f"{r['cells_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
