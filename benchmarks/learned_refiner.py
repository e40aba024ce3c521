"""The learned refiner (iterative amortized inference) against Adam refinement: gap closed vs time.

For each dataset a model is trained with the package defaults (``SCLatent(train).train()``),
then a refiner with the defaults of ``model.train_refiner()`` (5 steps). On each
evaluation set:

- the amortization gap closed (``get_amortization_gap``, 64 common-noise draws) by Adam
  with K = 5, 20, 100 steps and by the learned refiner with 5 and 10 steps, and the share
  of the gap that 100 Adam steps close;
- the refinement wall time, timed side by side on the same batch (all evaluation cells at
  once), median of ``--repeats`` runs, with the monotone check (what the output methods do)
  and without it (the steps alone: ``keep_best=False``).

Sets: PBMC held-out cells (10 %); CellBench trained on CEL-seq2 cells (80 %), evaluated on
the held-out CEL-seq2 cells and on every Drop-seq cell (an unseen technology).

Usage::

    .venv/bin/python benchmarks/learned_refiner.py [--dataset pbmc|cellbench|all] [--repeats 3] [--out results.json]
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

import sclatent

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")
METHODS = (("adam", 5), ("adam", 20), ("adam", 100), ("learned", 5), ("learned", 10))


def _split(n: int, frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(frac * n))
    return np.sort(perm[:k]), np.sort(perm[k:])


def _datasets(name: str):
    import anndata as ad

    if name == "pbmc":
        adata = ad.read_h5ad(f"{DATA}/pbmc4k_scdcc_top2000.h5ad")
        sclatent.SCLatent.setup_anndata(adata)
        tr, te = _split(adata.n_obs, 0.9)
        return adata[tr].copy(), {"pbmc_heldout": adata[te].copy()}
    adata = ad.read_h5ad(f"{DATA}/cellbench_3cl_celseq2_dropseq.h5ad")
    sclatent.SCLatent.setup_anndata(adata)  # batch_key=None: the Drop-seq cells can be encoded
    batch = adata.obs["batch"].astype(str).to_numpy()
    cel, drop = np.flatnonzero(batch == "sc_celseq2"), np.flatnonzero(batch == "sc_dropseq")
    tr, te = _split(len(cel), 0.8)
    return adata[cel[tr]].copy(), {"cellbench_heldout_celseq2": adata[cel[te]].copy(), "cellbench_shift_dropseq": adata[drop].copy()}


def _refine_seconds(model, data, method: str, steps: int, keep_best: bool, repeats: int) -> float:
    """Median wall time of refining every cell of ``data`` in one batch."""
    tensors, _ = model._tensors_for(data)
    batch = next(model._batches(tensors, tensors.n_cells))
    with torch.no_grad():
        start = model.module.inference(batch)
    times = []
    for r in range(repeats):
        gen = torch.Generator().manual_seed(r)
        t = time.perf_counter()
        model.module.refine(batch, start, steps, 0.05, None, gen, keep_best=keep_best, method=method)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(name: str, repeats: int) -> dict:
    train, sets = _datasets(name)
    model = sclatent.SCLatent(train)
    t = time.perf_counter()
    model.train(enable_progress_bar=False)
    out = {"dataset": name, "n_train": train.n_obs, "train_seconds": round(time.perf_counter() - t, 1), "epochs": len(model.history)}
    t = time.perf_counter()
    history = model.train_refiner()
    out["refiner"] = {"seconds": round(time.perf_counter() - t, 1), "epochs": len(history), "kept_epoch": int(history.index[history["kept"]][0])}
    print(json.dumps(out), flush=True)
    out["sets"] = {}
    for set_name, data in sets.items():
        rows = []
        for method, steps in METHODS:
            _, s = model.get_amortization_gap(data, refine_steps=steps, refine_method=method, n_samples=64, seed=0)
            rows.append({
                "method": method, "steps": steps, "mean_gap": round(float(s["mean_gap"]), 3),
                "frac_cells_improved": round(float(s["frac_cells_improved"]), 3),
                "seconds_steps_only": round(_refine_seconds(model, data, method, steps, False, repeats), 3),
                "seconds_with_check": round(_refine_seconds(model, data, method, steps, True, repeats), 3),
            })
        adam100 = next(r for r in rows if r["method"] == "adam" and r["steps"] == 100)
        for r in rows:
            r["share_of_adam100_gap"] = round(r["mean_gap"] / adam100["mean_gap"], 3)
            r["time_vs_adam100_steps_only"] = round(r["seconds_steps_only"] / adam100["seconds_steps_only"], 3)
            r["time_vs_adam100_with_check"] = round(r["seconds_with_check"] / adam100["seconds_with_check"], 3)
            print(json.dumps({"set": set_name, "n_cells": data.n_obs, **r}), flush=True)
        out["sets"][set_name] = {"n_cells": data.n_obs, "rows": rows}
        print(f"\n{set_name} ({data.n_obs} cells)")
        print("| method | steps | gap closed (nats/cell) | share of Adam-100's | time, steps only (s) | vs Adam-100 | time with monotone check (s) | vs Adam-100 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {r['steps']} | {r['mean_gap']:.3f} | {r['share_of_adam100_gap']:.2f} | {r['seconds_steps_only']:.3f} | "
                  f"{r['time_vs_adam100_steps_only']:.3f} | {r['seconds_with_check']:.3f} | {r['time_vs_adam100_with_check']:.3f} |", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["pbmc", "cellbench", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    names = ["pbmc", "cellbench"] if args.dataset == "all" else [args.dataset]
    results = {name: run(name, args.repeats) for name in names}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
