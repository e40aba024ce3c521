"""Genomic coordinates of peaks and genes, and the peak–gene links built from them.

Prior knowledge that ties the two modalities together when cells are not paired: a peak
is linked to a gene when it lies in the gene's body or promoter, or (optionally) within a
distance window with a decaying weight. The links are a sparse genes x peaks matrix,
built with sorted intervals and vectorized searches (no Python loop over peaks or genes).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "FEATURE_LINKS_KEY",
    "add_gene_coordinates",
    "gene_coordinates",
    "link_peaks_to_genes",
    "peak_coordinates",
    "parse_regions",
    "read_gene_annotation",
]

#: Where :func:`link_peaks_to_genes` stores the links: ``mdata.varp[FEATURE_LINKS_KEY]``.
FEATURE_LINKS_KEY = "peak_gene_links"
#: Coordinate columns of ``var`` (the BED / GLUE convention).
COORDINATE_COLUMNS = ("chrom", "chromStart", "chromEnd")

_REGION = re.compile(r"^(?P<chrom>[^:\-_\s]+)[:\-_](?P<start>\d+)[\-_](?P<end>\d+)$")


def _chrom_key(chrom: pd.Series | np.ndarray) -> np.ndarray:
    """Chromosome names compared without a ``chr`` prefix and case (``chr1`` == ``1`` == ``Chr1``)."""
    return pd.Series(chrom).astype(str).str.replace(r"^chr", "", regex=True, flags=re.IGNORECASE).str.upper().to_numpy()


def parse_regions(names) -> pd.DataFrame:
    """Parse region names such as ``chr1:100-200``, ``chr1-100-200``, ``1:100-200`` or ``chr1_100_200``.

    Parameters
    ----------
    names
        Region names (e.g. ``atac.var_names``).

    Returns
    -------
    pandas.DataFrame
        ``chrom`` (as written), ``chromStart`` and ``chromEnd`` (int64), indexed by the names.

    Raises
    ------
    ValueError
        Quoting the first names that do not parse, or whose end is not after their start.
    """
    names = pd.Index(map(str, names))
    parts = names.str.extract(_REGION)
    bad = parts["chrom"].isna().to_numpy()
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {len(names)} region names are not of the form chrom:start-end "
            f"(e.g. {list(names[bad][:5])}). Name peaks like 'chr1:100-200' or give var columns "
            f"{list(COORDINATE_COLUMNS)}."
        )
    out = pd.DataFrame(
        {"chrom": parts["chrom"].to_numpy(), "chromStart": parts["start"].astype(np.int64).to_numpy(),
         "chromEnd": parts["end"].astype(np.int64).to_numpy()},
        index=names,
    )
    inverted = (out["chromEnd"] <= out["chromStart"]).to_numpy()
    if inverted.any():
        raise ValueError(f"{int(inverted.sum())} region(s) end before they start (e.g. {list(names[inverted][:5])}).")
    return out


def peak_coordinates(atac) -> pd.DataFrame:
    """Coordinates of an ATAC AnnData's peaks: its ``var`` columns ``chrom``, ``chromStart``,
    ``chromEnd`` when present, else parsed from ``var_names`` (:func:`parse_regions`)."""
    if all(c in atac.var.columns for c in COORDINATE_COLUMNS):
        out = atac.var[list(COORDINATE_COLUMNS)].copy()
        out.index = pd.Index(map(str, atac.var_names))
        if out.isna().any().any():
            raise ValueError(f"atac.var has missing values in {list(COORDINATE_COLUMNS)}; fill or drop those peaks.")
        return out.astype({"chromStart": np.int64, "chromEnd": np.int64})
    return parse_regions(atac.var_names)


def _read_gtf(path: Path, gff3: bool) -> pd.DataFrame:
    """Genes of a GTF/GFF3 file (read by pyranges) as a gene table.

    Rows of feature ``gene`` give the gene spans; a file without them (some GFFs list only
    transcripts and exons) gets each gene's span from all its rows.
    """
    try:
        import pyranges
    except ImportError:
        raise ImportError(
            f"Reading {path.name} needs pyranges: pip install 'sclatent[gtf]' (or pip install pyranges), "
            "or pass a BED or CSV/TSV table of gene positions instead."
        ) from None
    frame = (pyranges.read_gff3 if gff3 else pyranges.read_gtf)(str(path), as_df=True)
    name_col = next((c for c in ("gene_name", "Name", "gene") if c in frame.columns), None)
    id_col = next((c for c in ("gene_id", "ID") if c in frame.columns), None)
    if name_col is None and id_col is None:
        raise ValueError(f"{path}: no gene_name or gene_id attribute in the file; it cannot be matched to genes.")
    genes = frame[frame["Feature"].astype(str) == "gene"]
    if genes.empty:
        genes = frame
    return pd.DataFrame(
        {
            "chrom": genes["Chromosome"].astype(str).to_numpy(),
            "start": genes["Start"].to_numpy(),  # pyranges: 0-based, end exclusive, like BED
            "end": genes["End"].to_numpy(),
            "strand": genes["Strand"].astype(str).to_numpy(),
            "gene_name": genes[name_col].to_numpy() if name_col else pd.NA,
            "gene_id": genes[id_col].to_numpy() if id_col else pd.NA,
        }
    )


def read_gene_annotation(annotation) -> pd.DataFrame:
    """Gene positions from a GTF/GFF3 file, a BED file, a CSV/TSV table, or a DataFrame.

    - GTF or GFF3 (``.gtf``, ``.gff``, ``.gff3``, optionally ``.gz``), read with pyranges
      (``pip install 'sclatent[gtf]'``): the ``gene`` rows, named by their ``gene_name``
      and ``gene_id`` attributes (GFF3: ``Name``/``ID``).
    - BED (``.bed``, no header): chrom, start, end, name, score or offset, strand (as the
      TSS tables in ``shared/data/annotations``). Several rows per gene (alternative TSSs)
      are merged into one span per gene.
    - CSV/TSV (``.csv``, ``.tsv``, optionally ``.gz``, with a header): columns ``chrom``,
      ``start``, ``end``, ``strand`` and ``gene_name`` and/or ``gene_id``.
    - A DataFrame with those columns.

    Returns
    -------
    pandas.DataFrame
        One row per gene name (and ID, when given): ``gene_name``, ``gene_id`` (may be
        missing), ``chrom``, ``start``, ``end`` (0-based, end exclusive), ``strand``.
    """
    if isinstance(annotation, pd.DataFrame):
        table = annotation.copy()
    else:
        path = Path(annotation)
        suffixes = "".join(path.suffixes).lower()
        if ".gtf" in suffixes or ".gff" in suffixes:
            table = _read_gtf(path, gff3=".gff" in suffixes)
        elif ".bed" in suffixes:
            table = pd.read_csv(path, sep="\t", header=None, comment="#")
            if table.shape[1] < 4:
                raise ValueError(f"{path}: a BED of genes needs at least 4 columns (chrom, start, end, name).")
            table = table.iloc[:, :6]
            table.columns = ["chrom", "start", "end", "gene_name", "score", "strand"][: table.shape[1]]
        else:
            table = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",")
    missing = [c for c in ("chrom", "start", "end") if c not in table.columns]
    if missing or not ({"gene_name", "gene_id"} & set(table.columns)):
        raise ValueError(
            f"A gene annotation needs columns chrom, start, end and gene_name or gene_id; it has {list(table.columns)}."
        )
    if "strand" not in table.columns:
        table["strand"] = "+"
    for c in ("gene_name", "gene_id"):
        if c not in table.columns:
            table[c] = pd.NA
    keys = ["gene_name", "gene_id", "chrom", "strand"]
    table = table.dropna(subset=["chrom", "start", "end"])
    merged = table.groupby([table[k].astype(str) for k in keys], sort=False).agg(start=("start", "min"), end=("end", "max"))
    merged = merged.reset_index()
    for c in ("gene_name", "gene_id"):
        merged[c] = merged[c].replace({"<NA>": pd.NA, "nan": pd.NA})
    return merged[["gene_name", "gene_id", "chrom", "start", "end", "strand"]].astype({"start": np.int64, "end": np.int64})


def add_gene_coordinates(rna, annotation, match: str = "auto") -> int:
    """Write gene positions into ``rna.var`` (columns ``chrom``, ``chromStart``, ``chromEnd``, ``strand``).

    This is the one function here that writes to the user's object, on request: it adds
    (or replaces) those four ``var`` columns and nothing else.

    Parameters
    ----------
    rna
        AnnData of genes.
    annotation
        Path of a BED or CSV/TSV gene table, or a DataFrame (:func:`read_gene_annotation`).
    match
        ``"name"`` (gene symbols in ``var_names``), ``"id"`` (gene IDs), or ``"auto"``
        (whichever matches more genes).

    Returns
    -------
    int
        The number of genes that got no position (their columns are missing values).
    """
    table = read_gene_annotation(annotation)
    names = pd.Index(map(str, rna.var_names))
    by = {}
    for key, col in (("name", "gene_name"), ("id", "gene_id")):
        sub = table.dropna(subset=[col]).drop_duplicates(col)
        by[key] = sub.set_index(sub[col].astype(str))
    if match == "auto":
        match = max(("name", "id"), key=lambda k: names.isin(by[k].index).sum())
    if match not in by:
        raise ValueError(f"match must be 'name', 'id' or 'auto', got {match!r}.")
    found = by[match].reindex(names)
    rna.var["chrom"] = found["chrom"].to_numpy()
    rna.var["chromStart"] = found["start"].to_numpy(dtype=float)
    rna.var["chromEnd"] = found["end"].to_numpy(dtype=float)
    rna.var["strand"] = found["strand"].to_numpy()
    return int(found["chrom"].isna().sum())


def gene_coordinates(rna) -> pd.DataFrame:
    """Positions of an RNA AnnData's genes from its ``var`` columns (see :func:`add_gene_coordinates`).

    Returns ``chrom``, ``chromStart``, ``chromEnd``, ``strand`` indexed by gene, with the
    genes lacking a position dropped.
    """
    if not all(c in rna.var.columns for c in COORDINATE_COLUMNS):
        raise ValueError(
            f"rna.var has no gene positions (columns {list(COORDINATE_COLUMNS)}). Add them with "
            "sclatent.data.add_gene_coordinates(rna, annotation), or pass annotation= to link_peaks_to_genes."
        )
    out = rna.var[list(COORDINATE_COLUMNS)].copy()
    out["strand"] = rna.var["strand"].to_numpy() if "strand" in rna.var.columns else "+"
    out.index = pd.Index(map(str, rna.var_names))
    out = out.dropna(subset=list(COORDINATE_COLUMNS))
    return out.astype({"chromStart": np.int64, "chromEnd": np.int64})


def _links(genes: pd.DataFrame, peaks: pd.DataFrame, gene_index: np.ndarray, n_genes: int,
           promoter: int, window: int, decay: float | None) -> sp.csr_matrix:
    """The genes x peaks weights; ``gene_index[i]`` is the row of ``genes``'s i-th entry."""
    minus = genes["strand"].astype(str).to_numpy() == "-"
    g_start = genes["chromStart"].to_numpy() - np.where(minus, 0, promoter)  # body + promoter, strand-aware
    g_end = genes["chromEnd"].to_numpy() + np.where(minus, promoter, 0)
    reach = window if decay is not None else 0
    p_chrom, g_chrom = _chrom_key(peaks["chrom"]), _chrom_key(genes["chrom"])
    p_start, p_end = peaks["chromStart"].to_numpy(), peaks["chromEnd"].to_numpy()
    rows, cols, vals = [], [], []
    for chrom in np.intersect1d(np.unique(p_chrom), np.unique(g_chrom)):  # one pass per chromosome
        p_idx = np.flatnonzero(p_chrom == chrom)
        order = p_idx[np.argsort(p_start[p_idx], kind="stable")]
        starts, ends = p_start[order], p_end[order]
        longest = int((ends - starts).max())
        g_idx = np.flatnonzero(g_chrom == chrom)
        lo_pos, hi_pos = g_start[g_idx] - reach, g_end[g_idx] + reach
        first = np.searchsorted(starts, lo_pos - longest, side="left")  # a peak can start up to `longest` before
        last = np.searchsorted(starts, hi_pos, side="left")  # and must start before the window ends
        counts = last - first
        g_rep = np.repeat(g_idx, counts)
        p_pos = np.repeat(first - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
        cand = order[p_pos]
        # distance between the peak and the gene's body + promoter (0 when they overlap)
        distance = np.maximum.reduce([np.zeros(len(cand), np.int64), g_start[g_rep] - p_end[cand], p_start[cand] - g_end[g_rep]])
        keep = distance <= reach if decay is not None else distance == 0
        overlap = (p_end[cand] > g_start[g_rep]) & (p_start[cand] < g_end[g_rep])
        keep &= overlap | (decay is not None)
        weight = np.where(overlap, 1.0, ((distance + 1000.0) / 1000.0) ** -(decay or 0.0))
        rows.append(gene_index[g_rep[keep]])
        cols.append(cand[keep])
        vals.append(weight[keep])
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    vals = np.concatenate(vals) if vals else np.zeros(0)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n_genes, len(peaks)))


