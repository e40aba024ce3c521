"""sclatent vs scvi-tools SCVI on RNA: throughput, memory, held-out likelihood, latent quality.

Run from the repository root (scvi-tools from the ``bench`` extra is optional; without it
only sclatent runs):

    python benchmarks/rna_vs_scvi.py --out benchmarks/results/rna_vs_scvi.json

Each measurement runs in a fresh subprocess (so peak RSS belongs to one framework), and
the frameworks alternate run by run so that machine noise hits both alike. Three parts:

1. **Throughput** at the same architecture (n_latent 10, n_hidden 128, 1 layer, NB, gene
   dispersion), batch size and epochs: cells/s = n_train * epochs / wall time of ``train``,
   median of ``--repeats`` runs, and peak RSS.
2. **Time to scvi-tools' final held-out ELBO**: scvi-tools trains ``--ref-epochs`` epochs
   (KL warm-up over the first quarter so it ends at KL weight 1); its held-out ELBO after
   the last epoch is the target. sclatent trains with its own defaults; the held-out ELBO
   is evaluated after every epoch (evaluation time excluded from the clock) and the first
   time it reaches the target is reported.
3. **Quality** after part 2, on the same held-out cells: ELBO per cell (KL weight 1,
   averaged over 8 samples), importance-sampled log p(x) (``--mc-samples``), kNN (k=15)
   cell-type accuracy and batch predictability of the latent (train cells -> test cells),
   and the same kNN scores for PCA (10 components of log1p-normalized counts).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "data"
DATASETS = {
    "pbmc4k": (SHARED / "pbmc4k_scdcc_top2000.h5ad", None),
    "cellbench": (SHARED / "cellbench_3cl_celseq2_dropseq.h5ad", "batch"),
    "mop_rna": (SHARED / "mop_snareseq2_rna_atac.h5mu", "batch"),
}
ARCH = dict(n_latent=10, n_hidden=128, n_layers=1)


def load(name: str):
    """The dataset as an AnnData of raw counts, and its train/test split (90/10, seed 0)."""
    import anndata as ad

    path, batch_key = DATASETS[name]
    if path.suffix == ".h5mu":
        import mudata as md

        adata = md.read_h5mu(path).mod["rna"]
        adata = ad.AnnData(adata.X, obs=adata.obs[["batch", "cell_type"]].copy(), var=adata.var[[]].copy())
    else:
        adata = ad.read_h5ad(path)
    rng = np.random.default_rng(0)
    perm = rng.permutation(adata.n_obs)
    n_test = adata.n_obs // 10
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    return adata[train].copy(), adata[test].copy(), batch_key


def knn_scores(z_train, z_test, obs_train, obs_test, batch_key) -> dict:
    """kNN (k=15) accuracy of cell type, and of batch (lower = better mixed), train -> test."""
    from sklearn.neighbors import KNeighborsClassifier

    out = {}
    for key, name in (("cell_type", "celltype_knn_acc"), (batch_key, "batch_knn_acc")):
        if key is None:
            continue
        clf = KNeighborsClassifier(15).fit(z_train, obs_train[key].astype(str))
        out[name] = float((clf.predict(z_test) == obs_test[key].astype(str).to_numpy()).mean())
    return out


def pca_scores(train, test, batch_key) -> dict:
    import scanpy as sc
    from sklearn.decomposition import PCA

    def prep(a):
        a = a.copy()
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        return a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)

    pca = PCA(10, random_state=0).fit(prep(train))
    return knn_scores(pca.transform(prep(train)), pca.transform(prep(test)), train.obs, test.obs, batch_key)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------- workers
def worker_sclatent(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import lightning.pytorch as pl

    import sclatent

    train, test, batch_key = load(args.dataset)
    sclatent.SCLatent.setup_anndata(train, batch_key=batch_key)
    if args.mode == "throughput":
        model = sclatent.SCLatent(train, **ARCH)
        t = time.perf_counter()
        model.train(max_epochs=args.epochs, batch_size=args.batch_size, validation_size=0, early_stopping=False,
                    kl_warmup_epochs=max(1, args.epochs // 4), enable_progress_bar=False)
        wall = time.perf_counter() - t
        return {"cells_per_s": train.n_obs * args.epochs / wall, "train_wall_s": wall, "peak_rss_mb": peak_rss_mb()}

    model = sclatent.SCLatent(train, **ARCH)
    trace = []

    class HeldOutElbo(pl.Callback):
        def on_train_start(self, trainer, plan):
            self.clock, self.t0 = 0.0, time.perf_counter()

        def on_train_epoch_end(self, trainer, plan):
            self.clock += time.perf_counter() - self.t0
            elbo = model.get_elbo(test, n_samples=1, seed=0)
            plan.module.train()
            trace.append({"epoch": trainer.current_epoch, "elapsed_s": self.clock, "elbo": elbo})
            self.t0 = time.perf_counter()

    t = time.perf_counter()
    cb = HeldOutElbo()
    own = {} if args.lr is None else {"lr": args.lr}  # None: sclatent's default learning rate
    model.train(max_epochs=args.epochs, batch_size=args.batch_size, enable_progress_bar=False,
                early_stopping=True, callbacks=[cb], **own)
    wall = time.perf_counter() - t
    return {
        "train_wall_s": wall, "train_clock_s": cb.clock, "epochs": len(model.history), "trace": trace,
        **evaluate(model.get_latent_representation(), model.get_latent_representation(test),
                   lambda: model.get_elbo(test, n_samples=8), lambda: model.get_marginal_ll(test, n_mc_samples=args.mc_samples),
                   train, test, batch_key),
        "peak_rss_mb": peak_rss_mb(),
    }


def evaluate(z_train, z_test, elbo_fn, mll_fn, train, test, batch_key) -> dict:
    t = time.perf_counter()
    out = {"test_elbo": float(elbo_fn())}
    out["test_marginal_ll"] = float(mll_fn())
    out["eval_s"] = time.perf_counter() - t
    out.update(knn_scores(z_train, z_test, train.obs, test.obs, batch_key))
    return out


def worker_scvi(args) -> dict:
    sys.path.insert(0, str(HERE))
    import peers

    train, test, batch_key = load(args.dataset)
    if args.mode == "throughput":
        res = peers.train_scvi(train, batch_key=batch_key, batch_size=args.batch_size, max_epochs=args.epochs,
                               n_epochs_kl_warmup=max(1, args.epochs // 4), n_threads=args.threads, **ARCH)
        return {"cells_per_s": res["cells_per_s"], "train_wall_s": res["train_wall_s"], "peak_rss_mb": peak_rss_mb()}
    res = peers.train_scvi(train, batch_key=batch_key, batch_size=args.batch_size, max_epochs=args.epochs,
                           n_epochs_kl_warmup=max(1, args.epochs // 4), eval_adata=test, n_threads=args.threads, **ARCH)
    model = res["model"]
    ev = peers.evaluate_scvi(model, test, n_mc_samples=args.mc_samples, elbo_n_samples=8)
    z_train = model.get_latent_representation()
    out = {"train_wall_s": res["train_wall_s"], "epochs": res["epochs"], "trace": res["trace"],
           "test_elbo": ev["elbo"], "test_marginal_ll": ev["marginal_ll"]}
    out.update(knn_scores(z_train, ev["latent"], train.obs, test.obs, batch_key))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ------------------------------------------------------------ orchestrator
def run_worker(framework: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework] + [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["sclatent", "scvi"])
    p.add_argument("--mode", default="throughput", choices=["throughput", "converge"])
    p.add_argument("--dataset", default="pbmc4k", choices=list(DATASETS))
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="worker only: learning rate (None: the framework's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-epochs", type=int, default=100)
    p.add_argument("--own-batch-size", type=int, default=256)
    p.add_argument("--own-lr", type=float, default=None, help="sclatent's learning rate in the convergence run (default: its default)")
    p.add_argument("--mc-samples", type=int, default=200)
    p.add_argument("--skip-scvi", action="store_true")
    p.add_argument("--skip-converge", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / "rna_vs_scvi.json"))
    args = p.parse_args()
    if args.worker:
        fn = worker_sclatent if args.worker == "sclatent" else worker_scvi
        print(json.dumps(fn(args)))
        return

    sys.path.insert(0, str(HERE))
    import peers

    with_scvi = peers.scvi_available() and not args.skip_scvi
    frameworks = ["scvi", "sclatent"] if with_scvi else ["sclatent"]
    results = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "datasets": {}}
    for ds in args.datasets.split(","):
        entry = results["datasets"][ds] = {"throughput": {f: [] for f in frameworks}}
        for r in range(args.repeats):
            for f in frameworks:
                res = run_worker(f, mode="throughput", dataset=ds, epochs=args.epochs, batch_size=args.batch_size, threads=args.threads)
                entry["throughput"][f].append(res)
                print(f"[{ds}] throughput run {r} {f}: {res['cells_per_s']:.0f} cells/s, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
        med = {f: float(np.median([x["cells_per_s"] for x in entry["throughput"][f]])) for f in frameworks}
        entry["throughput_median"] = med
        if with_scvi:
            entry["throughput_ratio"] = med["sclatent"] / med["scvi"]
        if not args.skip_converge:
            if with_scvi:
                ref = run_worker("scvi", mode="converge", dataset=ds, epochs=args.ref_epochs, batch_size=args.batch_size,
                                 threads=args.threads, mc_samples=args.mc_samples)
                entry["scvi"] = ref
                print(f"[{ds}] scvi {ref['epochs']} epochs in {ref['train_wall_s']:.1f}s: test ELBO {ref['test_elbo']:.2f}, "
                      f"log p(x) {ref['test_marginal_ll']:.2f}", flush=True)
            own_kw = {} if args.own_lr is None else {"lr": args.own_lr}
            own = run_worker("sclatent", mode="converge", dataset=ds, epochs=400, batch_size=args.own_batch_size,
                             threads=args.threads, mc_samples=args.mc_samples, **own_kw)
            entry["sclatent"] = own
            print(f"[{ds}] sclatent {own['epochs']} epochs in {own['train_wall_s']:.1f}s: test ELBO {own['test_elbo']:.2f}, "
                  f"log p(x) {own['test_marginal_ll']:.2f}", flush=True)
            if with_scvi:
                target = ref["trace"][-1]["elbo"]
                reached = [t["elapsed_s"] for t in own["trace"] if t["elbo"] >= target]
                scvi_clock = ref["trace"][-1]["elapsed_s"]
                entry["time_to_scvi_final_elbo"] = {
                    "target_elbo": target, "scvi_s": scvi_clock,
                    "sclatent_s": reached[0] if reached else None,
                    "ratio": scvi_clock / reached[0] if reached else None,
                }
        entry["pca"] = pca_scores(*load(ds))
        print(f"[{ds}] {json.dumps({k: v for k, v in entry.items() if k not in ('throughput', 'scvi', 'sclatent')})}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
