"""Rebuild data/mop_snareseq2_subset.h5mu from ../shared/data/mop_snareseq2_rna_atac.h5mu.

Run from the repository root: ``python data/make_mop_subset.py``. Takes 3,000 cells at
random (numpy seed 0), keeps every gene and peak, and writes gzip-compressed CSR counts.
"""

import hashlib
import sys
from pathlib import Path

import mudata as md
import numpy as np

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mop_snareseq2_rna_atac.h5mu")
out = Path(__file__).parent / "mop_snareseq2_subset.h5mu"
mdata = md.read_h5mu(src)
rng = np.random.default_rng(0)
keep = np.sort(rng.choice(mdata.n_obs, 3000, replace=False))
sub = mdata[keep].copy()
for m in sub.mod.values():
    for col in ("batch", "cell_type", "subtype"):
        if col in m.obs and m.obs[col].dtype.name == "category":
            m.obs[col] = m.obs[col].cat.remove_unused_categories()
for col in list(sub.obs.columns):
    if sub.obs[col].dtype.name == "category":
        sub.obs[col] = sub.obs[col].cat.remove_unused_categories()
sub.write_h5mu(out, compression="gzip")
print(out, out.stat().st_size, "bytes; md5", hashlib.md5(out.read_bytes()).hexdigest())
print(sub)
