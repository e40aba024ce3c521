"""Peak and gene coordinates, and the peak-gene link matrix against a brute-force computation."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from conftest import mudata_of
from sclatent.data.genomic import (
    FEATURE_LINKS_KEY,
    add_gene_coordinates,
    link_peaks_to_genes,
    parse_regions,
    peak_coordinates,
    read_gene_annotation,
)


@pytest.mark.parametrize("name", ["chr1:100-200", "chr1-100-200", "1:100-200", "chr1_100_200", "chrX:5-9"])
def test_region_names_in_each_format_parse(name):
    out = parse_regions([name])
    assert (int(out["chromStart"].iloc[0]), int(out["chromEnd"].iloc[0])) in {(100, 200), (5, 9)}
    assert out["chrom"].iloc[0] in {"chr1", "1", "chrX"}


def test_bad_region_names_are_quoted():
    with pytest.raises(ValueError, match=r"2 of 3 region names.*\['peak7', 'chr1:300'\]"):
        parse_regions(["chr1:1-2", "peak7", "chr1:300"])
    with pytest.raises(ValueError, match=r"end before they start.*chr2:50-10"):
        parse_regions(["chr2:50-10"])


def test_var_columns_take_precedence_over_names():
    atac = ad.AnnData(np.zeros((2, 2)))
    atac.var_names = ["p1", "p2"]
    atac.var["chrom"], atac.var["chromStart"], atac.var["chromEnd"] = ["chr1", "chr2"], [10, 20], [30, 40]
    assert peak_coordinates(atac)["chromEnd"].tolist() == [30, 40]


def _brute_force(genes: pd.DataFrame, peaks: pd.DataFrame, promoter: int, window: int | None, decay: float) -> np.ndarray:
    out = np.zeros((len(genes), len(peaks)))
    for i, g in enumerate(genes.itertuples()):
        lo = g.chromStart - (0 if g.strand == "-" else promoter)
        hi = g.chromEnd + (promoter if g.strand == "-" else 0)
        for j, p in enumerate(peaks.itertuples()):
            if str(g.chrom).replace("chr", "") != str(p.chrom).replace("chr", ""):
                continue
            if p.chromEnd > lo and p.chromStart < hi:
                out[i, j] = 1.0
            elif window is not None:
                d = max(lo - p.chromEnd, p.chromStart - hi, 0)
                if d <= window:
                    out[i, j] = ((d + 1000) / 1000) ** -decay
    return out


@pytest.mark.parametrize("window", [None, 20_000])
def test_links_equal_a_brute_force_distance_computation(window):
    rng = np.random.default_rng(0)
    n_genes, n_peaks = 40, 300
    g_start = rng.integers(0, 400_000, n_genes)
    genes = pd.DataFrame({
        "chrom": rng.choice(["chr1", "chr2", "chr3"], n_genes), "chromStart": g_start,
        "chromEnd": g_start + rng.integers(500, 30_000, n_genes), "strand": rng.choice(["+", "-"], n_genes),
    }, index=[f"g{i}" for i in range(n_genes)])
    p_start = rng.integers(0, 430_000, n_peaks)
    peaks = pd.DataFrame({
        "chrom": rng.choice(["1", "2", "4"], n_peaks),  # no "chr" prefix: matched anyway; chr4 has no gene
        "chromStart": p_start, "chromEnd": p_start + rng.integers(200, 3_000, n_peaks),
    })
    names = [f"{c}:{s}-{e}" for c, s, e in peaks.itertuples(index=False)]
    rna = ad.AnnData(sp.csr_matrix((5, n_genes)))
    rna.var_names = genes.index
    for c in genes.columns:
        rna.var[c] = genes[c].to_numpy()
    atac = ad.AnnData(sp.csr_matrix((5, n_peaks)))
    atac.var_names = names
    mdata = mudata_of({"rna": rna, "atac": atac}, pd.DataFrame(index=rna.obs_names))
    links = link_peaks_to_genes(mdata, promoter=2000, window=window, decay=0.75, min_linked_fraction=0)
    np.testing.assert_allclose(links.toarray(), _brute_force(genes, peaks, 2000, window, 0.75), rtol=1e-12)
    assert links.nnz > 20
    # stored symmetrically in mdata.varp, gene rows x peak columns in mdata.var order
    stored = mdata.varp[FEATURE_LINKS_KEY]
    gene_pos = mdata.var_names.get_indexer(rna.var_names)
    peak_pos = mdata.var_names.get_indexer(atac.var_names)
    np.testing.assert_allclose(stored[gene_pos][:, peak_pos].toarray(), links.toarray())
    np.testing.assert_allclose(stored.toarray(), stored.T.toarray())


def test_gene_annotation_from_the_shipped_tss_table(shared_data_dir):
    """The mm10 TSS table covers most MOp genes; peaks on mm10 link to them."""
    import sclatent

    table = read_gene_annotation(shared_data_dir / "annotations" / "mm10_tss_celloracle.bed")
    assert {"gene_name", "chrom", "start", "end", "strand"} <= set(table.columns)
    mdata = sclatent.datasets.mop_snareseq2()
    missing = add_gene_coordinates(mdata.mod["rna"], table)
    assert missing == 23  # the 1,654 of 1,677 genes of the annotation README
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a consistent assembly: no mismatch warning, even for overlaps only
        overlaps = link_peaks_to_genes(mdata, window=None)
        links = link_peaks_to_genes(mdata)
    assert links.shape == overlaps.shape == (1677, 25_734)
    assert (links.getnnz(axis=0) > 0).mean() > 0.7 and overlaps.nnz < links.nnz
    assert set(overlaps.data) == {1.0} and links.data.min() < 1


def test_an_assembly_mismatch_is_reported():
    """Genes whose chromosomes do not match the peaks': a warning naming the likely causes."""
    import sclatent

    mdata = sclatent.datasets.mop_snareseq2()
    rna = mdata.mod["rna"]
    rna.var["chrom"], rna.var["chromStart"], rna.var["chromEnd"] = "scaffold_1", 0, 1000
    with pytest.warns(UserWarning, match=r"Only 0.0% of the peaks are within 150 kb of a gene.*different genome assemblies"):
        link_peaks_to_genes(mdata, window=None)


