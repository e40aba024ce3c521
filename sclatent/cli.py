"""Command line.

``sclatent run`` is the one-command demo: it trains on an h5ad/h5mu (default: the shipped
MOp data) and writes the annotated data with the latent, a UMAP and Leiden clusters, plus a
figure. The pipeline steps pass files between them:

- ``sclatent train IN --out MODEL_DIR [--config FILE]``: set up, train, save the model;
- ``sclatent embed MODEL_DIR IN --out OUT.h5ad``: the latent of every cell (``obsm``);
- ``sclatent map MODEL_DIR QUERY --out DIR``: map a query onto the model (query mapping),
  save the query model in ``DIR/model`` and its latent in ``DIR/<query>_embedded.h5ad``;
- ``sclatent de MODEL_DIR IN --groupby COL [--group1 G] [--group2 G] --out de.csv``.

Exit codes: 0 done, 1 an unexpected failure (with its traceback), 2 a usage or data error
(one line on stderr saying what is wrong). Output files are written to a temporary name
and renamed into place, so a failed step leaves no partial file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["de_command", "embed_command", "main", "map_command", "run", "train_command"]


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
        Path of the written data file (``umap.png``, ``training_curves.png`` and the model
        beside it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import anndata as ad
    import scanpy as sc

    from . import datasets
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
    _setup(data, batch_key, modalities, batch_required=False)
    model = SCLatent(data, n_latent=n_latent, seed=seed)
    model.train(max_epochs=max_epochs, seed=seed)
    obs = data.obs[[c for c in data.obs.columns if c in color]].copy()
    result = ad.AnnData(obs=obs)
    result.obsm["X_sclatent"] = model.get_latent_representation()
    sc.pp.neighbors(result, use_rep="X_sclatent")
    sc.tl.leiden(result, key_added="leiden", flavor="igraph", n_iterations=2, directed=False)
    sc.tl.umap(result, random_state=seed)
    result.uns["sclatent"] = {"model": repr(model), "epochs": int(len(model.history))}
    path = out / f"sclatent_{name}.h5ad"
    result.write_h5ad(path)
    umap_figure(result, [c for c in (*color, "leiden") if c in result.obs]).savefig(out / "umap.png", dpi=110, bbox_inches="tight")
    from .pl import training_curves

    training_curves(model).savefig(out / "training_curves.png", dpi=110, bbox_inches="tight")
    model.save(out / "model", overwrite=True)
    print(f"wrote {path}, {out / 'umap.png'}, {out / 'training_curves.png'} and {out / 'model'}")
    return path


class UserError(ValueError):
    """A problem with the command's input that the user can fix (exit code 2)."""


def _read(path: str | Path):
    """An ``.h5ad`` or ``.h5mu`` file, or a :class:`UserError` saying why not."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file.")
    import anndata as ad

    if path.suffix == ".h5mu":
        import mudata as md

        md.set_options(pull_on_update=False)
        return md.read_h5mu(path)
    if path.suffix == ".h5ad":
        return ad.read_h5ad(path)
    raise UserError(f"{path}: expected an .h5ad or .h5mu file.")


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path`` (same folder): no partial file on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _setup(data, batch_key: str | None, modalities: dict[str, str] | None, batch_required: bool = True) -> None:
    """Set ``data`` up (a missing ``batch_key`` column is an error if ``batch_required``, else ignored)."""
    from .modalities import KINDS
    from .model import SCLatent

    key = batch_key if batch_key and batch_key in data.obs else None
    if batch_key and key is None and batch_required:
        raise UserError(f"--batch-key {batch_key!r} is not an obs column; available: {list(data.obs.columns)}.")
    if hasattr(data, "mod"):
        mods = modalities or {m: m for m in data.mod if m in KINDS}
        if not mods:
            raise UserError(
                f"the data has modalities {list(data.mod)}, none named after a kind {sorted(KINDS)}; say which is which "
                "with --modality KEY=KIND (e.g. --modality gex=rna --modality peaks=atac)."
            )
        SCLatent.setup_mudata(data, modalities=mods, batch_key=key)
    else:
        SCLatent.setup_anndata(data, batch_key=key)


def train_command(input_path, out, config: str | None = None, batch_key: str | None = "batch", modalities=None) -> Path:
    """``sclatent train``: set up ``input_path``, train with the options of ``config`` (a JSON
    file ``{"model": {SCLatent arguments}, "train": {train() arguments}}``), save to ``out``."""
    import json

    from .model import SCLatent

    options = {}
    if config:
        try:
            options = json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--config {config}: not a readable JSON file ({err}).") from None
        unknown = set(options) - {"model", "train"}
        if unknown or not isinstance(options, dict):
            raise UserError(f"--config {config}: expected the keys 'model' and/or 'train', got {sorted(unknown)}.")
    data = _read(input_path)
    _setup(data, batch_key, modalities)
    model = SCLatent(data, **options.get("model", {}))
    model.train(**options.get("train", {}))
    model.save(out, overwrite=True)
    print(f"wrote {out}")
    return Path(out)


def _load(model_dir, data):
    from .model import SCLatent

    if not (Path(model_dir) / "manifest.json").exists():
        raise UserError(f"{model_dir}: not a saved sclatent model (no manifest.json).")
    return SCLatent.load(model_dir, data)


def embed_command(model_dir, input_path, out) -> Path:
    """``sclatent embed``: ``out`` gets the cells' ``obs`` and ``obsm["X_sclatent"]``."""
    import anndata as ad

    data = _read(input_path)
    model = _load(model_dir, data)
    result = ad.AnnData(obs=data.obs.copy())
    result.obsm["X_sclatent"] = model.get_latent_representation()
    _atomic_write(Path(out), result.write_h5ad)
    print(f"wrote {out}")
    return Path(out)


