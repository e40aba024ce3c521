"""Query mapping on CellBench: a CEL-seq2 reference, the Drop-seq cells mapped as a query.

Protocol
--------
* Data: CellBench (shared, 450 cells of 3 cell lines; ``obs["batch"]`` CEL-seq2 /
  Drop-seq), the 2,000 genes with the most counts. Reference: the CEL-seq2 cells;
  query: the Drop-seq cells (a batch the reference never saw).
* sclatent with package defaults (``SCLatent(ref)``, ``train()``) for the reference, then
  (a) de novo: one model trained on reference + query together (package defaults);
  (b) ``SCLatent.load_query_data(query, reference).train()`` (only the new batch's rows train);
  (b') the same with ``fine_tune=("encoders",)``;
  (c) ``load_query_data`` then ``map_by_refinement()`` (no training loop), the latents with
      ``get_latent_representation(refine_steps=100)`` for the query, and for the reference
      both without refinement (c) and with the same refinement (c');
  (d) scvi-tools ``SCVI`` (when installed): reference with its defaults, then
      ``SCVI.load_query_data(query, reference)`` and ``train(max_epochs=200,
      plan_kwargs={"weight_decay": 0.0})`` as in its tutorial.
* Scores on the query cells: kNN (k = 15) cell-type transfer from the reference latents;
  batch mixing as the fraction of each query cell's 15 nearest neighbours (among
  reference + query latents) that are query cells (1 = not mixed; 0.47, the query's
  share of the cells, when fully mixed);
  the query's ELBO per cell (KL weight 1, all constants; sclatent ``get_elbo``, scvi-tools
  via ``benchmarks/peers.py: evaluate_scvi``); wall time of the mapping step.

Multimodal case (``--mop``)
--------------------------
* Data: the shared MOp SNARE-seq2 MuData (6,968 nuclei, paired RNA + ATAC, 8 libraries).
  Reference: the paired cells of the first four libraries (sorted names), package
  defaults; query: the ATAC only of the other four libraries' cells (a MuData with no RNA),
  mapped with ``load_query_data`` + ``train()`` and with ``map_by_refinement()``; against
  (a) de novo training on the reference plus the ATAC-only query cells.
* Scores: 15-NN cell-type transfer from the reference's fused latents to the query's
  ATAC latents; batch mixing as above (the query's share of the cells); FOSCTTM of the query
  cells' ATAC latent against their held-back RNA embedded by the reference's RNA expert
  (0.5 = random); imputed-expression gene-wise Pearson correlation against the held-back RNA.

Usage
-----
``python benchmarks/query_mapping.py --threads 2 --out benchmarks/results/query_mapping.json``
``python benchmarks/query_mapping.py --mop --threads 2 --out benchmarks/results/query_mapping_mop.json``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")


def load():
    import anndata as ad

    a = ad.read_h5ad(os.path.join(SHARED, "cellbench_3cl_celseq2_dropseq.h5ad"))
    totals = np.asarray(a.X.sum(0)).ravel()
    a = a[:, np.sort(np.argsort(-totals)[:2000])].copy()
    a.obs["batch"] = a.obs["batch"].astype(str)
    batch = a.obs["batch"]
    ref_name = [b for b in batch.unique() if "cel" in b.lower()][0]
    return a[batch == ref_name].copy(), a[batch != ref_name].copy()


def scores(z_ref, z_query, ref, query) -> dict:
    from sklearn.neighbors import KNeighborsClassifier

    cell = KNeighborsClassifier(15).fit(z_ref, ref.obs["cell_type"].astype(str))
    transfer = float((cell.predict(z_query) == query.obs["cell_type"].astype(str).to_numpy()).mean())
    joint = np.concatenate([z_ref, z_query])
    labels = np.r_[np.zeros(len(z_ref)), np.ones(len(z_query))]
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=16).fit(joint)
    _, idx = nn.kneighbors(z_query)
    same = (labels[idx[:, 1:]] == 1).mean()  # query cells' neighbours from the query batch
    return {"celltype_transfer": transfer, "query_batch_knn_acc": float(same)}


def mop(args) -> None:
    """The multimodal case: an ATAC-only query onto a paired reference (see the docstring)."""
    import mudata as md
    import torch

    import sclatent
    from sclatent.tools import foscttm, pearson_genewise

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    md.set_options(pull_on_update=False)
    quiet = dict(accelerator="cpu", devices=1, enable_progress_bar=False)
    mdata = md.read_h5mu(os.path.join(SHARED, "mop_snareseq2_rna_atac.h5mu"))
    mdata.obs["batch"] = mdata.mod["rna"].obs["batch"].reindex(mdata.obs_names).astype(str).values
    libraries = sorted(mdata.obs["batch"].unique())
    in_ref = mdata.obs["batch"].isin(libraries[:4]).to_numpy()
    ref = mdata[in_ref].copy()
    ref.obs["batch"] = ref.obs["batch"].astype(str)
    query_cells = mdata.obs_names[~in_ref]
    atac = mdata.mod["atac"][query_cells].copy()
    rna_truth = mdata.mod["rna"][query_cells].copy()
    labels_ref = mdata.mod["rna"].obs["cell_type"].reindex(ref.obs_names).astype(str).to_numpy()
    labels_q = mdata.mod["rna"].obs["cell_type"].reindex(query_cells).astype(str).to_numpy()

    def query_data():
        q = sclatent.data.organize_multiome(atac=atac.copy())
        q.obs["batch"] = atac.obs["batch"].astype(str).values
        return q

    sclatent.SCLatent.setup_mudata(ref, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    t0 = time.perf_counter()
    reference = sclatent.SCLatent(ref, seed=args.seed).train(**quiet)
    print(f"reference: {len(reference.history)} epochs in {time.perf_counter() - t0:.0f} s", flush=True)
    z_ref = reference.get_latent_representation()
    truth_view = sclatent.data.organize_multiome(rna=rna_truth.copy())
    truth_view.obs["batch"] = rna_truth.obs["batch"].astype(str).values
    observed = np.asarray(rna_truth.X.todense() if hasattr(rna_truth.X, "todense") else rna_truth.X, dtype=np.float64)
    observed = observed / np.maximum(observed.sum(1, keepdims=True), 1) * 1e4
    rows = []

    def report(name, model, seconds, z_query, expr):
        # the query's held-back RNA, embedded by the RNA expert (read with the query model's registry,
        # which knows the query's libraries)
        z_truth = model.get_latent_representation(truth_view, modality="rna")
        row = {"method": name, "seconds": seconds, **scores_from(z_ref, z_query, labels_ref, labels_q),
               "foscttm_atac_vs_rna": float(foscttm(z_query, z_truth)),
               "imputed_expression_r_gene": float(np.nanmean(pearson_genewise(expr, observed)))}
        rows.append(row)
        print(json.dumps(row), flush=True)

    for label, refine in (("(b) load_query_data + train()", False), ("(c) load_query_data + map_by_refinement()", True)):
        q = query_data()
        t0 = time.perf_counter()
        model = sclatent.SCLatent.load_query_data(q, reference)
        if refine:
            model.map_by_refinement()
            z_query = model.get_latent_representation(refine_steps=100)
        else:
            model.train(**quiet)
            z_query = model.get_latent_representation()
        seconds = time.perf_counter() - t0
        expr = model.get_normalized_expression(library_size=1e4).to_numpy()
        report(label, model, seconds, z_query, expr)
    # (a) de novo on the reference plus the ATAC-only query cells
    both = sclatent.data.organize_multiome(
        paired=(ref.mod["rna"].copy(), ref.mod["atac"].copy()), atac=atac.copy()
    )
    both.obs["batch"] = pd_batch(both, ref, atac)
    sclatent.SCLatent.setup_mudata(both, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    t0 = time.perf_counter()
    joint = sclatent.SCLatent(both, seed=args.seed).train(**quiet)
    seconds = time.perf_counter() - t0
    z = joint.get_latent_representation()
    pos = both.obs_names.get_indexer(query_cells)
    z_ref_joint = z[both.obs_names.get_indexer(ref.obs_names)]
    expr = joint.get_normalized_expression(library_size=1e4).to_numpy()[pos]
    z_truth = joint.get_latent_representation(truth_view, modality="rna")
    row = {"method": "(a) de novo on reference + ATAC-only query", "seconds": seconds,
           **scores_from(z_ref_joint, z[pos], labels_ref, labels_q),
           "foscttm_atac_vs_rna": float(foscttm(z[pos], z_truth)),
           "imputed_expression_r_gene": float(np.nanmean(pearson_genewise(expr, observed)))}
    rows.append(row)
    print(json.dumps(row), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"reference_epochs": len(reference.history), "rows": rows}, f, indent=1)


def pd_batch(both, ref, atac):
    import pandas as pd

    batch = pd.concat([ref.obs["batch"].astype(str), atac.obs["batch"].astype(str)])
    return batch.reindex(both.obs_names).to_numpy()


def scores_from(z_ref, z_query, labels_ref, labels_q) -> dict:
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    transfer = float((KNeighborsClassifier(15).fit(z_ref, labels_ref).predict(z_query) == labels_q).mean())
    joint = np.concatenate([z_ref, z_query])
    is_query = np.r_[np.zeros(len(z_ref)), np.ones(len(z_query))]
    _, idx = NearestNeighbors(n_neighbors=16).fit(joint).kneighbors(z_query)
    return {"celltype_transfer": transfer, "query_batch_knn_acc": float(is_query[idx[:, 1:]].mean()),
            "query_share": float(len(z_query) / len(joint))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-scvi", action="store_true")
    p.add_argument("--mop", action="store_true", help="the multimodal case (ATAC-only query onto paired MOp)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "query_mapping.json"))
    args = p.parse_args()
    if args.mop:
        if args.out == os.path.join(HERE, "results", "query_mapping.json"):
            args.out = os.path.join(HERE, "results", "query_mapping_mop.json")
        mop(args)
        return
    import torch

    import sclatent

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    quiet = dict(accelerator="cpu", devices=1, enable_progress_bar=False)
    ref, query = load()
    rows = []

    def add(name, z_ref, z_query, seconds, elbo, **extra):
        row = {"method": name, "seconds": seconds, "query_elbo": elbo, **scores(z_ref, z_query, ref, query), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    sclatent.SCLatent.setup_anndata(ref, batch_key="batch")
    t0 = time.perf_counter()
    reference = sclatent.SCLatent(ref, seed=args.seed).train(**quiet)
    ref_s = time.perf_counter() - t0
    z_ref = reference.get_latent_representation()
    # (a) de novo on both
    import anndata as ad

    both = ad.concat([ref, query])
    both.obs_names_make_unique()
    sclatent.SCLatent.setup_anndata(both, batch_key="batch")
    t0 = time.perf_counter()
    joint = sclatent.SCLatent(both, seed=args.seed).train(**quiet)
    seconds = time.perf_counter() - t0
    z = joint.get_latent_representation()
    add("(a) de novo on reference + query", z[: ref.n_obs], z[ref.n_obs :], seconds,
        float(joint.get_elbo(both[ref.n_obs :].copy(), n_samples=8)), epochs=len(joint.history))
    # (b) query training
    for label, fine_tune in (("(b) load_query_data + train()", ()), ("(b') load_query_data(fine_tune=encoders) + train()", ("encoders",))):
        q = query.copy()
        t0 = time.perf_counter()
        model = sclatent.SCLatent.load_query_data(q, reference, fine_tune=fine_tune)
        model.train(**quiet)
        seconds = time.perf_counter() - t0
        add(label, z_ref, model.get_latent_representation(), seconds, float(model.get_elbo(n_samples=8)), epochs=len(model.history))
    # (c) refinement, no training loop
    q = query.copy()
    t0 = time.perf_counter()
    model = sclatent.SCLatent.load_query_data(q, reference)
    model.map_by_refinement()
    z_query = model.get_latent_representation(refine_steps=100)
    seconds = time.perf_counter() - t0
    elbo = float(model.get_elbo(n_samples=8, refine_steps=100))
    add("(c) load_query_data + map_by_refinement(), query refined", z_ref, z_query, seconds, elbo)
    add("(c') the same, reference latents refined too", reference.get_latent_representation(refine_steps=100), z_query, seconds, elbo)
    encoder_only = sclatent.SCLatent.load_query_data(query.copy(), reference)
    add("(0) load_query_data, nothing fitted (the reference's encoder)", z_ref, encoder_only.get_latent_representation(), 0.0,
        float(encoder_only.get_elbo(n_samples=8)))
    # (d) scvi-tools
    if not args.no_scvi:
        try:
            import scvi
        except ImportError:
            scvi = None
            print("scvi-tools is not installed: (d) skipped")
        if scvi is not None:
            from peers import evaluate_scvi

            r = ref.copy()
            scvi.model.SCVI.setup_anndata(r, batch_key="batch")
            scvi.settings.seed = args.seed
            vae = scvi.model.SCVI(r)
            vae.train(accelerator="cpu", devices=1, enable_progress_bar=False)
            q = query.copy()
            t0 = time.perf_counter()
            mapped = scvi.model.SCVI.load_query_data(q, vae)
            mapped.train(max_epochs=200, plan_kwargs={"weight_decay": 0.0}, accelerator="cpu", devices=1, enable_progress_bar=False)
            seconds = time.perf_counter() - t0
            ev = evaluate_scvi(mapped, q, compute_marginal_ll=False, elbo_n_samples=8, n_threads=args.threads)
            add("(d) scvi-tools SCVI.load_query_data + train(200, wd=0)", vae.get_latent_representation(),
                mapped.get_latent_representation(q), seconds, float(ev["elbo"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"reference_train_s": ref_s, "reference_epochs": len(reference.history), "rows": rows}, f, indent=1)
    print("| method | cell-type transfer | query batch kNN acc | query ELBO/cell | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['celltype_transfer']:.3f} | {r['query_batch_knn_acc']:.3f} | {r['query_elbo']:.1f} | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
