"""Cost of checking every stored count value at setup, on a million-cell matrix.

``setup_anndata`` checks each stored value (finite, non-negative, integer) in chunks of
``VALUE_CHUNK`` values. This script builds a synthetic CSR matrix of raw counts
(``--cells`` x ``--genes`` at ``--density``, float32), then times, in one process:

- ``check_counts`` alone (the value check plus the float64 row sums),
- the value check alone (``_check_values`` over ``X.data``),
- ``X.sum(axis=1)`` alone, a pass over the same data for scale.

Median of ``--repeats`` runs of each. Run from the repository root:

    python benchmarks/count_check.py --cells 1000000 --genes 2000 --density 0.05
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import scipy.sparse as sp


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from sclatent.model._convert import _check_values, check_counts

    rng = np.random.default_rng(0)
    nnz_per_row = int(args.genes * args.density)
    indptr = np.arange(args.cells + 1, dtype=np.int64) * nnz_per_row
    indices = np.tile(np.arange(nnz_per_row, dtype=np.int32), args.cells)
    data = rng.poisson(2.0, indptr[-1]).astype(np.float32) + 1
    x = sp.csr_matrix((data, indices, indptr), shape=(args.cells, args.genes))
    result = {
        "cells": args.cells, "genes": args.genes, "nnz": int(x.nnz), "data_mb": round(x.data.nbytes / 1e6, 1),
        "check_counts_s": _median_seconds(lambda: check_counts(x, "X"), args.repeats),
        "value_check_s": _median_seconds(lambda: _check_values(x.data, "X", ""), args.repeats),
        "row_sums_s": _median_seconds(lambda: x.sum(axis=1, dtype=np.float64), args.repeats),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
