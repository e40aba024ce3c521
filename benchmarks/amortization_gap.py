"""Amortization gap of sclatent on held-out and shifted cells of the shared real datasets.

For each experiment a model is trained on some cells, then on held-out cells (same
batches) and on cells of an unseen batch (distribution shift) we measure, for refinement
budgets K:

- the amortization gap ``ELBO(q_K) - ELBO(q_encoder)`` (``model.get_amortization_gap``,
  16 common-random-number samples per ELBO), mean and median over cells;
- the importance-sampled ``log p(x)`` with the encoder's or the refined posterior as the
  proposal (the estimator of ``model.get_marginal_ll(refine_steps=K)``, see ``marginal_ll``);
- the refinement cost, wall time per 1,000 cells (refinement alone, CPU, 1 thread);
- for the multimodal model, the same gap for the RNA-only and ATAC-only views
  (``modality="rna"`` / ``"atac"``), whose experts stand alone;
- posterior collapse: per-dimension KL and active units (``model.latent_diagnostics``).

Usage::

    .venv/bin/python benchmarks/amortization_gap.py pbmc|cellbench|mop|all [--out results.json]
    .venv/bin/python benchmarks/amortization_gap.py pbmc-decomposition    # model.get_inference_gap
    .venv/bin/python benchmarks/amortization_gap.py pbmc-decomposition --posterior flow

``pbmc-decomposition`` trains with the package defaults (``SCLatent(train).train()``) and
prints the full decomposition of the inference gap on the held-out cells for several K:
log p(x), ELBO(q*), ELBO(q_enc), approximation and amortization gaps with Monte-Carlo errors,
and the 15-NN cell-type accuracy from the training cells' latents to the held-out cells'.
``--posterior flow`` does the same for ``SCLatent(train, posterior="flow")``.

``families DATASET --posterior diagonal|flow`` (DATASET: pbmc, cellbench, mop) trains with
the package defaults and that posterior family, then reports the decomposition
(``get_inference_gap``, K=200) and the 15-NN cell-type accuracy (training cells' latents to
the evaluated cells') on each evaluation set: PBMC held-out cells; CellBench held-out
CEL-seq2 cells and every Drop-seq cell (an unseen technology); MOp held-out cells, fused
and through each expert alone. One process per family, so two can run side by side::

    .venv/bin/python benchmarks/amortization_gap.py families mop --posterior flow --out mop_flow.json

Every model is set up with ``batch_key=None`` so that an unseen batch can be encoded.
"""

from __future__ import annotations

import argparse
import os
import json
import time
import warnings

import numpy as np
import torch

import sclatent

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")  # ../shared/data
KS = (0, 5, 20, 100)
N_SAMPLES = 16  # Monte-Carlo samples per ELBO (common random numbers)


def _split(n: int, frac: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(frac * n))
    return np.sort(perm[:k]), np.sort(perm[k:])


def _train(data, *, n_latent: int, max_epochs: int, batch_size: int = 128, refine_steps: int = 0, **kwargs):
    model = sclatent.SCLatent(data, n_latent=n_latent, seed=0, **kwargs)
    t = time.perf_counter()
    model.train(max_epochs=max_epochs, batch_size=batch_size, enable_progress_bar=False, refine_steps=refine_steps, seed=0)
    seconds = time.perf_counter() - t
    h = model.history
    return model, {
        "train_seconds": round(seconds, 1),
        "epochs": len(h),
        "final_validation_elbo": float(h["validation_elbo"].iloc[-1]) if "validation_elbo" in h else None,
    }


def _diagnostics(model, data, modality=None) -> dict:
    per_dim, n_active, kl = model.latent_diagnostics(data, modality=modality)
    return {"n_active": n_active, "mean_kl": round(kl, 3), "kl_per_dim": [round(v, 3) for v in per_dim["kl"]]}


def marginal_ll(model, data, refine_steps: int, n_mc: int, batch_size: int = 256, seed: int = 0) -> float:
    """``model.get_marginal_ll`` with the refined proposal (its sample chunks bound memory)."""
    return float(model.get_marginal_ll(data, n_mc_samples=n_mc, refine_steps=refine_steps, batch_size=batch_size, seed=seed))