def map_command(model_dir, query_path, out, refine: bool = False) -> Path:
    """``sclatent map``: the query model in ``out/model`` and the query's latent in
    ``out/<query>_embedded.h5ad`` (fitted by ``train()``, or by ``map_by_refinement()``)."""
    import anndata as ad

    from .model import SCLatent

    if not (Path(model_dir) / "manifest.json").exists():
        raise UserError(f"{model_dir}: not a saved sclatent model (no manifest.json).")
    query = _read(query_path)
    model = SCLatent.load_query_data(query, model_dir)
    if refine:
        model.map_by_refinement()
        latent = model.get_latent_representation(refine_steps=100)
    else:
        model.train()
        latent = model.get_latent_representation()
    out = Path(out)
    model.save(out / "model", overwrite=True)
    result = ad.AnnData(obs=query.obs.copy())
    result.obsm["X_sclatent"] = latent
    path = out / f"{Path(query_path).stem}_embedded.h5ad"
    _atomic_write(path, result.write_h5ad)
    print(f"wrote {out / 'model'} and {path}")
    return path


def de_command(model_dir, input_path, out, groupby: str, group1=None, group2=None, accessibility: bool = False) -> Path:
    """``sclatent de``: the table of :meth:`~sclatent.SCLatent.differential_expression` (or
    ``differential_accessibility``) as CSV."""
    data = _read(input_path)
    model = _load(model_dir, data)
    method = model.differential_accessibility if accessibility else model.differential_expression
    table = method(groupby=groupby, group1=group1, group2=group2)
    _atomic_write(Path(out), lambda tmp: table.to_csv(tmp))
    print(f"wrote {out} ({len(table)} rows)")
    return Path(out)


def umap_figure(result, colors: list[str]):
    """The UMAP of ``result`` coloured by each of ``colors``, one panel each, every category in
    its panel's legend (beside the panel, in as many columns as it takes)."""
    import matplotlib.pyplot as plt
    import scanpy as sc

    fig, axes = plt.subplots(1, len(colors), figsize=(6.5 * len(colors), 5), squeeze=False)
    for ax, key in zip(axes[0], colors):
        n = result.obs[key].nunique()
        sc.pl.umap(result, color=key, ax=ax, show=False, legend_loc="right margin", legend_fontsize="small")
        legend = ax.get_legend()
        if legend is not None:
            legend.remove()
            handles, labels = ax.get_legend_handles_labels()
            ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                      fontsize="small", ncol=1 if n <= 16 else 2, markerscale=1.5)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sclatent`` command (see the module docstring for the exit codes)."""
    try:
        return _main(argv)
    except (UserError, ValueError, FileNotFoundError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"sclatent: error: {message}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="sclatent", description="sclatent: shared-latent VAE for single-cell RNA and ATAC.")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="set up and train on a file, save the model")
    t.add_argument("input", help=".h5ad or .h5mu of raw counts")
    t.add_argument("--out", required=True, help="folder for the saved model")
    t.add_argument("--config", default=None, help='JSON file: {"model": {...SCLatent arguments}, "train": {...train() arguments}}')
    t.add_argument("--batch-key", default="batch", help="obs column of the batch ('' for none)")
    t.add_argument("--modality", action="append", default=None, metavar="KEY=KIND")
    e = sub.add_parser("embed", help="write the latent of every cell of a file")
    e.add_argument("model", help="folder of a saved model")
    e.add_argument("input", help=".h5ad or .h5mu with the model's features")
    e.add_argument("--out", required=True, help="output .h5ad (obs and obsm['X_sclatent'])")
    m = sub.add_parser("map", help="map a query onto a saved model (new batches)")
    m.add_argument("model", help="folder of the saved reference model")
    m.add_argument("query", help=".h5ad or .h5mu of the query")
    m.add_argument("--out", required=True, help="folder for the query model and its latent")
    m.add_argument("--refine", action="store_true", help="fit by map_by_refinement() instead of train()")
    d = sub.add_parser("de", help="differential expression (or accessibility) between groups, as CSV")
    d.add_argument("model", help="folder of a saved model")
    d.add_argument("input", help=".h5ad or .h5mu the model was trained on (or new cells)")
    d.add_argument("--groupby", required=True, help="obs column of the groups")
    d.add_argument("--group1", default=None, help="group to test (default: every group against the rest)")
    d.add_argument("--group2", default=None, help="reference group (default: all other cells)")
    d.add_argument("--accessibility", action="store_true", help="differential accessibility of the atac modality")
    d.add_argument("--out", required=True, help="output .csv")
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
    if args.command == "embed":
        embed_command(args.model, args.input, args.out)
        return 0
    if args.command == "map":
        map_command(args.model, args.query, args.out, refine=args.refine)
        return 0
    if args.command == "de":
        de_command(args.model, args.input, args.out, args.groupby, args.group1, args.group2, args.accessibility)
        return 0
    modalities = None
    if args.modality:
        pairs = [m.split("=", 1) for m in args.modality]
        bad = [m for m, p in zip(args.modality, pairs) if len(p) != 2 or not all(p)]
        if bad:
            parser.error(f"--modality takes KEY=KIND, e.g. gex=rna; got {bad}")
        modalities = dict(pairs)
    if args.command == "train":
        train_command(args.input, args.out, args.config, args.batch_key or None, modalities)
        return 0
    run(args.out, args.input, args.batch_key, max_epochs=args.max_epochs, n_latent=args.n_latent, seed=args.seed,
        modalities=modalities)
    return 0


if __name__ == "__main__":
    sys.exit(main())
