"""Cell-type resolution of a flow posterior on paired RNA + ATAC (MOp), against the diagonal one.

The split of ``benchmarks/amortization_gap.py families mop`` (90 % of the shared
``mop_snareseq2_rna_atac.h5mu`` cells for training by ``numpy.random.default_rng(0)``, the
rest held out; ``batch_key="batch"``). Trains ``SCLatent(train, **init)`` and
``train(**train_kwargs)`` (package defaults when both are empty), then reports the 15-NN
cell-type accuracy from the training cells' latents to the held-out cells', fused and
through each expert alone, for three points that can stand for a cell:

* ``location``: what ``get_latent_representation`` returns (for a flow, the image of the
  base mean through the flow);
* ``draw_mean16``: the mean of 16 posterior draws (flow only);
* ``base_mean``: the base Gaussian's mean, before the flow (flow only).

Usage
-----
``python benchmarks/flow_multimodal.py '{}'`` (diagonal, package defaults)
``python benchmarks/flow_multimodal.py '{"init": {"posterior": "flow"}}'``
``python benchmarks/flow_multimodal.py '{"init": {"posterior": "flow"}, "sleep_weight": 0}'``

The JSON holds ``init`` (``SCLatent`` keywords) and ``train`` keywords. One thread; about
ten minutes a run, so two can run side by side on two cores.
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


def main() -> dict:
    import mudata as md
    import numpy as np
    import torch

    import sclatent
    from amortization_gap import DATA, _split
    from sclatent.tools import knn_transfer_accuracy

    config = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    init = config.pop("init", {})
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    mdata = md.read_h5mu(f"{DATA}/mop_snareseq2_rna_atac.h5mu")
    tr, te = _split(mdata.n_obs, 0.9)
    train, test = mdata[tr].copy(), mdata[te].copy()
    sclatent.SCLatent.setup_mudata(train, modalities={"rna": "rna", "atac": "atac"}, batch_key="batch")
    model = sclatent.SCLatent(train, **init)
    start = time.perf_counter()
    model.train(enable_progress_bar=False, **config)
    out = {"init": init, "train": config, "epochs": len(model.history), "train_seconds": round(time.perf_counter() - start, 1)}
    labels_train, labels_test = train.obs["cell_type"].to_numpy(), test.obs["cell_type"].to_numpy()

    def knn(reference: np.ndarray, query: np.ndarray) -> float:
        return round(float(knn_transfer_accuracy(reference, labels_train, query, labels_test, k=15)), 3)

    flow = model.module.posterior_flow
    for modality in (None, "rna", "atac"):
        def latent(data, **kwargs):
            return model.get_latent_representation(data, modality=modality, **kwargs)

        row = {"location": knn(latent(train), latent(test))}
        if flow is not None:
            def draw_mean(data):
                return np.mean([latent(data, give_mean=False, seed=s) for s in range(16)], 0)

            row["draw_mean16"] = knn(draw_mean(train), draw_mean(test))
            model.module.posterior_flow = None  # the same encoders, read before the flow
            try:
                row["base_mean"] = knn(latent(train), latent(test))
            finally:
                model.module.posterior_flow = flow
        out["fused" if modality is None else modality] = row
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
