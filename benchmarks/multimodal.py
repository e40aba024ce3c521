"""Paired + unpaired RNA/ATAC benchmark: sclatent vs MULTIVI, and with peak-gene links vs GLUE.

Protocol ``--protocol unpair`` (default)
----------------------------------------
* Data: the paired MOp SNARE-seq2 MuData (6,968 cells; rna 1,677 genes; atac 25,734
  peaks; ``obs["batch"]`` 8 libraries, ``obs["cell_type"]``).
* Split the cells into train and test (20 % test, ``numpy.random.default_rng(seed)``).
* In the training set a fraction ``f`` of the cells is made unpaired: half of them keep
  only their RNA (RNA-only), the other half only their ATAC (ATAC-only); the remaining
  ``1 - f`` stay paired. (Reading f as "f RNA-only and another f ATAC-only" could not
  hold for f = 0.75, so f is the total unpaired fraction, split evenly.)
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

Protocol ``--protocol links`` (RNA and ATAC from different cells)
-----------------------------------------------------------------
* 20 % test cells (the first of ``numpy.random.default_rng(seed).permutation``); of the
  training cells the first ``--paired-fractions`` stay paired and the rest split into a
  first half RNA-only and a second half ATAC-only (0: no paired training cell).
* sclatent with **package defaults** (``SCLatent(mdata)``, ``train()``), with
  ``feature_links=True`` (links from ``--annotation``, 150 kb window) and without;
  ``--tuned '{"align_weight": 50}'`` gives a marked non-default row instead.
  ``--links glue`` runs GLUE (scglue, the ``bench`` extra, Debian's ``bedtools``) on the
  same split (:func:`run_glue`).
* Test cells: FOSCTTM, 1-NN and 15-NN transfer ATAC -> RNA with the majority-class
  baseline, imputation correlations, epochs, seconds per epoch, training wall time.

Usage
-----
``python benchmarks/multimodal.py --protocol links --paired-fractions 0 0.01 0.05 0.5 --links with without``;
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


# ------------------------------------------------------------- unpaired (feature links)
TSS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "annotations", "mm10_tss_celloracle.bed")


def links_split(n: int, test_fraction: float, paired_fraction: float, seed: int):
    """Test cells, then paired, RNA-only and ATAC-only training cells, in permutation order.

    ``perm = default_rng(seed).permutation(n)``; the first ``test_fraction`` are the test
    cells; of the rest, the first ``paired_fraction`` stay paired and the remainder's first
    half keeps only its RNA, the second half only its ATAC.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test_fraction * n))
    test, train = perm[:n_test], perm[n_test:]
    n_paired = int(round(paired_fraction * len(train)))
    paired, rest = train[:n_paired], train[n_paired:]
    half = len(rest) // 2
    return test, paired, rest[:half], rest[half:]


def _views(rna, atac, test):
    import mudata as md

    r_te, a_te = rna[test].copy(), atac[test].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paired_te = md.MuData({"rna": r_te, "atac": a_te})
        rna_view = md.MuData({"rna": r_te, "atac": a_te[:0]})
        atac_view = md.MuData({"rna": r_te[:0], "atac": a_te})
    for v in (paired_te, rna_view, atac_view):
        v.obs = r_te.obs.loc[v.obs_names].copy()
    return r_te, a_te, paired_te, rna_view, atac_view


def transfer_scores(z_rna, z_atac, labels) -> dict:
    from sclatent.tools import knn_transfer_accuracy

    majority = float(pd.Series(labels).value_counts(normalize=True).iloc[0])
    return {
        "knn1_atac_to_rna": knn_transfer_accuracy(z_rna, labels, z_atac, labels, k=1),
        "knn15_atac_to_rna": knn_transfer_accuracy(z_rna, labels, z_atac, labels, k=15),
        "majority": majority,
    }