def test_the_shipped_gene_table_links_the_shipped_peaks():
    """No download needed: the MOp genes' mm10 TSS table ships with the package."""
    import sclatent

    table = sclatent.datasets.mop_gene_tss()
    assert table["gene_name"].nunique() == 1654 and set(table["strand"]) == {"+", "-"}
    mdata = sclatent.datasets.mop_snareseq2()
    links = sclatent.data.link_peaks_to_genes(mdata, annotation=table)
    assert int(mdata.mod["rna"].var["chrom"].isna().sum()) == 23
    assert links.shape == (1677, 25_734) and (links.getnnz(axis=0) > 0).mean() > 0.7


GTF = (
    "#!genome-build test\n"
    'chr1\ttest\tgene\t1001\t2000\t.\t+\t.\tgene_id "G1"; gene_name "Alpha";\n'
    'chr1\ttest\ttranscript\t1001\t1800\t.\t+\t.\tgene_id "G1"; gene_name "Alpha"; transcript_id "T1";\n'
    'chr1\ttest\texon\t1001\t1200\t.\t+\t.\tgene_id "G1"; gene_name "Alpha"; transcript_id "T1";\n'
    'chr2\ttest\tgene\t5001\t9000\t.\t-\t.\tgene_id "G2"; gene_name "Beta";\n'
)


def test_gtf_genes_are_read_with_pyranges_as_0_based_spans(tmp_path):
    pytest.importorskip("pyranges", reason="GTF reading is the optional 'gtf' extra (pyranges)")
    path = tmp_path / "genes.gtf"
    path.write_text(GTF)
    table = read_gene_annotation(path).set_index("gene_name")
    assert list(table.index) == ["Alpha", "Beta"]  # gene rows only, not transcripts or exons
    assert table.loc["Alpha", ["chrom", "start", "end", "strand", "gene_id"]].tolist() == ["chr1", 1000, 2000, "+", "G1"]
    assert table.loc["Beta", ["start", "end", "strand"]].tolist() == [5000, 9000, "-"]


def test_a_gtf_without_gene_rows_spans_each_gene_over_its_rows(tmp_path):
    pytest.importorskip("pyranges", reason="GTF reading is the optional 'gtf' extra (pyranges)")
    path = tmp_path / "transcripts.gtf"
    path.write_text("".join(line + "\n" for line in GTF.splitlines() if "\tgene\t" not in line))
    table = read_gene_annotation(path).set_index("gene_name")
    assert table.loc["Alpha", ["start", "end"]].tolist() == [1000, 1800]
