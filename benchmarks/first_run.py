"""Time to quality: the package's default training against a long training, on every dataset.

Protocol
--------
* Datasets: the shipped MOp subset (``sclatent.datasets.mop_snareseq2()``, 3,000 paired
  nuclei, RNA + ATAC, 8 libraries: what ``sclatent run`` trains), and the shared PBMC 4k
  (RNA, 4,271 cells), CellBench (RNA, 450 cells, 2 technologies as the batch) and MOp
  SNARE-seq2 (RNA + ATAC, 6,968 nuclei, 8 libraries).
* ``defaults``: ``SCLatent(data)`` and ``train()`` with nothing set (the epoch budget and
  early stopping of the package).
* ``long``: the same model trained for ``--long-epochs`` epochs (default 400) with early
  stopping off and the last epoch's weights kept (``keep_weights="last"``; protocol-only
  settings: a converged long training, as a user who trains for a fixed budget gets).
  Its latents are also scored every ``--every`` epochs along the way.
* Scores on all cells' latents (the fused latent for MOp): 15-NN leave-one-out cell-type
  accuracy, and batch mixing as the mean fraction of each cell's 15 nearest neighbours from
  its own batch (lower is better mixed; omitted with one batch); training wall time.
  Within 0.02 of the long run on both scores is the target.
* ``--cli`` also times ``sclatent run --out DIR`` as a whole process (``--repeats`` times).

Usage
-----
``python benchmarks/first_run.py --threads 2 --out benchmarks/results/first_run.json``
``python benchmarks/first_run.py --cli-only --repeats 3`` (on a quiet machine: the < 3 min target)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")
DATASETS = ("shipped", "pbmc", "cellbench", "mop")


def load(name: str):
    """``(data set up for sclatent, cell-type labels, batch labels or None)``."""
    import anndata as ad
    import mudata as md

    import sclatent

    md.set_options(pull_on_update=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "shipped":
            data = sclatent.datasets.mop_snareseq2()
        elif name == "mop":
            data = md.read_h5mu(os.path.join(SHARED, "mop_snareseq2_rna_atac.h5mu"))
            for column in ("batch", "cell_type"):
                data.obs[column] = data.mod["rna"].obs[column].reindex(data.obs_names).astype(str).values
        else:
            data = ad.read_h5ad(os.path.join(SHARED, {"pbmc": "pbmc4k_scdcc_top2000.h5ad", "cellbench": "cellbench_3cl_celseq2_dropseq.h5ad"}[name]))
    data.obs["batch"] = data.obs["batch"].astype(str)
    batch = data.obs["batch"].to_numpy() if data.obs["batch"].nunique() > 1 else None
    if isinstance(data, md.MuData):
        sclatent.SCLatent.setup_mudata(data, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    else:
        sclatent.SCLatent.setup_anndata(data, batch_key="batch" if batch is not None else None)
    return data, data.obs["cell_type"].astype(str).to_numpy(), batch


def scores(z: np.ndarray, cell_type: np.ndarray, batch: np.ndarray | None, k: int = 15) -> dict:
    """15-NN leave-one-out cell-type accuracy and the mean own-batch fraction of the neighbours."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    votes = cell_type[idx]
    predicted = np.array([max(set(row), key=list(row).count) for row in votes])
    out = {"celltype_knn15": float((predicted == cell_type).mean())}
    if batch is not None:
        out["batch_same15"] = float((batch[idx] == batch[:, None]).mean())
    return out


def train_and_score(name: str, long_epochs: int | None, every: int, seed: int) -> dict:
    import lightning.pytorch as pl

    import sclatent

    data, cell_type, batch = load(name)
    model = sclatent.SCLatent(data, seed=seed)
    along = []

    class ScoreAlong(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if (trainer.current_epoch + 1) % every == 0:
                was = model.module.training
                s = scores(model.get_latent_representation(), cell_type, batch)
                model.module.train(was)
                along.append({"epoch": trainer.current_epoch + 1, **s})
                print(f"  {name} epoch {trainer.current_epoch + 1}: {s}", flush=True)

    options = dict(accelerator="cpu", devices=1, enable_progress_bar=False, seed=seed)
    if long_epochs is not None:
        options.update(max_epochs=long_epochs, early_stopping=False, keep_weights="last", callbacks=[ScoreAlong()])
    t0 = time.perf_counter()
    model.train(**options)
    wall = time.perf_counter() - t0
    kept = int(np.flatnonzero(model.history["kept"].to_numpy())[0]) if "kept" in model.history else len(model.history) - 1
    out = {
        "dataset": name, "run": "defaults" if long_epochs is None else f"long ({long_epochs} epochs, no early stopping)",
        "n_cells": int(data.n_obs), "epochs": int(len(model.history)), "kept_epoch": kept, "train_s": wall,
        **scores(model.get_latent_representation(), cell_type, batch),
    }
    if along:
        out["along"] = along
    return out


def time_cli(repeats: int) -> list[float]:
    """Wall seconds of ``sclatent run --out DIR`` as a fresh process, ``repeats`` times."""
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "sclatent", "run", "--out", out], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
            print(f"  sclatent run: {times[-1]:.0f} s", flush=True)
    return times


def table(rows: list[dict]) -> str:
    lines = ["| dataset | cells | run | epochs (kept) | train s | 15-NN cell type | own-batch neighbours |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "dataset" not in r:
            continue
        same = f"{r['batch_same15']:.3f}" if "batch_same15" in r else "(one batch)"
        lines.append(f"| {r['dataset']} | {r['n_cells']} | {r['run']} | {r['epochs']} ({r['kept_epoch']}) | {r['train_s']:.0f} | {r['celltype_knn15']:.3f} | {same} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--long-epochs", type=int, default=400)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--no-long", action="store_true", help="only the defaults")
    p.add_argument("--cli", action="store_true", help="also time `sclatent run` as a whole process")
    p.add_argument("--cli-only", action="store_true", help="only time `sclatent run` (no training in this process)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "first_run.json"))
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for name in [] if args.cli_only else args.datasets:
        for long_epochs in ([None] if args.no_long else [None, args.long_epochs]):
            rows.append(train_and_score(name, long_epochs, args.every, args.seed))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "along"}), flush=True)
    if args.cli or args.cli_only:
        times = time_cli(args.repeats)
        rows.append({"cli_run_s": times, "cli_run_median_s": float(np.median(times))})
        print(f"sclatent run: median {np.median(times):.0f} s over {len(times)}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