def links_training_mudata(rna, atac, paired, rna_only, atac_only, annotation: str | None):
    """The training cells of a links split as one MuData (paired, RNA-only and ATAC-only
    parts), ``obs["batch"]`` from either modality, set up for ``SCLatent``; with an
    ``annotation`` (gene positions) the peaks are linked to genes and the setup uses them."""
    import sclatent

    mtrain = sclatent.data.organize_multiome(
        paired=(rna[paired].copy(), atac[paired].copy()) if len(paired) else None,
        rna=rna[rna_only].copy() if len(rna_only) else None,
        atac=atac[atac_only].copy() if len(atac_only) else None,
    )
    mtrain.obs["batch"] = rna.obs["batch"].reindex(mtrain.obs_names).fillna(atac.obs["batch"].reindex(mtrain.obs_names)).astype(str).values
    kwargs = {}
    if annotation is not None:
        sclatent.data.link_peaks_to_genes(mtrain, annotation=annotation)
        kwargs["feature_links"] = True
    sclatent.SCLatent.setup_mudata(mtrain, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch", **kwargs)
    return mtrain


def run_sclatent_links(rna, atac, test, paired, rna_only, atac_only, with_links: bool, args, tuned: dict | None = None) -> dict:
    """sclatent with package defaults (``SCLatent(mdata)``, ``train()``), or ``tuned`` overrides, marked."""
    import torch

    import sclatent

    torch.set_num_threads(args.threads)
    mtrain = links_training_mudata(rna, atac, paired, rna_only, atac_only, args.annotation if with_links else None)
    tuned = dict(tuned or {})
    model_kwargs = {k: tuned.pop(k) for k in list(tuned) if k in ("n_latent", "align_weight", "link_weight")}
    model = sclatent.SCLatent(mtrain, seed=args.seed, **model_kwargs)
    t0 = time.perf_counter()
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False, **tuned)
    wall = time.perf_counter() - t0
    r_te, a_te, paired_te, rna_view, atac_view = _views(rna, atac, test)
    z_rna = model.get_latent_representation(paired_te, modality="rna")
    z_atac = model.get_latent_representation(paired_te, modality="atac")
    expr = model.get_normalized_expression(atac_view, library_size=1e4).loc[r_te.obs_names].to_numpy()
    acc = model.get_accessibility_estimates(rna_view).loc[r_te.obs_names].to_numpy()
    obs_expr, obs_acc = observed_targets(r_te, a_te)
    labels = r_te.obs["cell_type"].astype(str).to_numpy()
    out = evaluate(z_rna, z_atac, labels, expr, acc, obs_expr, obs_acc)
    out.update(transfer_scores(z_rna, z_atac, labels))
    hist = model.history
    out.update(
        method="sclatent" + (" + links" if with_links else ""), settings="defaults" if not model_kwargs and not tuned else f"tuned {dict(model_kwargs, **tuned)}",
        paired_fraction=len(paired) / (len(paired) + len(rna_only) + len(atac_only)), epochs=int(len(hist)),
        per_epoch_s=float(hist["seconds"].mean()), train_wall_s=wall,
        n_paired=len(paired), n_rna_only=len(rna_only), n_atac_only=len(atac_only), n_latent=model.module.n_latent,
    )
    return out


