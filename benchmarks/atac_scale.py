"""ATAC at 100k peaks: training cells/s of sclatent and MULTIVI side by side, against the GEMM bound.

Protocol
--------
* Synthetic paired multiome: ``--cells`` (default 5,000) cells, 2,000 genes (300 nonzero
  per cell) and ``--peaks`` (100,000) peaks (2,000 nonzero per cell, counts 1), one batch.
* In fresh subprocesses, alternating, ``--repeats`` times each:
  - sclatent, package defaults (``SCLatent(mdata)``, ``train(max_epochs=--epochs)`` with
    validation): seconds per epoch from ``history["seconds"]`` (median over epochs), cells/s
    = training cells / that;
  - scvi-tools MULTIVI (``benchmarks/peers.py: train_multivi``, its defaults: batch 128,
    ``n_hidden = 128``), epoch times from its epoch timer (median), all cells training.
  Both report the process's peak RSS. ``--methods ... sclatent-bf16`` adds sclatent with
  ``train(precision="bf16-mixed")`` (not the default; its GEMM bound is then timed in
  bfloat16 too); ``sclatent-subset-all`` adds ``train(subset_sampling="all")`` (the
  default before it was ``"one"``).
* GEMM bound, measured in the same process as each sclatent run: the time of one forward
  + backward of the decoder's output layer (``(256, 128) @ (128, peaks + genes)``, three
  matrix products), so ``bound cells/s = 256 / that time`` is what one decoder pass per cell
  would allow; the fraction reached is sclatent's cells/s over it.

Usage
-----
``python benchmarks/atac_scale.py --cells 5000 --epochs 2 --repeats 3 --threads 2``
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
sys.path.insert(0, HERE)


def synthetic(n: int, n_peaks: int, n_genes: int = 2000, seed: int = 0):
    import anndata as ad
    import mudata as md
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)

    def counts(g, per, values):
        cols = np.sort(rng.integers(0, g, size=(n, per)), 1).astype(np.int32)
        m = sp.csr_matrix((values(n * per), cols.ravel(), np.arange(n + 1, dtype=np.int64) * per), shape=(n, g))
        m.sum_duplicates()
        return m

    obs = pd.DataFrame({"batch": "b0"}, index=[f"c{i}" for i in range(n)])
    rna = ad.AnnData(counts(n_genes, 300, lambda k: rng.geometric(0.4, k).astype(np.float32)), obs=obs.copy())
    rna.var_names = [f"g{i}" for i in range(n_genes)]
    atac = ad.AnnData(counts(n_peaks, 2000, lambda k: np.ones(k, np.float32)), obs=obs.copy())
    atac.var_names = [f"chr1:{i * 1000}-{i * 1000 + 500}" for i in range(n_peaks)]
    md.set_options(pull_on_update=False)
    mdata = md.MuData({"rna": rna, "atac": atac})
    mdata.obs["batch"] = "b0"
    return mdata


def gemm_seconds(n_out: int, reps: int = 5, bf16: bool = False) -> float:
    import torch

    w = torch.randn(128, n_out, requires_grad=True)
    x = torch.randn(256, 128, requires_grad=True)
    times = []
    for i in range(reps + 1):  # the first is a warm-up
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = x @ w
        y.backward(torch.ones_like(y))
        if i:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


#: sclatent's methods: package defaults, and options that are not the default
SCLATENT_OPTIONS = {
    "sclatent": {},
    "sclatent-bf16": {"precision": "bf16-mixed"},
    "sclatent-subset-all": {"subset_sampling": "all"},
}


def worker(method: str, n: int, n_peaks: int, epochs: int, threads: int) -> dict:
    import resource
    import warnings

    import torch

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    mdata = synthetic(n, n_peaks)
    if method in SCLATENT_OPTIONS:
        import sclatent

        bf16 = method == "sclatent-bf16"  # train(precision="bf16-mixed"): not the default
        sclatent.SCLatent.setup_mudata(mdata, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
        model = sclatent.SCLatent(mdata)
        model.train(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False, **SCLATENT_OPTIONS[method])
        per_epoch = float(np.median(model.history["seconds"]))
        n_train = len(model.train_indices)
        gemm = gemm_seconds(n_peaks + 2000, bf16=bf16)
        out = {"gemm_s_per_256": gemm, "bound_cells_per_s": 256 / gemm}
    else:
        from peers import train_multivi

        res = train_multivi(mdata, max_epochs=epochs, batch_key="batch", n_threads=threads)
        per_epoch = float(np.median(res["epoch_times_s"]))
        n_train = res["n_train_cells"]
        out = {}
    out.update(method=method, n_cells=n, n_peaks=n_peaks, epochs=epochs, s_per_epoch=per_epoch,
               cells_per_s=n_train / per_epoch, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=5000)
    p.add_argument("--peaks", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["sclatent", "multivi"])
    p.add_argument("--out", default=os.path.join(HERE, "results", "atac_scale.json"))
    p.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        method, n, peaks, epochs, threads = args.worker
        print(json.dumps(worker(method, int(n), int(peaks), int(epochs), int(threads))))
        return
    rows = []
    for r in range(args.repeats):
        for method in args.methods:
            cmd = [sys.executable, __file__, "--worker", method, str(args.cells), str(args.peaks), str(args.epochs), str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            rows.append(dict(json.loads(done.stdout.strip().splitlines()[-1]), repeat=r))
            print(json.dumps(rows[-1]), flush=True)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    for method in args.methods:
        mine = [x for x in rows if x["method"] == method]
        cps = [x["cells_per_s"] for x in mine]
        print(f"{method}: median cells/s {np.median(cps):.1f} (runs {', '.join(f'{c:.1f}' for c in cps)}), "
              f"peak RSS {np.median([x['peak_rss_mb'] for x in mine]):.0f} MB")
    for method in ("sclatent", "sclatent-bf16"):
        bound = [x["bound_cells_per_s"] for x in rows if x["method"] == method]
        if bound:
            kind = "bfloat16" if method.endswith("bf16") else "float32"
            print(f"GEMM bound (one decoder pass per cell, {kind}): median {np.median(bound):.0f} cells/s")


if __name__ == "__main__":
    main()
