"""Small real datasets shipped with sclatent, loadable with no download."""

from __future__ import annotations

from pathlib import Path

__all__ = ["data_path", "mop_gene_tss", "mop_snareseq2"]

_FILES = {"mop_snareseq2": "mop_snareseq2_subset.h5mu", "mop_gene_tss": "mop_gene_tss_mm10.bed"}


def data_path(name: str) -> Path:
    """Path of a shipped data file.

    Looks in the installed package (``sclatent/_data``, present in wheels) and in the
    ``data/`` folder of a source checkout (editable installs).
    """
    if name not in _FILES:
        raise ValueError(f"Unknown dataset {name!r}; available: {sorted(_FILES)}.")
    here = Path(__file__).resolve().parent
    for folder in (here / "_data", here.parent / "data"):
        candidate = folder / _FILES[name]
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{_FILES[name]} was not found in {here / '_data'} or {here.parent / 'data'}; reinstall sclatent "
        "(pip install -e . from a source checkout) so its data files are present."
    )


def mop_snareseq2(modality: str | None = None):
    """3,000 nuclei of mouse primary motor cortex, paired snRNA + snATAC (SNARE-seq2).

    Raw counts: 1,677 genes and 25,734 peaks; ``obs`` has ``batch`` (8 sequencing
    libraries), ``cell_type`` (15 classes) and ``subtype``. A random subsample (seed 0)
    of the BICCN MOp SNARE-seq2 data as distributed by scMoMaT; see ``data/README.md``.

    Parameters
    ----------
    modality
        ``None`` returns the MuData; ``"rna"`` or ``"atac"`` returns that AnnData (a copy
        with the cell-level annotations).

    Returns
    -------
    mudata.MuData or anndata.AnnData
    """
    import mudata as md

    with md.set_options(pull_on_update=False):  # the file has its own obs; mudata's new default, and no FutureWarning
        mdata = md.read_h5mu(data_path("mop_snareseq2"))
    if modality is None:
        return mdata
    if modality not in mdata.mod:
        raise ValueError(f"modality must be None, 'rna' or 'atac'; got {modality!r}.")
    return mdata.mod[modality].copy()


def mop_gene_tss():
    """mm10 TSS windows of the shipped MOp genes (1,654 of 1,677), as a gene table.

    Rows of celloracle's HOMER-derived mm10 TSS table for these genes (see
    ``data/README.md``), in the form :func:`sclatent.data.add_gene_coordinates` and
    :func:`sclatent.data.link_peaks_to_genes` take: ``gene_name``, ``chrom``, ``start``,
    ``end``, ``strand`` (alternative TSSs merged into one span per gene).

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> mdata = sclatent.datasets.mop_snareseq2()
    >>> links = sclatent.data.link_peaks_to_genes(mdata, annotation=sclatent.datasets.mop_gene_tss())
    """
    from .data.genomic import read_gene_annotation

    return read_gene_annotation(data_path("mop_gene_tss"))