def run_glue(rna, atac, test, paired, rna_only, atac_only, args) -> dict:
    """GLUE (scglue) with its tutorial settings and the batch covariate, on the same split.

    The RNA PCA and ATAC LSI are fitted on the training cells and the test cells projected
    onto them; gene positions from the same TSS table; guidance graph from
    ``scglue.genomics.rna_anchored_guidance_graph`` with the same 150 kb window and GLUE's
    distance weighting. ``--glue-epochs`` caps each stage (GLUE early-stops before).
    """
    from itertools import chain

    import scglue
    import torch
    from sklearn.decomposition import PCA, TruncatedSVD

    import sclatent

    torch.set_num_threads(args.threads)
    r_tr = rna[np.concatenate([paired, rna_only])].copy()
    a_tr = atac[np.concatenate([paired, atac_only])].copy()
    if len(paired):  # GLUE has no notion of pairing: paired cells get distinct names per modality
        r_tr.obs_names = [f"rna_{c}" for c in r_tr.obs_names]
        a_tr.obs_names = [f"atac_{c}" for c in a_tr.obs_names]
    r_te, a_te = rna[test].copy(), atac[test].copy()
    genes = sclatent.data.read_gene_annotation(args.annotation)
    sclatent.data.add_gene_coordinates(r_tr, genes)
    from sclatent.data.genomic import gene_coordinates, peak_coordinates

    g = gene_coordinates(r_tr)
    keep = r_tr.var_names.isin(g.index)
    r_tr, r_te = r_tr[:, keep].copy(), r_te[:, keep].copy()
    for col in ("chrom", "chromStart", "chromEnd", "strand"):
        r_tr.var[col] = g.loc[r_tr.var_names, col].to_numpy()
        r_te.var[col] = r_tr.var[col].to_numpy()
    p = peak_coordinates(a_tr)
    for a in (a_tr, a_te):
        for col in ("chrom", "chromStart", "chromEnd"):
            a.var[col] = p[col].to_numpy()
    t0 = time.perf_counter()
    # RNA: normalize, log, scale, PCA on training cells; test cells projected
    for a in (r_tr, r_te):
        a.layers["counts"] = a.X.copy()
        a.var["highly_variable"] = True
    def lognorm(a):
        x = a.X.multiply(1e4 / np.maximum(np.asarray(a.X.sum(1)), 1)).tocsr()
        return np.log1p(x.toarray())
    x_tr, x_te = lognorm(r_tr), lognorm(r_te)
    mean, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    pca = PCA(100, random_state=0).fit(np.clip((x_tr - mean) / sd, -10, 10))
    r_tr.obsm["X_pca"] = pca.transform(np.clip((x_tr - mean) / sd, -10, 10))
    r_te.obsm["X_pca"] = pca.transform(np.clip((x_te - mean) / sd, -10, 10))
    # ATAC: TF-IDF + LSI (scglue.data.lsi's recipe) fitted on training cells
    def tfidf(x, idf):
        tf = x.multiply(1 / np.maximum(np.asarray(x.sum(1)), 1)).tocsr()
        return np.log1p(tf.multiply(idf).tocsr() * 1e4)
    idf = a_tr.n_obs / np.maximum(np.asarray(a_tr.X.sum(0)).ravel(), 1)
    svd = TruncatedSVD(100, n_iter=15, random_state=0).fit(tfidf(a_tr.X, idf))
    def lsi(a):
        z = svd.transform(tfidf(a.X, idf))
        return (z - z.mean(1, keepdims=True)) / z.std(1, ddof=1, keepdims=True)
    a_tr.obsm["X_lsi"], a_te.obsm["X_lsi"] = lsi(a_tr), lsi(a_te)
    for a in (a_tr, a_te):
        a.layers["counts"] = a.X.copy()
        a.var["highly_variable"] = True
    guidance = scglue.genomics.rna_anchored_guidance_graph(r_tr, a_tr, promoter_len=2000, extend_range=150000)
    scglue.models.configure_dataset(r_tr, "NB", use_highly_variable=True, use_layer="counts", use_rep="X_pca", use_batch="batch")
    scglue.models.configure_dataset(a_tr, "NB", use_highly_variable=True, use_rep="X_lsi", use_batch="batch")
    guidance_hvf = guidance.subgraph(chain(r_tr.var_names, a_tr.var_names)).copy()
    workdir = os.path.join(args.glue_dir, f"p{len(paired)}")
    import ignite.engine

    runs, run_engine = {}, ignite.engine.Engine.run

    def counting_run(engine, *a, **kw):  # a stage's trainer runs once; its evaluator once per epoch
        state = run_engine(engine, *a, **kw)
        calls, _ = runs.get(id(engine), (0, 0))
        runs[id(engine)] = (calls + 1, int(engine.state.epoch))
        return state

    ignite.engine.Engine.run = counting_run
    t_fit = time.perf_counter()
    glue = scglue.models.fit_SCGLUE(
        {"rna": r_tr, "atac": a_tr}, guidance_hvf,
        init_kws={"random_seed": args.seed}, fit_kws={"directory": workdir, "max_epochs": args.glue_epochs},
    )
    wall, fit_wall = time.perf_counter() - t0, time.perf_counter() - t_fit
    ignite.engine.Engine.run = run_engine
    stage_epochs = [epoch for calls, epoch in runs.values() if calls == 1]
    for a, src in ((r_te, r_tr), (a_te, a_tr)):
        a.uns.update({k: v for k, v in src.uns.items() if k == "__scglue__"})
    z_rna, z_atac = glue.encode_data("rna", r_te), glue.encode_data("atac", a_te)
    labels = r_te.obs["cell_type"].astype(str).to_numpy()
    from sclatent.tools import foscttm

    out = {"foscttm": foscttm(z_rna, z_atac), **transfer_scores(z_rna, z_atac, labels)}
    out.update(
        method="GLUE", settings=f"tutorial, batch covariate, stages capped at {args.glue_epochs} epochs",
        paired_fraction=len(paired) / (len(paired) + len(rna_only) + len(atac_only)), train_wall_s=wall,
        n_paired=len(paired), n_rna_only=len(rna_only), n_atac_only=len(atac_only), n_latent=50,
        n_guidance_edges=int(guidance_hvf.number_of_edges()), stage_epochs=stage_epochs, epochs=int(sum(stage_epochs)),
        per_epoch_s=fit_wall / max(sum(stage_epochs), 1),
    )
    return out


