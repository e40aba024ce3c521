"""Paired + unpaired RNA/ATAC benchmark: sclatent (product of experts) vs MULTIVI.

Protocol (issue 3, item 5)
--------------------------
* Data: the paired MOp SNARE-seq2 MuData (6,968 cells; rna 1,677 genes; atac 25,734
  peaks; ``obs["batch"]`` 8 libraries, ``obs["cell_type"]``).
* Split the cells into train and test (20 % test, ``numpy.random.default_rng(seed)``).
* In the training set a fraction ``f`` of the cells is made unpaired: half of them keep
  only their RNA (RNA-only), the other half only their ATAC (ATAC-only); the remaining
  ``1 - f`` stay paired. (The issue's "a fraction f RNA-only and another f ATAC-only"
  cannot hold for f = 0.75, so f is read as the total unpaired fraction, split evenly.)
  For sclatent an unpaired cell is simply absent from the other modality's AnnData
  (:func:`sclatent.data.organize_multiome`); MULTIVI (scvi-tools 1.4) detects unpaired
  cells from all-zero rows, so its training MuData has the missing modality zeroed.
* Train on all training cells (no validation split, no early stopping).
* On the (paired) test cells: the RNA-only latent (RNA expert alone) and the ATAC-only
  latent (ATAC expert alone) of every cell; FOSCTTM between them (scglue's definition,
  both directions averaged); kNN (k = 15) cell-type accuracy of the ATAC-only latents
  against the labelled RNA-only latents; Pearson correlation, gene-wise (mean over
  features) and cell-wise (mean over cells), of
  - expression imputed from the ATAC-only view vs observed normalized RNA
    (counts / total * 1e4),
  - accessibility imputed from the RNA-only view vs observed binarized ATAC.
  Features that are constant over the test cells (correlation undefined) are skipped.
* Time per epoch: mean of ``model.history["seconds"]`` for sclatent, of the epoch timer
  of :mod:`peers` for MULTIVI.

Usage
-----
``python benchmarks/multimodal.py --fractions 0 0.25 0.5 0.75 --with-multivi --out benchmarks/results/multimodal``
writes ``<out>.json`` and ``<out>.md`` (rows are appended to an existing ``<out>.json``).
``--atac-likelihoods poisson nb bernoulli`` runs sclatent once per ATAC likelihood (the
extra ones only at ``--likelihood-fractions``, default all). ``--multivi-epochs`` defaults
to the protocol's 100; ``--threads`` sets the torch threads of both methods. The commands
behind benchmarks/RESULTS.md are listed there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

DATA = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "mop_snareseq2_rna_atac.h5mu")


# ----------------------------------------------------------------------------- data
def load(path: str, n_peaks: int | None):
    import mudata as md

    md.set_options(pull_on_update=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mdata = md.read_h5mu(path)
    rna, atac = mdata.mod["rna"], mdata.mod["atac"]
    obs = mdata.obs[["batch", "cell_type"]].copy() if "batch" in mdata.obs else rna.obs[["batch", "cell_type"]].copy()
    obs = obs.loc[rna.obs_names]
    atac = atac[rna.obs_names]
    if n_peaks:  # optional reduction: the most often accessible peaks
        detected = np.asarray((atac.X > 0).sum(0)).ravel()
        atac = atac[:, np.sort(np.argsort(-detected, kind="stable")[:n_peaks])]
    import anndata as ad

    def clean(a):
        return ad.AnnData(X=sp.csr_matrix(a.X, dtype=np.float32), obs=obs.copy(), var=pd.DataFrame(index=a.var_names.astype(str)))

    return clean(rna), clean(atac)


def split(n: int, test_fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_test = int(round(test_fraction * n))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def unpair(train: np.ndarray, f: float, seed: int):
    """Split training cell indices into paired, RNA-only and ATAC-only (f/2 each unpaired)."""
    rng = np.random.default_rng(seed + 1)
    perm = rng.permutation(train)
    n_unpaired = int(round(f * len(train)))
    n_rna = n_unpaired // 2
    rna_only = np.sort(perm[:n_rna])
    atac_only = np.sort(perm[n_rna:n_unpaired])
    paired = np.sort(perm[n_unpaired:])
    return paired, rna_only, atac_only


def observed_targets(rna, atac):
    x = rna.X
    totals = np.asarray(x.sum(1)).ravel()
    norm = sp.diags(1e4 / np.maximum(totals, 1)) @ x
    return sp.csr_matrix(norm), sp.csr_matrix((atac.X > 0).astype(np.float32))


def evaluate(z_rna, z_atac, labels, expr_from_atac, acc_from_rna, obs_expr, obs_acc, k: int = 15) -> dict:
    from sclatent.tools import foscttm, knn_transfer_accuracy, pearson_cellwise, pearson_genewise

    expr_from_atac = np.asarray(expr_from_atac, dtype=np.float32)
    acc_from_rna = np.asarray(acc_from_rna, dtype=np.float32)
    return {
        "foscttm": foscttm(z_rna, z_atac),
        "knn_acc_atac_to_rna": knn_transfer_accuracy(z_rna, labels, z_atac, labels, k=k),
        "rna_pearson_gene": float(np.nanmean(pearson_genewise(expr_from_atac, obs_expr))),
        "rna_pearson_cell": float(np.nanmean(pearson_cellwise(expr_from_atac, obs_expr))),
        "atac_pearson_region": float(np.nanmean(pearson_genewise(acc_from_rna, obs_acc))),
        "atac_pearson_cell": float(np.nanmean(pearson_cellwise(acc_from_rna, obs_acc))),
    }


# -------------------------------------------------------------------------- sclatent
def run_sclatent(rna, atac, train, test, f, args, atac_likelihood: str) -> dict:
    import mudata as md
    import torch

    import sclatent

    torch.set_num_threads(args.threads)
    paired, rna_only, atac_only = unpair(train, f, args.seed)
    mtrain = sclatent.data.organize_multiome(
        paired=(rna[paired], atac[paired]) if len(paired) else None,
        rna=rna[rna_only] if len(rna_only) else None,
        atac=atac[atac_only] if len(atac_only) else None,
    )
    sclatent.SCLatent.setup_mudata(mtrain, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    model = sclatent.SCLatent(
        mtrain, n_latent=args.n_latent, n_hidden=args.n_hidden, atac_likelihood=atac_likelihood,
        feature_factor=("atac",) if args.feature_factor else (), input_dropout=args.input_dropout,
        encoder_input=args.encoder_input, encode_covariates=args.encode_covariates, seed=args.seed,
    )
    t0 = time.perf_counter()
    model.train(
        max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, subset_weight=args.subset_weight,
        sleep_weight=args.sleep_weight, weight_decay=args.weight_decay,
        validation_size=0.0, early_stopping=False, kl_warmup_epochs=args.kl_warmup_epochs,
        accelerator="cpu", devices=1, seed=args.seed, enable_progress_bar=False,
    )
    wall = time.perf_counter() - t0

    r_te, a_te = rna[test], atac[test]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paired_te = md.MuData({"rna": r_te, "atac": a_te})
        rna_view = md.MuData({"rna": r_te, "atac": a_te[:0]})  # the test cells without their ATAC
        atac_view = md.MuData({"rna": r_te[:0], "atac": a_te})  # ... without their RNA
    for v in (paired_te, rna_view, atac_view):
        v.obs = r_te.obs.loc[v.obs_names].copy()
    z_rna = model.get_latent_representation(paired_te, modality="rna")
    z_atac = model.get_latent_representation(paired_te, modality="atac")
    expr = model.get_normalized_expression(atac_view, library_size=1e4).loc[r_te.obs_names].to_numpy()
    acc = model.get_accessibility_estimates(rna_view).loc[r_te.obs_names].to_numpy()
    obs_expr, obs_acc = observed_targets(r_te, a_te)
    out = evaluate(z_rna, z_atac, r_te.obs["cell_type"].astype(str).to_numpy(), expr, acc, obs_expr, obs_acc)
    hist = model.history
    out.update(
        method="sclatent", atac_likelihood=atac_likelihood, f=f, epochs=int(len(hist)),
        per_epoch_s=float(hist["seconds"].mean()), train_wall_s=wall,
        n_paired=len(paired), n_rna_only=len(rna_only), n_atac_only=len(atac_only),
        final_train_loss=float(hist["train_loss"].iloc[-1]),
    )
    return out


# --------------------------------------------------------------------------- MULTIVI
def run_multivi(rna, atac, train, test, f, args) -> dict:
    import peers

    paired, rna_only, atac_only = unpair(train, f, args.seed)
    r_tr, a_tr = rna[train].copy(), atac[train].copy()
    # MULTIVI 1.4 reads "unmeasured" from all-zero rows: zero the missing modality
    keep_rna = ~np.isin(train, atac_only)
    keep_atac = ~np.isin(train, rna_only)
    r_tr.X = sp.csr_matrix(sp.diags(keep_rna.astype(np.float32)) @ r_tr.X)
    a_tr.X = sp.csr_matrix(sp.diags(keep_atac.astype(np.float32)) @ a_tr.X)
    r_tr.X.eliminate_zeros()
    a_tr.X.eliminate_zeros()
    res = peers.train_multivi((r_tr, a_tr), max_epochs=args.multivi_epochs, seed=args.seed, batch_key="batch",
                              n_threads=args.threads)
    model = res["model"]
    r_te, a_te = rna[test].copy(), atac[test].copy()
    z_rna, z_atac, _ = peers.multivi_latents(model, (r_te, a_te), batch_key="batch")
    imp = peers.multivi_imputation(model, (r_te, a_te), batch_key="batch")
    obs_expr, obs_acc = observed_targets(r_te, a_te)
    out = evaluate(z_rna, z_atac, r_te.obs["cell_type"].astype(str).to_numpy(),
                   imp["expression_from_atac"] * 1e4, imp["accessibility_from_rna"], obs_expr, obs_acc)
    out.update(
        method="MULTIVI", atac_likelihood="bernoulli (MULTIVI)", f=f, epochs=res["epochs"],
        per_epoch_s=res["per_epoch_s"], train_wall_s=res["train_wall_s"],
        n_paired=len(paired), n_rna_only=len(rna_only), n_atac_only=len(atac_only),
        n_latent=res["n_latent"],
    )
    return out


# ---------------------------------------------------------------------------- report
COLUMNS = [
    ("f", "f", "{:.2f}"), ("method", "method", "{}"), ("atac_likelihood", "ATAC lik.", "{}"),
    ("epochs", "epochs", "{}"), ("per_epoch_s", "s/epoch", "{:.1f}"), ("foscttm", "FOSCTTM", "{:.3f}"),
    ("knn_acc_atac_to_rna", "kNN acc ATAC->RNA", "{:.3f}"),
    ("rna_pearson_gene", "RNA r gene", "{:.3f}"), ("rna_pearson_cell", "RNA r cell", "{:.3f}"),
    ("atac_pearson_region", "ATAC r region", "{:.3f}"), ("atac_pearson_cell", "ATAC r cell", "{:.3f}"),
]


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in sorted(rows, key=lambda r: (r["f"], r["method"] != "sclatent", r["atac_likelihood"])):
        lines.append("| " + " | ".join(fmt.format(r[key]) if r.get(key) is not None else "" for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=DATA)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--epochs", type=int, default=15, help="sclatent epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--n-latent", type=int, default=20)
    p.add_argument("--n-hidden", type=int, default=128)
    p.add_argument("--input-dropout", type=float, default=0.0, help="SCLatent(input_dropout=...)")
    p.add_argument("--encoder-input", default="log1p", choices=["log1p", "normalized_log1p"])
    p.add_argument("--encode-covariates", action="store_true", help="SCLatent(encode_covariates=True)")
    p.add_argument("--subset-weight", type=float, default=1.0)
    p.add_argument("--sleep-weight", type=float, default=None, help="train(sleep_weight=...); default: the package's")
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--kl-warmup-epochs", type=int, default=None)
    p.add_argument("--feature-factor", action="store_true", help="learned per-region factor for ATAC")
    p.add_argument("--atac-likelihoods", nargs="+", default=["poisson"], choices=["poisson", "nb", "bernoulli"])
    p.add_argument("--likelihood-fractions", type=float, nargs="*", default=None,
                   help="fractions at which the non-first ATAC likelihoods run (default: all)")
    p.add_argument("--with-multivi", action="store_true")
    p.add_argument("--multivi-epochs", type=int, default=100)
    p.add_argument("--no-sclatent", action="store_true")
    p.add_argument("--n-peaks", type=int, default=None, help="keep only the most often accessible peaks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "multimodal"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rna, atac = load(args.data, args.n_peaks)
    train, test = split(rna.n_obs, args.test_fraction, args.seed)
    print(f"{rna.n_obs} cells ({len(train)} train, {len(test)} test); {rna.n_vars} genes, {atac.n_vars} peaks", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows: list[dict] = []
    if os.path.exists(args.out + ".json"):  # append to an earlier run of the same output
        with open(args.out + ".json") as fh:
            rows = json.load(fh)["rows"]

    def save():
        with open(args.out + ".json", "w") as fh:
            json.dump({"argv": sys.argv, "rows": rows}, fh, indent=1)
        with open(args.out + ".md", "w") as fh:
            fh.write(markdown_table(rows) + "\n")

    for f in args.fractions:
        if not args.no_sclatent:
            for i, lik in enumerate(args.atac_likelihoods):
                if i and args.likelihood_fractions is not None and f not in args.likelihood_fractions:
                    continue
                row = run_sclatent(rna, atac, train, test, f, args, lik)
                row["config"] = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "n_latent", "n_hidden",
                                                                "subset_weight", "feature_factor", "n_peaks", "threads")}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
                save()
        if args.with_multivi:
            row = run_multivi(rna, atac, train, test, f, args)
            row["config"] = {"epochs": args.multivi_epochs, "n_peaks": args.n_peaks, "threads": args.threads}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
            save()
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
