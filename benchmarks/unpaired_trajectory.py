"""Alignment along training: zero (or few) paired MOp cells with links, scored every few epochs.

The split and scores of ``benchmarks/multimodal.py --protocol links`` (20 % test cells by
``numpy.random.default_rng(0).permutation``; the training cells' first ``--paired`` fraction
paired, the rest half RNA-only, half ATAC-only; links from the mm10 TSS table, 150 kb
window). Every ``--every`` epochs, and once after training, the test cells' RNA-expert and
ATAC-expert latents are scored: FOSCTTM, 1-NN and 15-NN cell-type transfer ATAC -> RNA, and
15-NN transfer ATAC -> ATAC between the two halves of the test cells (how well the ATAC
expert alone separates the cell types). Used to choose the defaults of linked models
(which epoch to keep, input dropout); ``benchmarks/RESULTS.md`` section 6 has the runs.

Usage
-----
``python benchmarks/unpaired_trajectory.py '{}' defaults`` (package defaults)
``python benchmarks/unpaired_trajectory.py '{"input_dropout": 0.5}' dropout05``
``python benchmarks/unpaired_trajectory.py '{"max_epochs": 150, "early_stopping": false, "kl_warmup_epochs": 40}' long``

The JSON holds ``SCLatent`` and ``train`` keywords, and ``paired`` (fraction, default 0),
``every`` (default 5), ``threads`` (default 1), ``model_seed`` (the model's and training's
seed, default 0) and ``dropout_by`` (``{"rna": 0.0}`` sets
one encoder's input dropout after the model is built).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

MODEL_KEYS = (
    "n_latent", "align_weight", "link_weight", "n_hidden", "n_layers", "input_dropout", "encoder_input", "dropout_rate",
    "atac_likelihood", "encode_covariates", "linked_encoder",
)


def main(argv=None) -> list[dict]:
    import lightning.pytorch as pl
    import numpy as np
    import torch

    import sclatent
    from multimodal import DATA, TSS, _views, links_split, links_training_mudata, load
    from sclatent.tools import foscttm, knn_transfer_accuracy

    argv = sys.argv[1:] if argv is None else argv
    cfg, tag = json.loads(argv[0]), argv[1]
    warnings.simplefilter("ignore")
    paired_fraction, every = cfg.pop("paired", 0.0), cfg.pop("every", 5)
    torch.set_num_threads(cfg.pop("threads", 1))
    dropout_by = cfg.pop("dropout_by", {})
    rna, atac = load(DATA, None)
    test, paired, rna_only, atac_only = links_split(rna.n_obs, 0.2, paired_fraction, 0)
    mtrain = links_training_mudata(rna, atac, paired, rna_only, atac_only, TSS)
    seed = cfg.pop("model_seed", 0)
    model = sclatent.SCLatent(mtrain, seed=seed, **{k: cfg.pop(k) for k in list(cfg) if k in MODEL_KEYS})
    cfg.setdefault("seed", seed)
    for name, rate in dropout_by.items():
        model.module.encoders[name].input_dropout = rate
    _, _, paired_test, _, _ = _views(rna, atac, test)
    labels = rna[test].obs["cell_type"].astype(str).to_numpy()
    log: list[dict] = []

    def score() -> dict:
        was = model.module.training
        z_rna = model.get_latent_representation(paired_test, modality="rna")
        z_atac = model.get_latent_representation(paired_test, modality="atac")
        model.module.train(was)
        half = len(z_atac) // 2
        return {
            "foscttm": foscttm(z_rna, z_atac),
            "knn15": knn_transfer_accuracy(z_rna, labels, z_atac, labels, k=15),
            "knn1": knn_transfer_accuracy(z_rna, labels, z_atac, labels, k=1),
            "atac_to_atac15": knn_transfer_accuracy(z_atac[:half], labels[:half], z_atac[half:], labels[half:], k=15),
            "rna_to_rna15": knn_transfer_accuracy(z_rna[:half], labels[:half], z_rna[half:], labels[half:], k=15),
        }

    class ScoreAlong(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if (trainer.current_epoch + 1) % every == 0:
                log.append({"epoch": trainer.current_epoch + 1, **score()})
                print(tag, json.dumps(log[-1]), flush=True)

    t0 = time.perf_counter()
    model.train(accelerator="cpu", devices=1, enable_progress_bar=False, callbacks=[ScoreAlong()], **cfg)
    kept = int(np.flatnonzero(model.history["kept"].to_numpy())[0])
    log.append({"epoch": "final", "epochs": len(model.history), "kept": kept, "train_s": time.perf_counter() - t0, **score()})
    print(tag, "FINAL", json.dumps(log[-1]), flush=True)
    return log


if __name__ == "__main__":
    main()
