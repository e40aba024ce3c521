"""Saving and loading models: a JSON manifest and safetensors weights, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "migrate_manifest_v1", "read_model_dir", "write_model_dir"]

MODEL_FORMAT = "sclatent-model"
MODEL_FORMAT_VERSION = 2
# version 1: registry format 1 (no modality kinds); version 2: registry format 2
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"


def write_model_dir(path: str | os.PathLike, manifest: dict, state_dict: dict[str, torch.Tensor], overwrite: bool = False) -> None:
    """Write ``manifest.json`` and ``model.safetensors`` into ``path``.

    Everything is first written to a temporary sibling directory that replaces ``path``
    only once complete, so a failure never leaves a half-written model behind (and, with
    ``overwrite=True``, never destroys the old one before the new one is complete).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps({"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **manifest}, indent=1))
        if path.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            backup.rmdir()
            path.rename(backup)
            tmp.rename(path)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def migrate_manifest_v1(manifest: dict) -> dict:
    """Format 1 -> 2. The weights are unchanged (covariate embeddings kept their order: the
    batch, then the other covariates, now addressed by name); the registry gains modality
    kinds, migrated by :meth:`~sclatent.data.DataRegistry.from_dict` from the names that
    stood for them in format 1. ``init_args`` are read as they are."""
    from ..data.registry import DataRegistry

    registry = DataRegistry.from_dict(manifest["registry"]).to_dict()
    return {**manifest, "format_version": 2, "registry": registry}


def read_model_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a directory written by :func:`write_model_dir`; check its format and version."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path} is not a saved sclatent model (no {MANIFEST}).")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != MODEL_FORMAT:
        raise ValueError(f"{manifest_path} has format {manifest.get('format')!r}, expected {MODEL_FORMAT!r}.")
    version = manifest.get("format_version")
    if version == 1:
        manifest, version = migrate_manifest_v1(manifest), 2
    if version != MODEL_FORMAT_VERSION:
        raise ValueError(
            f"{path} was saved in model format version {version}; this sclatent reads version {MODEL_FORMAT_VERSION}. "
            "Load it with the sclatent version that saved it (see its manifest's package_version)."
        )
    return manifest, load_file(str(path / WEIGHTS))
