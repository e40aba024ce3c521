"""Small real datasets shipped with sclatent, loadable with no download."""

from __future__ import annotations

from pathlib import Path

__all__ = ["mop_snareseq2", "data_path"]

_FILES = {"mop_snareseq2": "mop_snareseq2_subset.h5mu"}


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

    mdata = md.read_h5mu(data_path("mop_snareseq2"))
    if modality is None:
        return mdata
    if modality not in mdata.mod:
        raise ValueError(f"modality must be None, 'rna' or 'atac'; got {modality!r}.")
    return mdata.mod[modality].copy()