def _global_positions(mdata, key: str) -> np.ndarray:
    """Position in ``mdata.var`` of each feature of ``mdata.mod[key]`` (``varmap`` maps the other way)."""
    membership = np.asarray(mdata.varmap[key]).ravel().astype(np.int64)  # 1 + local position, 0 if absent
    where = np.flatnonzero(membership)
    out = np.empty(len(where), dtype=np.int64)
    out[membership[where] - 1] = where
    return out


def link_peaks_to_genes(
    mdata,
    annotation=None,
    rna: str = "rna",
    atac: str = "atac",
    promoter: int = 2000,
    window: int | None = 150_000,
    decay: float = 0.75,
    key_added: str = FEATURE_LINKS_KEY,
    min_linked_fraction: float = 0.3,
) -> sp.csr_matrix:
    """Link each peak to the genes whose body or promoter it overlaps, or that lie within a window.

    Weights: 1 when the peak overlaps the gene body extended by ``promoter`` bases upstream
    of the TSS (strand-aware); within ``window`` bases of it, ``((d + 1000) / 1000) ** -decay``
    for a peak at distance ``d`` (GLUE's weighting); 0 beyond. ``window=None`` keeps the
    overlaps only.

    Parameters
    ----------
    mdata
        MuData with an RNA and an ATAC modality.
    annotation
        Gene positions to add first (path or DataFrame, see :func:`add_gene_coordinates`);
        ``None`` reads them from ``mdata.mod[rna].var``. With ``annotation``, the RNA
        AnnData's ``var`` gains the position columns.
    rna, atac
        Keys of the modalities in ``mdata.mod``.
    promoter, window, decay
        Promoter length upstream of the TSS, the distance window, the decay exponent.
    key_added
        The links are stored symmetrically in ``mdata.varp[key_added]`` (``mdata.var``
        order: gene rows x peak columns and the transpose), where MuData keeps
        feature x feature graphs.
    min_linked_fraction
        Warn when fewer peaks than this fraction lie within 150 kb of any gene (usually
        peaks and genes on different assemblies, or chromosome names that do not match).

    Returns
    -------
    scipy.sparse.csr_matrix
        Genes x peaks weights, rows in ``mdata.mod[rna].var_names`` order, columns in
        ``mdata.mod[atac].var_names`` order.
    """
    for key in (rna, atac):
        if key not in mdata.mod:
            raise ValueError(f"mdata.mod has no {key!r}; it has {list(mdata.mod)}. Pass rna=/atac= with the keys.")
    rna_data, atac_data = mdata.mod[rna], mdata.mod[atac]
    if annotation is not None:
        missing = add_gene_coordinates(rna_data, annotation)
        if missing == rna_data.n_vars:
            raise ValueError("No gene of mdata.mod[rna] is in the annotation; check gene names/IDs and the species.")
    genes = gene_coordinates(rna_data)
    peaks = peak_coordinates(atac_data)
    gene_index = pd.Index(map(str, rna_data.var_names)).get_indexer(genes.index)
    links = _links(genes, peaks, gene_index, rna_data.n_vars, promoter, window or 0, decay if window else None)
    # the plausibility check counts peaks within 150 kb of a gene, whatever window the links use
    near = links if window and window >= 150_000 else _links(genes, peaks, gene_index, rna_data.n_vars, promoter, 150_000, decay)
    linked = float((near.getnnz(axis=0) > 0).mean()) if near.shape[1] else 0.0
    if linked < min_linked_fraction:
        p_chroms, g_chroms = sorted(set(peaks["chrom"].astype(str)))[:3], sorted(set(genes["chrom"].astype(str)))[:3]
        warnings.warn(
            f"Only {linked:.1%} of the peaks are within 150 kb of a gene. Likely causes: peaks and genes on different genome "
            f"assemblies (e.g. mm10 peaks with GRCm39 genes), or chromosome names that differ (peaks {p_chroms}, "
            f"genes {g_chroms}).",
            UserWarning,
            stacklevel=2,
        )
    rows, cols = _global_positions(mdata, rna), _global_positions(mdata, atac)
    coo = links.tocoo()
    block = sp.csr_matrix((coo.data, (rows[coo.row], cols[coo.col])), shape=(mdata.n_vars, mdata.n_vars))
    mdata.varp[key_added] = (block + block.T).tocsr()
    return links
