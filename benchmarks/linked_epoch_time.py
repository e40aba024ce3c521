"""Seconds per training epoch of the unpaired vignette's model, this checkout against another revision.

The model is the one of ``vignettes/02_unpaired_rna_atac.py``: the shipped MOp cells
(``sclatent.datasets.mop_snareseq2()``) split into 1,500 RNA-only and 1,500 ATAC-only
cells, peak-gene links from the shipped mm10 TSS table, package defaults, a fixed number
of epochs. Each run is a fresh process; runs of the two checkouts alternate, and the
medians of their per-epoch times and the ratio are printed (the machine may be shared:
read the ratio, not the absolute times).

Usage::

    python benchmarks/linked_epoch_time.py --against 0dfbadd --epochs 5 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(epochs: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np

    import sclatent

    paired = sclatent.datasets.mop_snareseq2()
    order = np.random.default_rng(0).permutation(paired.n_obs)
    rna_cells, atac_cells = order[: paired.n_obs // 2], order[paired.n_obs // 2 :]
    mdata = sclatent.data.organize_multiome(rna=paired.mod["rna"][rna_cells].copy(), atac=paired.mod["atac"][atac_cells].copy())
    mdata.obs["batch"] = paired.obs.loc[mdata.obs_names, "batch"].astype(str).to_numpy()
    sclatent.data.link_peaks_to_genes(mdata, annotation=sclatent.datasets.mop_gene_tss())
    sclatent.SCLatent.setup_mudata(mdata, {"rna": "rna", "atac": "atac"}, batch_key="batch", feature_links=True)
    model = sclatent.SCLatent(mdata)
    start = time.perf_counter()
    model.train(max_epochs=epochs, enable_progress_bar=False)
    print(json.dumps({"seconds_per_epoch": (time.perf_counter() - start) / epochs, "package": sclatent.__file__}))


def run(path: Path, epochs: int, threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(path), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", "--epochs", str(epochs)],
        env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not result["package"].startswith(str(path)):
        raise RuntimeError(f"the run imported {result['package']}, not the checkout at {path}")
    return result["seconds_per_epoch"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", help="git revision to compare with (checked out into a temporary worktree)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.epochs)
        return
    checkouts = {"this checkout": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            other = Path(tmp) / "against"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(other), args.against], check=True)
            checkouts[args.against] = other
        try:
            times = {name: [] for name in checkouts}
            for _ in range(args.repeats):
                for name, path in checkouts.items():
                    times[name].append(run(path, args.epochs, args.threads))
                    print(f"{name}: {times[name][-1]:.2f} s/epoch", flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], check=False)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, m in medians.items():
        print(f"median {name}: {m:.2f} s/epoch over {args.repeats} runs of {args.epochs} epochs ({args.threads} threads)")
    if args.against:
        print(f"ratio {args.against} / this checkout: {medians[args.against] / medians['this checkout']:.2f}x")


if __name__ == "__main__":
    main()
