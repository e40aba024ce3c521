"""Saving and loading models: a JSON manifest and safetensors weights.

A model folder holds exactly two files, ``manifest.json`` and ``model.safetensors``. The
manifest records the SHA-256 of the weights file, which is checked on load, so a corrupted
or swapped weights file is an error, not a different model. Saving never deletes anything
of the user's: ``overwrite=True`` replaces those two files only, refuses a folder that
holds other files, and puts the old files back if the replacement fails half-way.
Files and folders get the permissions of the user's umask, like any file they write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["MODEL_FORMAT", "MODEL_FORMAT_VERSION", "migrate_manifest_v1", "read_model_dir", "write_model_dir"]

MODEL_FORMAT = "sclatent-model"
MODEL_FORMAT_VERSION = 2
# version 1: registry format 1 (no modality kinds), no checksum; version 2: kinds, weights_sha256
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
_FILES = (WEIGHTS, MANIFEST)  # replaced in this order: the manifest (with the checksum) last
_REQUIRED = {"format", "format_version", "registry", "init_args"}
_KNOWN = _REQUIRED | {"package_version", "is_trained", "history", "weights_sha256"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_leftover(name: str) -> bool:
    """A temporary or backup file of an earlier save that was killed (``.model.safetensors.*``)."""
    return any(name.startswith(f".{f}.") for f in _FILES)


def _remove_leftovers(path: Path) -> None:
    for leftover in path.iterdir():
        if _is_leftover(leftover.name):
            leftover.unlink(missing_ok=True)


def write_model_dir(path: str | os.PathLike, manifest: dict, state_dict: dict[str, torch.Tensor], overwrite: bool = False) -> None:
    """Write ``model.safetensors`` and ``manifest.json`` (with the weights' SHA-256) into ``path``.

    Both files are written to temporary names in ``path`` first and then renamed over the
    old ones; if a step fails, the old files are put back and the temporary ones removed,
    so ``path`` holds the old model or the new one, never a mix or nothing. A folder
    created here is removed again on failure.

    Raises
    ------
    FileExistsError
        When ``path`` holds a model and ``overwrite`` is false, when it is not a folder,
        or when it holds files other than a model's (they are never deleted).
    """
    path = Path(path)
    created = not path.exists()
    if not created:
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder; choose another path for the model.")
        others = sorted(p.name for p in path.iterdir() if p.name not in _FILES and not _is_leftover(p.name))
        if others:
            raise FileExistsError(
                f"{path} holds files that are not part of a saved model ({others[:5]}); sclatent never deletes them. "
                "Save the model into a folder of its own."
            )
        if any((path / f).exists() for f in _FILES) and not overwrite:
            raise FileExistsError(f"{path} already holds a model; pass overwrite=True to replace it.")
    path.mkdir(parents=True, exist_ok=True)  # mode from the umask
    file_mode = 0o666 & ~_umask()
    temporary: dict[str, Path] = {}
    moved: list[tuple[Path, Path]] = []  # (final, backup) of old files moved aside
    try:
        for name in _FILES:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path)
            os.close(fd)
            temporary[name] = Path(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(temporary[WEIGHTS]))
        full = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **manifest,
                "weights_sha256": _sha256(temporary[WEIGHTS])}
        temporary[MANIFEST].write_text(json.dumps(full, indent=1))
        for tmp in temporary.values():
            os.chmod(tmp, file_mode)  # mkstemp makes 0600 files
        for name in _FILES:
            final = path / name
            if final.exists():
                fd, backup = tempfile.mkstemp(prefix=f".{name}.old-", dir=path)
                os.close(fd)
                os.replace(final, backup)
                moved.append((final, Path(backup)))
            os.replace(temporary.pop(name), final)
    except BaseException:
        for name in list(temporary):
            temporary.pop(name).unlink(missing_ok=True)
        for final, backup in reversed(moved):
            os.replace(backup, final)
        moved.clear()
        _remove_leftovers(path)  # placeholders of backups that were never filled
        if created:
            for name in _FILES:
                (path / name).unlink(missing_ok=True)
            path.rmdir()
        raise
    finally:
        for _, backup in moved:
            backup.unlink(missing_ok=True)
    _remove_leftovers(path)  # of earlier saves that were killed


def migrate_manifest_v1(manifest: dict) -> dict:
    """Format 1 -> 2. The weights are unchanged (covariate embeddings kept their order: the
    batch, then the other covariates, now addressed by name); the registry gains modality
    kinds, migrated by :meth:`~sclatent.data.DataRegistry.from_dict` from the names that
    stood for them in format 1. ``init_args`` are read as they are; format 1 had no checksum."""
    from ..data.registry import DataRegistry

    registry = DataRegistry.from_dict(manifest["registry"]).to_dict()
    return {**manifest, "format_version": 2, "registry": registry}


def _read_manifest(manifest_path: Path) -> dict:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{manifest_path} is not valid JSON ({err}); the saved model is damaged. Save it again.") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{manifest_path} holds a JSON {type(manifest).__name__}, not an object; the saved model is damaged.")
    if manifest.get("format") != MODEL_FORMAT:
        raise ValueError(f"{manifest_path} has format {manifest.get('format')!r}, expected {MODEL_FORMAT!r}.")
    version = manifest.get("format_version")
    if version not in (1, MODEL_FORMAT_VERSION):
        raise ValueError(
            f"{manifest_path.parent} was saved in model format version {version}; this sclatent reads versions 1 and "
            f"{MODEL_FORMAT_VERSION}. Load it with the sclatent version that saved it (its manifest's package_version)."
        )
    missing, unknown = sorted(_REQUIRED - set(manifest)), sorted(set(manifest) - _KNOWN)
    if missing or unknown:
        raise ValueError(
            f"{manifest_path} is not a manifest sclatent wrote: missing keys {missing}, unknown keys {unknown}. "
            "The saved model is damaged or was edited; save it again."
        )
    return manifest


def read_model_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a folder written by :func:`write_model_dir`: format and version, checksum, finite weights.

    Raises
    ------
    FileNotFoundError
        When ``path`` holds no saved model.
    ValueError
        Naming the file and the problem: malformed or edited manifest, unknown format
        version, weights that do not match their checksum, unreadable or non-finite weights.
    """
    path = Path(path)
    manifest_path, weights_path = path / MANIFEST, path / WEIGHTS
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path} is not a saved sclatent model (no {MANIFEST}).")
    manifest = _read_manifest(manifest_path)
    if not weights_path.exists():
        raise FileNotFoundError(f"{path} has a {MANIFEST} but no {WEIGHTS}; the saved model is incomplete.")
    if manifest["format_version"] == 1:
        manifest = migrate_manifest_v1(manifest)
    expected = manifest.get("weights_sha256")
    if expected is not None and _sha256(weights_path) != expected:
        raise ValueError(
            f"{weights_path} does not match the checksum in {MANIFEST}: the weights file is corrupted or was replaced. "
            "Save the model again."
        )
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights_path} cannot be read as safetensors weights ({err}).") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{weights_path} holds non-finite (NaN or infinite) weights in {bad[:5]}; this model is broken.")
    return manifest, state
