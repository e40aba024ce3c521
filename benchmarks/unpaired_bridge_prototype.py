"""Exploration, not the product: can peak-gene links align RNA and ATAC with zero paired cells?

A prototype term, added to the model's loss from outside the package, tried before a design
for unpaired integration is chosen. For every cell with ATAC, its *gene activity* (peak
counts summed onto linked genes, ``sclatent.data.link_peaks_to_genes`` weights, each gene's
weights normalized to sum 1) is fed to the **RNA** expert, which is trained to recover the
cell's latent sample (like the sleep term, ``-log q_rna(z | activity)``, weight ``--weight``).
With ``--decoder-bridge`` the RNA decoder must also explain the activity from the ATAC
posterior's sample (NB log-likelihood, gradients into the ATAC encoder). ``--scaled``
rescales each cell's activity to the median RNA library size first. ``--mmd W`` adds W
times a maximum mean discrepancy (RBF kernels, bandwidths 0.5-8) between the latent samples
of the batch's RNA-only and ATAC-only cells (distribution matching of the two experts).

Protocol: ``../shared/data/mop_snareseq2_rna_atac.h5mu``, 20 % test cells
(``numpy.random.default_rng(0).permutation``), the training cells' first half RNA-only and
second half ATAC-only (zero paired training cells), mm10 TSS table, links within 150 kb;
``n_latent=20``, package defaults otherwise, ``--epochs`` epochs without validation.
Prints FOSCTTM between the test cells' RNA-only and ATAC-only latents and 15-NN label
transfer ATAC -> RNA. Run from the repository root:

    python benchmarks/unpaired_bridge_prototype.py --weight 5 --scaled
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weight", type=float, default=1.0, help="weight of the bridge term (0: the package as it is)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--scaled", action="store_true")
    p.add_argument("--decoder-bridge", action="store_true")
    p.add_argument("--mmd", type=float, default=0.0, help="weight of an MMD between RNA-only and ATAC-only latent samples")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    import mudata as md
    import scipy.sparse as sp
    import torch

    import sclatent
    from sclatent.inference import GaussianPosterior, poe
    from sclatent.module import LossOutput, LossTerm
    from sclatent.tools import foscttm, knn_transfer_accuracy

    torch.set_num_threads(args.threads)
    full = md.read_h5mu(SHARED / "mop_snareseq2_rna_atac.h5mu")
    rna, atac = full.mod["rna"], full.mod["atac"]
    perm = np.random.default_rng(0).permutation(full.n_obs)
    n_test = int(round(0.2 * full.n_obs))
    test, train = perm[:n_test], perm[n_test:]
    half = len(train) // 2
    links = sclatent.data.link_peaks_to_genes(full.copy(), annotation=SHARED / "annotations" / "mm10_tss_celloracle.bed")
    links = sp.csr_matrix(links / np.maximum(links.sum(1), 1e-9))
    mtrain = sclatent.data.organize_multiome(rna=rna[train[:half]].copy(), atac=atac[train[half:]].copy())
    mtrain.obs["batch"] = full.obs.loc[mtrain.obs_names, "batch"].astype(str).values
    sclatent.SCLatent.setup_mudata(mtrain, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    model = sclatent.SCLatent(mtrain, n_latent=20)
    module = model.module
    rna_median = float(np.median(np.asarray(rna[train[:half]].X.sum(1)).ravel()))
    peaks_to_genes = torch.as_tensor(links.T.toarray(), dtype=torch.float32)
    names = [m.name for m in module.modalities]
    j_rna, j_atac = names.index("rna"), names.index("atac")
    package_loss = module.loss

    def mmd(x, y):
        def k(a, b):
            d = torch.cdist(a, b).square()
            return sum(torch.exp(-d / (2 * s * s)) for s in (0.5, 1.0, 2.0, 4.0, 8.0))
        return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()

    def loss(batch, *a, **kw):
        out = package_loss(batch, *a, **kw)
        if args.mmd > 0:
            z = module.inference(batch).sample()
            r = (batch.observed[:, j_rna] > 0) & (batch.observed[:, j_atac] == 0)
            q = (batch.observed[:, j_atac] > 0) & (batch.observed[:, j_rna] == 0)
            if r.sum() > 1 and q.sum() > 1:
                value = mmd(z[r], z[q]).expand(batch.n_cells)  # a batch-level term: its mean over cells is the MMD
                out = LossOutput({**out.terms, "mmd": LossTerm(value, args.mmd)}, out.reconstruction, out.kl)
        rows = (batch.observed[:, j_atac] > 0).nonzero().squeeze(1)
        if args.weight <= 0 or not rows.numel():
            return out
        activity = batch.counts["atac"].index_select(0, rows) @ peaks_to_genes
        if args.scaled:
            activity = activity / activity.sum(1, keepdim=True).clamp_min(1e-6) * rna_median
        log_library = torch.log(activity.sum(1).clamp_min(1.0))
        sub = batch.subset(rows)
        with torch.no_grad():
            z = module.inference(sub).sample()
        x = module._counts_to_encoder_input(module.modalities[j_rna], log_library, dense=activity)
        mean, logvar = module.encoders["rna"](x, sub.covariates)
        value = -GaussianPosterior(*poe(mean[None], logvar[None], torch.ones(len(rows), 1))).log_prob(z)
        if args.decoder_bridge:
            fake = type(sub)({"rna": activity}, sub.observed, sub.log_library.clone(), sub.covariates)
            fake.log_library[:, j_rna] = log_library
            dist = module.generative(module.inference(sub).sample(), fake, ("rna",))["rna"]
            value = value - dist.log_prob(activity).sum(-1)
        terms = {**out.terms, "bridge": LossTerm(torch.zeros(batch.n_cells).index_add(0, rows, value), args.weight)}
        return LossOutput(terms, out.reconstruction, out.kl)

    module.loss = loss
    t = time.perf_counter()
    model.train(max_epochs=args.epochs, validation_size=0.0, early_stopping=False, enable_progress_bar=False, accelerator="cpu")
    wall = time.perf_counter() - t
    te = md.MuData({"rna": rna[test].copy(), "atac": atac[test].copy()})
    te.obs["batch"] = full.obs.iloc[test]["batch"].astype(str).values
    z_rna = model.get_latent_representation(te, modality="rna")
    z_atac = model.get_latent_representation(te, modality="atac")
    labels = full.obs.iloc[test]["cell_type"].astype(str).to_numpy()
    print(f"weight={args.weight} scaled={args.scaled} decoder_bridge={args.decoder_bridge} mmd={args.mmd} epochs={args.epochs} "
          f"FOSCTTM={foscttm(z_rna, z_atac):.3f} knn15={knn_transfer_accuracy(z_rna, labels, z_atac, labels):.3f} "
          f"train_s={wall:.0f}")


if __name__ == "__main__":
    main()