def gap_rows(model, data, ks=KS, modality=None, marginal_ks=(), n_mc: int = 200, batch_size: int = 256) -> list[dict]:
    """One row per K: gap summary (+ marginal log-likelihood for K in ``marginal_ks``)."""
    rows = []
    for k in ks:
        per_cell, s = model.get_amortization_gap(
            data, refine_steps=k, n_samples=N_SAMPLES, modality=modality, batch_size=batch_size, seed=0
        )
        row = {
            "K": k,
            "mean_gap": round(float(s["mean_gap"]), 3),
            "median_gap": round(float(s["median_gap"]), 3),
            "mean_elbo_amortized": round(float(s["mean_elbo_amortized"]), 3),
            "mean_elbo_refined": round(float(s["mean_elbo_refined"]), 3),
            "frac_cells_improved": round(float(s["frac_cells_improved"]), 3),
            "ms_per_1000_cells": round(float(s["ms_per_1000_cells"]), 1),
            "n_cells": int(s["n_cells"]),
        }
        if modality is None and k in marginal_ks:
            t = time.perf_counter()
            row["marginal_ll"] = round(marginal_ll(model, data, k, n_mc, batch_size), 3)
            row["marginal_ll_seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        print(json.dumps({"modality": modality or "fused", **row}), flush=True)
    if rows and "marginal_ll" in rows[0]:
        for r in rows:
            if "marginal_ll" in r:
                r["marginal_ll_gain"] = round(r["marginal_ll"] - rows[0]["marginal_ll"], 3)
    k_max = rows[-1]["mean_gap"]
    for r in rows:  # share of the K=max gap already closed with K steps
        r["frac_of_gap_at_Kmax"] = round(r["mean_gap"] / k_max, 3) if k_max > 0 else None
    return rows


def _pbmc_split():
    """PBMC 4k (2,000 genes), set up; 90 % of the cells to train on, the rest held out."""
    import anndata as ad

    adata = ad.read_h5ad(f"{DATA}/pbmc4k_scdcc_top2000.h5ad")
    sclatent.SCLatent.setup_anndata(adata)
    tr, te = _split(adata.n_obs, 0.9)
    return adata[tr].copy(), adata[te].copy()


def run_pbmc() -> dict:
    """Single-batch RNA (NB): 90% train, 10% held out; also semi-amortized training."""
    train, test = _pbmc_split()
    out = {"n_train": train.n_obs, "n_test": test.n_obs}
    model, out["train"] = _train(train, n_latent=10, max_epochs=30, batch_size=256)
    out["heldout"] = gap_rows(model, test, marginal_ks=KS, n_mc=100)
    out["latent_diagnostics"] = _diagnostics(model, test)
    # semi-amortized training (stop-gradient SA-VAE): same budget, decoder fit on refined posteriors
    sa, out["train_sa5"] = _train(train, n_latent=10, max_epochs=30, batch_size=256, refine_steps=5)
    out["heldout_sa5"] = gap_rows(sa, test, ks=(0, 20, 100), marginal_ks=(0, 100), n_mc=100)
    out["latent_diagnostics_sa5"] = _diagnostics(sa, test)
    return out


DECOMPOSITION_KS = (50, 100, 200, 400)
DECOMPOSITION_SAMPLES = 1000


def run_pbmc_decomposition(ks=DECOMPOSITION_KS, n_samples: int = DECOMPOSITION_SAMPLES, posterior: str = "diagonal") -> dict:
    """Inference-gap decomposition on held-out PBMC cells, model trained with the package defaults.

    ``model.get_inference_gap(test, refine_steps=K, n_samples=1000)`` for each K: mean
    log p(x) (importance-sampled, refined proposal), ELBO(q*) (refined), ELBO(q_enc),
    approximation and amortization gaps, their Monte-Carlo errors and the wall time.
    """
    from sclatent.tools import knn_transfer_accuracy

    train, test = _pbmc_split()
    out = {"n_train": train.n_obs, "n_test": test.n_obs, "posterior": posterior}
    model = sclatent.SCLatent(train, posterior=posterior)
    t = time.perf_counter()
    model.train(enable_progress_bar=False)
    out["train"] = {"train_seconds": round(time.perf_counter() - t, 1), "epochs": len(model.history)}
    out["knn15_celltype_heldout"] = round(float(knn_transfer_accuracy(
        model.get_latent_representation(), train.obs["cell_type"].to_numpy(),
        model.get_latent_representation(test), test.obs["cell_type"].to_numpy(), k=15,
    )), 4)
    print(json.dumps(out), flush=True)
    keys = ("log_px", "elbo_refined", "elbo_amortized", "approximation_gap", "amortization_gap")
    rows = []
    for k in ks:
        _, s = model.get_inference_gap(test, refine_steps=k, n_samples=n_samples, seed=0)
        row = {"K": k, **{f"mean_{key}": round(float(s[f"mean_{key}"]), 3) for key in keys}}
        row.update({f"mean_{key}_se": round(float(s[f"mean_{key}_se"]), 4) for key in keys})
        row.update(
            max_log_px_se=round(float(s["max_log_px_se"]), 3), frac_cells_ordered=round(float(s["frac_cells_ordered"]), 3),
            refine_seconds=round(float(s["refine_seconds"]), 1), seconds=round(float(s["seconds"]), 1),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("| K | log p(x) | ELBO(q*) | ELBO(q_enc) | approximation gap | amortization gap | MC s.e. log p(x) (mean / max cell) | cells ordered | seconds (refine) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['K']} | {r['mean_log_px']:.2f} ± {r['mean_log_px_se']:.3f} | {r['mean_elbo_refined']:.2f} ± {r['mean_elbo_refined_se']:.3f}"
            f" | {r['mean_elbo_amortized']:.2f} ± {r['mean_elbo_amortized_se']:.3f} | {r['mean_approximation_gap']:.2f} ± {r['mean_approximation_gap_se']:.3f}"
            f" | {r['mean_amortization_gap']:.2f} ± {r['mean_amortization_gap_se']:.3f} | {r['mean_log_px_se']:.3f} / {r['max_log_px_se']:.2f}"
            f" | {r['frac_cells_ordered']:.3f} | {r['seconds']:.0f} ({r['refine_seconds']:.0f}) |",
            flush=True,
        )
    out["decomposition"] = rows
    return out


FAMILY_K = 200


def _family_rows(model, train, sets: dict, n_samples: int) -> list[dict]:
    """Decomposition and 15-NN cell-type accuracy of ``model`` on each ``name -> (data, modality)``."""
    from sclatent.tools import knn_transfer_accuracy

    rows = []
    keys = ("log_px", "elbo_refined", "elbo_amortized", "approximation_gap", "amortization_gap")
    for name, (data, modality) in sets.items():
        _, s = model.get_inference_gap(data, modality=modality, refine_steps=FAMILY_K, n_samples=n_samples, seed=0)
        reference = model.get_latent_representation(train, modality=modality)
        query = model.get_latent_representation(data, modality=modality)
        row = {"set": name, **{key: round(float(s[f"mean_{key}"]), 3) for key in keys}}
        row.update({f"{key}_se": round(float(s[f"mean_{key}_se"]), 4) for key in keys})
        row["knn15_celltype"] = round(float(knn_transfer_accuracy(
            reference, train.obs["cell_type"].to_numpy(), query, data.obs["cell_type"].to_numpy(), k=15)), 4)
        row["seconds"] = round(float(s["seconds"]), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_families(dataset: str, posterior: str) -> dict:
    """One posterior family on one dataset, package defaults (see the module docstring)."""
    import anndata as ad

    if dataset == "pbmc":
        train, test = _pbmc_split()
        sets, n_samples = {"heldout": (test, None)}, 1000
    elif dataset == "cellbench":
        adata = ad.read_h5ad(f"{DATA}/cellbench_3cl_celseq2_dropseq.h5ad")
        sclatent.SCLatent.setup_anndata(adata)  # batch_key=None: the Drop-seq batch is unseen
        batch = adata.obs["batch"].astype(str).to_numpy()
        cel, drop = np.flatnonzero(batch == "sc_celseq2"), np.flatnonzero(batch == "sc_dropseq")
        tr, te = _split(len(cel), 0.8)
        train = adata[cel[tr]].copy()
        sets, n_samples = {"heldout_celseq2": (adata[cel[te]].copy(), None), "shift_dropseq": (adata[drop].copy(), None)}, 1000
    elif dataset == "mop":
        import mudata as md

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mdata = md.read_h5mu(f"{DATA}/mop_snareseq2_rna_atac.h5mu")
            tr, te = _split(mdata.n_obs, 0.9)
            train, test = mdata[tr].copy(), mdata[te].copy()
        sclatent.SCLatent.setup_mudata(train, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
        sets, n_samples = {"heldout_fused": (test, None), "heldout_rna": (test, "rna"), "heldout_atac": (test, "atac")}, 250
    else:
        raise ValueError(f"unknown dataset {dataset!r}")
    out = {"dataset": dataset, "posterior": posterior, "n_train": train.n_obs, "refine_steps": FAMILY_K, "n_samples": n_samples}
    model = sclatent.SCLatent(train, posterior=posterior)
    t = time.perf_counter()
    model.train(enable_progress_bar=False)
    out["train"] = {"train_seconds": round(time.perf_counter() - t, 1), "epochs": len(model.history)}
    print(json.dumps(out), flush=True)
    out["rows"] = _family_rows(model, train, sets, n_samples)
    return out


def run_cellbench() -> dict:
    """Two technologies: train on CEL-seq2 only, infer on held-out CEL-seq2 and on all Drop-seq cells."""
    import anndata as ad

    adata = ad.read_h5ad(f"{DATA}/cellbench_3cl_celseq2_dropseq.h5ad")
    sclatent.SCLatent.setup_anndata(adata)  # batch_key=None: the Drop-seq batch is unseen
    cel = np.flatnonzero(adata.obs["batch"].astype(str).to_numpy() == "sc_celseq2")
    drop = np.flatnonzero(adata.obs["batch"].astype(str).to_numpy() == "sc_dropseq")
    tr, te = _split(len(cel), 0.8)
    train, test, shift = adata[cel[tr]].copy(), adata[cel[te]].copy(), adata[drop].copy()
    out = {"n_train": len(tr), "n_test": len(te), "n_shift": len(drop)}
    model, out["train"] = _train(train, n_latent=10, max_epochs=150, batch_size=64)
    out["heldout"] = gap_rows(model, test, marginal_ks=KS, n_mc=200)
    out["shift_dropseq"] = gap_rows(model, shift, marginal_ks=KS, n_mc=200)
    out["latent_diagnostics_heldout"] = _diagnostics(model, test)
    out["latent_diagnostics_shift"] = _diagnostics(model, shift)
    return out


def run_mop(n_eval: int = 128, max_epochs: int = 10) -> dict:
    """Paired RNA+ATAC: train on 7 libraries (90%), evaluate held-out cells and the 8th library."""
    import mudata as md

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.read_h5mu(f"{DATA}/mop_snareseq2_rna_atac.h5mu")
    libraries = sorted(mdata.obs["batch"].astype(str).unique())
    unseen = libraries[-1]
    is_unseen = mdata.obs["batch"].astype(str).to_numpy() == unseen
    seen = np.flatnonzero(~is_unseen)
    tr, te = _split(len(seen), 0.9)
    rng = np.random.default_rng(1)
    test_idx = np.sort(rng.choice(seen[te], size=min(n_eval, len(te)), replace=False))
    shift_idx = np.sort(rng.choice(np.flatnonzero(is_unseen), size=n_eval, replace=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, test, shift = mdata[seen[tr]].copy(), mdata[test_idx].copy(), mdata[shift_idx].copy()
    sclatent.SCLatent.setup_mudata(train, modalities={"rna": "rna", "atac": "atac"})
    out = {"n_train": len(tr), "n_test": len(test_idx), "n_shift": len(shift_idx), "unseen_library": unseen}
    model, out["train"] = _train(train, n_latent=10, max_epochs=max_epochs, batch_size=256)
    out["heldout"] = gap_rows(model, test, marginal_ks=(0, 20), n_mc=100)
    out["heldout_rna_only"] = gap_rows(model, test, ks=(0, 20, 100), modality="rna")
    out["heldout_atac_only"] = gap_rows(model, test, ks=(0, 20, 100), modality="atac")
    out["shift_library"] = gap_rows(model, shift, marginal_ks=(0, 20), n_mc=100)
    out["latent_diagnostics"] = {
        "fused": _diagnostics(model, test),
        "rna_only": _diagnostics(model, test, "rna"),
        "atac_only": _diagnostics(model, test, "atac"),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("experiment", choices=["pbmc", "cellbench", "mop", "all", "pbmc-decomposition", "families"])
    parser.add_argument("dataset", nargs="?", choices=["pbmc", "cellbench", "mop"], help="families: the dataset")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--posterior", choices=["diagonal", "flow"], default="diagonal", help="pbmc-decomposition: the posterior family")
    parser.add_argument("--ks", default=None, help="pbmc-decomposition: comma-separated refinement budgets (default 50,100,200,400)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    runs = {"pbmc": run_pbmc, "cellbench": run_cellbench, "mop": run_mop}
    names = list(runs) if args.experiment == "all" else [args.experiment]
    ks = DECOMPOSITION_KS if args.ks is None else tuple(int(k) for k in args.ks.split(","))
    runs["pbmc-decomposition"] = lambda: run_pbmc_decomposition(ks, posterior=args.posterior)  # not part of "all"
    runs["families"] = lambda: run_families(args.dataset, args.posterior)
    results = {}
    for name in names:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        results[name] = runs[name]()
        results[name]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
