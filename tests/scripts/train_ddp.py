"""Train on the shipped MOp subset with Lightning DDP on CPU (gloo), for tests/test_train.py.

Usage: ``python tests/scripts/train_ddp.py OUT.json DEVICES BATCH_SIZE [--unpaired]``. Lightning
starts the other ranks by running this script again; rank 0 writes the history, the
weights' checksum and the cells every rank trained on to ``OUT.json``.
"""

import json
import sys
import warnings

import mudata as md
import torch

import sclatent

out, devices, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
unpaired = "--unpaired" in sys.argv
torch.set_num_threads(1)
warnings.simplefilter("ignore")
md.set_options(pull_on_update=False)
mdata = sclatent.datasets.mop_snareseq2()
if unpaired:
    # RNA-only then ATAC-only cells, in blocks: many batches lack a modality or one kind of cell
    rna, atac = mdata.mod["rna"][:300].copy(), mdata.mod["atac"][300:600].copy()
    data = sclatent.data.organize_multiome(rna=rna, atac=atac)
    data.obs["batch"] = "all"
    sclatent.data.link_peaks_to_genes(data, annotation=sclatent.datasets.mop_gene_tss())
    sclatent.SCLatent.setup_mudata(data, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch", feature_links=True)
    extra = {"block_size": 64}
else:
    data = mdata.mod["rna"][:512].copy()
    sclatent.SCLatent.setup_anndata(data, batch_key="batch")
    extra = {}
model = sclatent.SCLatent(data, seed=0, n_latent=8)
seen = []


class Record(__import__("lightning").pytorch.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        seen.append(batch)


model.train(
    max_epochs=4, kl_warmup_epochs=0, batch_size=batch_size, accelerator="cpu", devices=devices,
    strategy="ddp" if devices > 1 else "auto", enable_progress_bar=False, callbacks=[Record()], **extra,
)
import torch.distributed as dist

mine = torch.cat(seen).unique()
if dist.is_available() and dist.is_initialized():
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine.tolist())
    rank = dist.get_rank()
else:
    gathered, rank = [mine.tolist()], 0
if rank == 0:
    checksum = float(sum(p.double().sum() for p in model.module.state_dict().values()))
    with open(out, "w") as f:
        json.dump({"history": model.history.reset_index().to_dict(orient="list"), "checksum": checksum, "cells": gathered}, f)
