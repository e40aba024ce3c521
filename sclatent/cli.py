"""Command line: ``sclatent run`` trains on an h5ad/h5mu (default: the shipped MOp data)
and writes the annotated data with the latent, a UMAP and Leiden clusters, plus a figure."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main", "run"]


def run(
    out: str | Path,
    input_path: str | Path | None = None,
    batch_key: str | None = "batch",
    color: tuple[str, ...] = ("batch", "cell_type"),
    max_epochs: int | None = None,
    n_latent: int = 10,
    seed: int = 0,
    modalities: dict[str, str] | None = None,
) -> Path:
    """Train on RNA counts and write ``<out>/sclatent_<name>.h5ad`` and ``<out>/umap.png``.

    Parameters
    ----------
    out
        Output folder (created if needed).
    input_path
        An ``.h5ad`` of raw counts (an ``rna``-kind modality), or an ``.h5mu`` whose
        modalities ``modalities`` names; ``None`` uses the shipped MOp SNARE-seq2 subset.
    batch_key
        ``obs`` column with the batch (``None`` for none; ignored when absent).
    color
        ``obs`` columns to colour the UMAP by (those present are used).
    max_epochs
        Epoch budget (``None``: sclatent's default).
    n_latent
        Latent dimension.
    seed
        Random seed.
    modalities
        For an ``.h5mu``: ``mdata.mod`` key -> kind (e.g. ``{"gex": "rna", "peaks": "atac"}``).
        ``None`` uses every modality whose key is itself a kind (``rna``, ``atac``, ``protein``).

    Returns
    -------
    pathlib.Path
        Path of the written data file.
    """
    import matplotlib

    matplotlib.use("Agg")
    import anndata as ad
    import scanpy as sc

    from . import datasets
    from .modalities import KINDS
    from .model import SCLatent

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if input_path is None:
        data, name = datasets.mop_snareseq2(), "mop"
    elif str(input_path).endswith(".h5mu"):
        import mudata as md

        data, name = md.read_h5mu(input_path), Path(input_path).stem
    else:
        data, name = ad.read_h5ad(input_path), Path(input_path).stem
    key = batch_key if batch_key and batch_key in data.obs else None
    if hasattr(data, "mod"):
        mods = modalities or {m: m for m in data.mod if m in KINDS}
        if not mods:
            raise ValueError(
                f"{input_path} has modalities {list(data.mod)}, none named after a kind {sorted(KINDS)}; "
                "say which is which with --modality KEY=KIND (e.g. --modality gex=rna --modality peaks=atac)."
            )
        SCLatent.setup_mudata(data, modalities=mods, batch_key=key)
    else:
        SCLatent.setup_anndata(data, batch_key=key)
    model = SCLatent(data, n_latent=n_latent, seed=seed)
    model.train(max_epochs=max_epochs, seed=seed, enable_progress_bar=False)
    obs = data.obs[[c for c in data.obs.columns if c in color]].copy()
    result = ad.AnnData(obs=obs)
    result.obsm["X_sclatent"] = model.get_latent_representation()
    sc.pp.neighbors(result, use_rep="X_sclatent")
    sc.tl.leiden(result, key_added="leiden", flavor="igraph", n_iterations=2, directed=False)
    sc.tl.umap(result, random_state=seed)
    result.uns["sclatent"] = {"model": repr(model), "epochs": int(len(model.history))}
    path = out / f"sclatent_{name}.h5ad"
    result.write_h5ad(path)
    fig = sc.pl.umap(result, color=[c for c in (*color, "leiden") if c in result.obs], return_fig=True, show=False)
    fig.savefig(out / "umap.png", dpi=110, bbox_inches="tight")
    model.save(out / "model", overwrite=True)
    print(f"wrote {path}, {out / 'umap.png'} and {out / 'model'}")
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sclatent`` command."""
    parser = argparse.ArgumentParser(prog="sclatent", description="sclatent: shared-latent VAE for single-cell RNA and ATAC.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train on data and write latent, UMAP, clusters and the model")
    r.add_argument("--input", default=None, help=".h5ad or .h5mu of raw counts (default: shipped MOp subset)")
    r.add_argument("--out", default="results", help="output folder")
    r.add_argument("--batch-key", default="batch")
    r.add_argument("--max-epochs", type=int, default=None)
    r.add_argument("--n-latent", type=int, default=10)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--modality", action="append", default=None, metavar="KEY=KIND",
                   help="an .h5mu modality and its kind (rna, atac, protein, counts); repeat for each")
    args = parser.parse_args(argv)
    modalities = None
    if args.modality:
        pairs = [m.split("=", 1) for m in args.modality]
        bad = [m for m, p in zip(args.modality, pairs) if len(p) != 2 or not all(p)]
        if bad:
            parser.error(f"--modality takes KEY=KIND, e.g. gex=rna; got {bad}")
        modalities = dict(pairs)
    run(args.out, args.input, args.batch_key, max_epochs=args.max_epochs, n_latent=args.n_latent, seed=args.seed,
        modalities=modalities)
    return 0


if __name__ == "__main__":
    sys.exit(main())
