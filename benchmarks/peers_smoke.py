"""Smoke test of benchmarks/peers.py on the shared real datasets (short runs).

Usage: .venv/bin/python benchmarks/peers_smoke.py [scvi|cellbench|multivi|all]
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data")  # ../shared/data


def split(n, frac=0.9, seed=0):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    k = int(round(frac * n))
    return np.sort(perm[:k]), np.sort(perm[k:])


def nb_normalisation_check():
    """scvi's NB log-pmf vs torch.distributions.NegativeBinomial (which includes lgamma(x+1))."""
    import torch
    from scvi.distributions import NegativeBinomial

    torch.manual_seed(0)
    mu = torch.rand(50, 30) * 20 + 0.1
    theta = torch.rand(50, 30) * 5 + 0.2
    x = torch.poisson(mu)
    a = NegativeBinomial(mu=mu, theta=theta).log_prob(x)
    # torch NB: p = success prob for "total_count" failures; mean = r p/(1-p) => logits = log(mu/theta)
    b = torch.distributions.NegativeBinomial(total_count=theta, logits=torch.log(mu) - torch.log(theta)).log_prob(x)
    return float((a - b).abs().max())


def run_scvi():
    import anndata as ad

    adata = ad.read_h5ad(f"{DATA}/pbmc4k_scdcc_top2000.h5ad")
    tr, te = split(adata.n_obs)
    a_tr, a_te = adata[tr].copy(), adata[te].copy()
    res = {"nb_logpmf_maxabs_diff_vs_torch": nb_normalisation_check(), "n_train": len(tr), "n_test": len(te)}

    for bs in (128, 512):
        r = peers.train_scvi(a_tr, batch_key=None, batch_size=bs, max_epochs=5, seed=0,
                             eval_adata=a_te if bs == 128 else None)
        ev = peers.evaluate_scvi(r["model"], a_te, n_mc_samples=100)
        # also scvi's own mean (to document the per-minibatch-mean quirk)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torch
            torch.manual_seed(0)
            a_te2 = a_te.copy()
            scvi_mll_mean = r["model"].get_marginal_ll(a_te2, n_mc_samples=100, batch_size=256)
            torch.manual_seed(0)
            scvi_elbo_mean = float(r["model"].get_elbo(a_te2, batch_size=256))
        res[f"bs{bs}"] = {
            "train_wall_s": r["train_wall_s"],
            "fit_loop_wall_s": r["fit_loop_wall_s"],
            "epoch_times_s": r["epoch_times_s"],
            "cells_per_s": r["cells_per_s"],
            "cells_per_s_fit_loop": r["cells_per_s_fit_loop"],
            "final_train_kl_weight": r["final_train_kl_weight"],
            "heldout_elbo": ev["elbo"],
            "heldout_marginal_ll_100": ev["marginal_ll"],
            "heldout_reconstruction_ll": ev["reconstruction_ll"],
            "heldout_kl_z": ev["kl_z"],
            "scvi_get_elbo_mean_direct": scvi_elbo_mean,
            "scvi_get_marginal_ll_mean_direct": float(scvi_mll_mean),
            "latent_shape": list(ev["latent"].shape),
            "mll_eval_s": ev["marginal_ll_eval_s"],
            "trace": r["trace"],
        }
        print(json.dumps({f"bs{bs}": {k: v for k, v in res[f"bs{bs}"].items()}}, indent=1), flush=True)
    # reproducibility: trace must not change training (same seed, with and without trace)
    r2 = peers.train_scvi(a_tr, batch_key=None, batch_size=128, max_epochs=2, seed=0, eval_adata=a_te)
    r3 = peers.train_scvi(a_tr, batch_key=None, batch_size=128, max_epochs=2, seed=0)
    import torch
    same = all(torch.equal(p, q) for p, q in zip(r2["model"].module.parameters(), r3["model"].module.parameters()))
    res["trace_does_not_perturb_training"] = bool(same)
    print("trace_does_not_perturb_training", same, flush=True)
    return res


def run_cellbench():
    import anndata as ad

    adata = ad.read_h5ad(f"{DATA}/cellbench_3cl_celseq2_dropseq.h5ad")
    tr, te = split(adata.n_obs)
    r = peers.train_scvi(adata[tr].copy(), batch_key="batch", batch_size=128, max_epochs=5, seed=0)
    ev = peers.evaluate_scvi(r["model"], adata[te].copy(), n_mc_samples=100)
    out = {"cells_per_s": r["cells_per_s"], "train_wall_s": r["train_wall_s"], "elbo": ev["elbo"],
           "marginal_ll": ev["marginal_ll"], "latent_shape": list(ev["latent"].shape)}
    print(json.dumps({"cellbench": out}, indent=1), flush=True)
    return out


def run_multivi():
    import mudata as md

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.read_h5mu(f"{DATA}/mop_snareseq2_rna_atac.h5mu")
    tr, te = split(mdata.n_obs)
    m_tr, m_te = mdata[tr].copy(), mdata[te].copy()
    r = peers.train_multivi(m_tr, max_epochs=2, seed=0, batch_key="batch")
    t = time.perf_counter()
    z_rna, z_atac, z_joint = peers.multivi_latents(r["model"], m_te, check=True)
    t_lat = time.perf_counter() - t
    imp = peers.multivi_imputation(r["model"], m_te)
    # consistency: joint is the equal-weight average of the per-modality means
    out = {
        "n_train": len(tr), "n_test": len(te),
        "train_wall_s": r["train_wall_s"], "epoch_times_s": r["epoch_times_s"],
        "per_epoch_s": r["per_epoch_s"], "cells_per_s": r["cells_per_s"],
        "n_latent": r["n_latent"], "n_hidden": r["n_hidden"],
        "z_rna_only": list(z_rna.shape), "z_atac_only": list(z_atac.shape), "z_joint": list(z_joint.shape),
        "joint_equals_mean_of_modalities_maxabs": float(np.abs(z_joint - 0.5 * (z_rna + z_atac)).max()),
        "rna_vs_atac_latent_mean_abs_diff": float(np.abs(z_rna - z_atac).mean()),
        "latents_s": t_lat,
        "imputation_shapes": {k: list(v.shape) for k, v in imp.items()},
        "expr_from_atac_rowsum_range": [float(imp["expression_from_atac"].sum(1).min()), float(imp["expression_from_atac"].sum(1).max())],
        "acc_from_rna_range": [float(imp["accessibility_from_rna"].min()), float(imp["accessibility_from_rna"].max())],
    }
    print(json.dumps({"multivi": out}, indent=1), flush=True)
    return out


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    results = {"versions": peers._versions(), "scvi_available": peers.scvi_available()}
    if what in ("scvi", "all"):
        results["pbmc_scvi"] = run_scvi()
    if what in ("cellbench", "all"):
        results["cellbench_scvi"] = run_cellbench()
    if what in ("multivi", "all"):
        results["mop_multivi"] = run_multivi()
    os.makedirs("/tmp/peers_smoke", exist_ok=True)
    with open(f"/tmp/peers_smoke/{what}.json", "w") as f:
        json.dump(results, f, indent=1, default=str)
