"""Build data/mop_gene_tss_mm10.bed: the mm10 TSS windows of the shipped MOp genes.

Rows of ``../shared/data/annotations/mm10_tss_celloracle.bed`` (celloracle 0.20.0,
Apache-2.0) whose gene symbol is one of the 1,677 genes of ``mop_snareseq2_subset.h5mu``,
unchanged and in the file's order. Run from the repository root:

    python data/make_mop_gene_tss.py
"""

from pathlib import Path

import mudata as md
import pandas as pd

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent.parent / "shared" / "data" / "annotations" / "mm10_tss_celloracle.bed"

genes = set(map(str, md.read_h5mu(HERE / "mop_snareseq2_subset.h5mu").mod["rna"].var_names))
table = pd.read_csv(SOURCE, sep="\t", header=None)
subset = table[table[3].astype(str).isin(genes)]
subset.to_csv(HERE / "mop_gene_tss_mm10.bed", sep="\t", header=False, index=False)
print(f"{len(subset)} TSS windows of {subset[3].nunique()} of {len(genes)} genes")
