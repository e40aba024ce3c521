"""Differential expression: sclatent vs scvi-tools side by side, same data, same samples.

Protocol
--------
* Data: the shipped MOp SNARE-seq2 RNA (3,000 nuclei, 1,677 genes, 8 libraries as batch).
* Both models trained for ``--epochs`` epochs with their defaults otherwise (sclatent
  ``SCLatent(adata)``; scvi-tools ``SCVI(adata)``), then, alternating ``--repeats`` times:
  - inhibitory (Pvalb, Sst, CGE, Npy) vs excitatory (L2/3, L4/5, L6) neurons with
    ``idx1``/``idx2``, ``mode="change"``, ``delta=0.25``, ``n_samples=5000`` for both
    (scvi-tools' ``n_samples_overall``, its default);
  - every cell type against the rest (``groupby="cell_type"``, 15 comparisons), same settings.
  Wall time of each call (median of the repeats), the ratio, and agreement: Spearman
  correlation of ``lfc_mean`` between the two, and the ranks of Gad1, Gad2 (up in
  inhibitory) and Slc17a7 (up in excitatory) by ``lfc_mean`` in each.

Usage
-----
``python benchmarks/de_speed.py --epochs 30 --repeats 3 --threads 2 --out benchmarks/results/de_speed.json``
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
INHIBITORY = ["Pvalb", "Sst", "CGE", "Npy"]
EXCITATORY = ["L2/3", "L4/5", "L6"]


def ranks(de) -> dict:
    up = de[de["lfc_mean"] > 0].sort_values("lfc_mean", ascending=False).index
    down = de[de["lfc_mean"] < 0].sort_values("lfc_mean").index
    return {"Gad1_up_rank": int(list(up).index("Gad1")) + 1 if "Gad1" in up else None,
            "Gad2_up_rank": int(list(up).index("Gad2")) + 1 if "Gad2" in up else None,
            "Slc17a7_down_rank": int(list(down).index("Slc17a7")) + 1 if "Slc17a7" in down else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "de_speed.json"))
    args = p.parse_args()
    import scvi
    import torch
    from scipy.stats import spearmanr

    import sclatent

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    adata = sclatent.datasets.mop_snareseq2("rna")
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    ours_data, theirs_data = adata.copy(), adata.copy()
    sclatent.SCLatent.setup_anndata(ours_data, batch_key="batch")
    ours = sclatent.SCLatent(ours_data, seed=0).train(max_epochs=args.epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(theirs_data, batch_key="batch")
    theirs = scvi.model.SCVI(theirs_data)
    theirs.train(max_epochs=args.epochs, accelerator="cpu", devices=1, enable_progress_bar=False)
    cell_type = adata.obs["cell_type"].astype(str)
    idx1, idx2 = cell_type.isin(INHIBITORY).to_numpy(), cell_type.isin(EXCITATORY).to_numpy()
    common = dict(mode="change", delta=0.25)
    calls = {
        "inhibitory vs excitatory": (
            lambda: ours.differential_expression(idx1=idx1, idx2=idx2, n_samples=5000, **common),
            lambda: theirs.differential_expression(idx1=idx1, idx2=idx2, n_samples_overall=5000, silent=True, **common),
        ),
        "each cell type vs rest (15)": (
            lambda: ours.differential_expression(groupby="cell_type", n_samples=5000, **common),
            lambda: theirs.differential_expression(groupby="cell_type", n_samples_overall=5000, silent=True, **common),
        ),
    }
    rows = []
    for name, (mine, peer) in calls.items():
        times = {"sclatent": [], "scvi-tools": []}
        results = {}
        for _ in range(args.repeats):
            for label, fn in (("sclatent", mine), ("scvi-tools", peer)):
                t0 = time.perf_counter()
                results[label] = fn()
                times[label].append(time.perf_counter() - t0)
        row = {"comparison": name, **{f"{k}_s": float(np.median(v)) for k, v in times.items()},
               "runs_s": times, "speedup": float(np.median(times["scvi-tools"]) / np.median(times["sclatent"]))}
        if name.startswith("inhibitory"):
            a, b = results["sclatent"], results["scvi-tools"]
            row["spearman_lfc_mean"] = float(spearmanr(a["lfc_mean"], b.loc[a.index, "lfc_mean"]).statistic)
            row["sclatent_ranks"], row["scvi_ranks"] = ranks(a), ranks(b)
        rows.append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