LINK_COLUMNS = [
    ("paired_fraction", "paired", "{:.0%}"), ("method", "method", "{}"), ("settings", "settings", "{}"),
    ("foscttm", "FOSCTTM", "{:.3f}"), ("knn1_atac_to_rna", "1-NN", "{:.3f}"), ("knn15_atac_to_rna", "15-NN", "{:.3f}"),
    ("majority", "majority", "{:.3f}"), ("rna_pearson_gene", "RNA r gene", "{:.3f}"), ("atac_pearson_region", "ATAC r region", "{:.3f}"),
    ("epochs", "epochs", "{}"), ("per_epoch_s", "s/epoch", "{:.2f}"), ("train_wall_s", "train s", "{:.0f}"),
]


def links_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[1] for c in LINK_COLUMNS) + " |"
    lines = [head, "|" + "|".join("---" for _ in LINK_COLUMNS) + "|"]
    for r in sorted(rows, key=lambda r: (r["paired_fraction"], r["method"])):
        lines.append("| " + " | ".join(fmt.format(r[k]) if r.get(k) is not None else "" for k, _, fmt in LINK_COLUMNS) + " |")
    return "\n".join(lines)


def earlier_rows(out: str) -> list[dict]:
    """Rows of an earlier run writing to ``out`` (appended to, not replaced)."""
    if not os.path.exists(out + ".json"):
        return []
    with open(out + ".json") as fh:
        return json.load(fh)["rows"]


def save_rows(out: str, rows: list[dict], table) -> None:
    """``<out>.json`` (command line and rows) and ``<out>.md`` (``table(rows)``)."""
    with open(out + ".json", "w") as fh:
        json.dump({"argv": sys.argv, "rows": rows}, fh, indent=1)
    with open(out + ".md", "w") as fh:
        fh.write(table(rows) + "\n")


def main_links(args) -> list[dict]:
    rna, atac = load(args.data, args.n_peaks)
    rows = earlier_rows(args.out)

    tuned = json.loads(args.tuned) if args.tuned else None
    for pf in args.paired_fractions:
        test, paired, rna_only, atac_only = links_split(rna.n_obs, args.test_fraction, pf, args.seed)
        for choice in args.links:
            if choice == "glue":
                row = run_glue(rna, atac, test, paired, rna_only, atac_only, args)
            else:
                row = run_sclatent_links(rna, atac, test, paired, rna_only, atac_only, choice == "with", args, tuned)
            rows.append(row)
            print(json.dumps(row), flush=True)
            save_rows(args.out, rows, links_table)
    print(links_table(rows))
    return rows


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
    p.add_argument("--protocol", choices=["unpair", "links"], default="unpair",
                   help="'links': zero/few paired cells, with and without peak-gene links, package defaults")
    p.add_argument("--paired-fractions", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.5])
    p.add_argument("--links", nargs="+", default=["with", "without"], choices=["with", "without", "glue"])
    p.add_argument("--annotation", default=TSS, help="gene positions (BED/CSV/TSV) on the peaks' assembly")
    p.add_argument("--tuned", default=None, help="JSON of SCLatent/train overrides for a marked, non-default row")
    p.add_argument("--glue-epochs", type=int, default=80)
    p.add_argument("--glue-dir", default=os.path.join(HERE, "results", "glue_work"))
    args = p.parse_args(argv)
    if args.protocol == "links":
        import torch

        torch.set_num_threads(args.threads)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        return main_links(args)

    import torch

    torch.set_num_threads(args.threads)
    rna, atac = load(args.data, args.n_peaks)
    train, test = split(rna.n_obs, args.test_fraction, args.seed)
    print(f"{rna.n_obs} cells ({len(train)} train, {len(test)} test); {rna.n_vars} genes, {atac.n_vars} peaks", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    rows = earlier_rows(args.out)

    def save():
        save_rows(args.out, rows, markdown_table)

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
