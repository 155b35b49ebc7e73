"""The exported-model format: a self-describing directory of safetensors files and a JSON manifest.

Why a format of our own instead of the training checkpoint: a DCP checkpoint needs the training
code, the data directory (vocabularies) and pickle to read; an export needs none of them.
Loading never unpickles: tensors come from ``safetensors`` (a JSON header and raw bytes), every
file's size and sha256 are checked against the manifest before a byte of it is parsed, and the
manifest itself is checked against ``manifest.sha256``. A flipped byte or a truncated file is
refused with an :class:`ExportFormatError` that names the file.

Layout::

    DIR/manifest.json          format, version, model and feature config, tables, metrics, files + sha256
    DIR/manifest.sha256        sha256 of manifest.json (written last)
    DIR/model.safetensors      the plain DLRM state dict: MLPs, dense tables, TT cores, TT cache rows
    DIR/features.safetensors   frequency vocabularies (uint32 keys per categorical column), if any
    DIR/retrieval.safetensors  next-item history encoder + LSH output layer + item catalogue, if any

A directory is written under a hidden temporary name next to ``DIR`` and swapped in when
complete (:func:`write_export`), so a crash never leaves a half export that looks whole.

Example::

    exported = load_exported("exports/dlrm")
    probabilities = exported.score_rows(dense=[[1, None, 3, ...]], sparse=[["68fd1e64", None, ...]])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

log = logging.getLogger(__name__)

FORMAT = "recsys-tt-export"
FORMAT_VERSION = 2  # 2: the manifest's model section holds DLRMConfig and TTConfig whole
READABLE_VERSIONS = (1, 2)  # 1: the same files, the architecture written flat
MANIFEST_FILE = "manifest.json"
MANIFEST_DIGEST_FILE = "manifest.sha256"
MODEL_FILE = "model.safetensors"
FEATURES_FILE = "features.safetensors"
RETRIEVAL_FILE = "retrieval.safetensors"
CORE_DTYPES = ("fp32", "fp16", "int8")
SCALE_SUFFIX = ".scale"  # per-row float32 scales of an int8 tensor
# the values training accepts (pipelines.tsv): larger integers or other strings are malformed rows
HEX_PATTERN = r"^[0-9a-fA-F]{1,8}$"
MAX_DENSE_ABS = 10**18 - 1


class ExportFormatError(ValueError):
    """An export directory that is missing, incomplete, tampered with or of another format."""


# -- files ------------------------------------------------------------------------------------
def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, target: Path) -> None:
    """Swap ``tmp`` in as ``target``: the old directory is renamed away first, then deleted."""
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)
    _fsync(target.parent)


def write_export(target: Path, tensor_files: Mapping[str, Mapping[str, torch.Tensor]], manifest: dict) -> Path:
    """Write ``tensor_files`` (file name -> tensors) and ``manifest`` as the directory ``target``, atomically.

    The manifest gets ``files`` (bytes and sha256 of every file); ``manifest.sha256`` is
    written last, and the whole directory is renamed into place only when everything is on disk.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        files = {}
        for name, tensors in tensor_files.items():
            data = save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()})
            (tmp / name).write_bytes(data)
            _fsync(tmp / name)
            files[name] = {"bytes": len(data), "sha256": sha256_bytes(data)}
        manifest = {**manifest, "files": files}
        text = json.dumps(manifest, indent=2).encode()
        (tmp / MANIFEST_FILE).write_bytes(text)
        (tmp / MANIFEST_DIGEST_FILE).write_text(sha256_bytes(text) + "\n")
        _fsync(tmp / MANIFEST_FILE)
        _fsync(tmp / MANIFEST_DIGEST_FILE)
        _fsync(tmp)
        _publish(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_manifest(path: Path) -> dict:
    """The checked manifest of export directory ``path``."""
    path = Path(path)
    manifest_path, digest_path = path / MANIFEST_FILE, path / MANIFEST_DIGEST_FILE
    if not manifest_path.is_file() or not digest_path.is_file():
        raise ExportFormatError(
            f"{path} is not a complete export: {MANIFEST_FILE} or {MANIFEST_DIGEST_FILE} is missing "
            "(write one with `python -m pipelines.export`)"
        )
    text = manifest_path.read_bytes()
    expected = digest_path.read_text().strip()
    if sha256_bytes(text) != expected:
        raise ExportFormatError(f"{manifest_path}: sha256 does not match {MANIFEST_DIGEST_FILE}; the file was altered")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ExportFormatError(f"{manifest_path}: not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportFormatError(f"{manifest_path}: not a {FORMAT} manifest")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ExportFormatError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, this code reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    for key in ("version", "model", "features", "files"):
        if key not in manifest:
            raise ExportFormatError(f"{manifest_path}: missing key {key!r}")
    return manifest


def read_tensors(path: Path, manifest: dict, name: str) -> dict[str, torch.Tensor]:
    """Tensors of file ``name`` of the export at ``path``, after checking its size and sha256."""
    entry = manifest["files"].get(name)
    if entry is None:
        raise ExportFormatError(f"{path}: the manifest lists no file {name!r}")
    file = Path(path) / name
    if not file.is_file():
        raise ExportFormatError(f"{file}: missing (the manifest lists it)")
    data = file.read_bytes()
    if len(data) != entry["bytes"]:
        raise ExportFormatError(f"{file}: {len(data)} bytes, the manifest says {entry['bytes']}; truncated or replaced")
    if sha256_bytes(data) != entry["sha256"]:
        raise ExportFormatError(f"{file}: sha256 does not match the manifest; the file was altered")
    try:
        return load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types
        raise ExportFormatError(f"{file}: not a readable safetensors file ({exc})") from exc


# -- int8 / fp16 storage of the TT cores ----------------------------------------------------
def quantize(tensor: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """``{"": stored}`` (+ ``{".scale": per-row scales}`` for int8: symmetric, one scale per first index)."""
    if dtype == "fp32":
        return {"": tensor.float()}
    if dtype == "fp16":
        return {"": tensor.half()}
    if dtype == "int8":
        rows = tensor.float().reshape(tensor.shape[0], -1)  # (p, r_in * q * r_out)
        scale = rows.abs().amax(dim=1).clamp_min(1e-30) / 127.0  # (p,)
        stored = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(tensor.shape)
        return {"": stored, SCALE_SUFFIX: scale}
    raise ValueError(f"core dtype must be one of {CORE_DTYPES}, got {dtype!r}")


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The float32 tensor :func:`quantize` stored."""
    if stored.dtype == torch.int8:
        if scale is None:
            raise ExportFormatError("an int8 tensor without its scales")
        return (stored.float().reshape(stored.shape[0], -1) * scale[:, None]).reshape(stored.shape)
    return stored.float()


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN: metrics that are NaN (AUC of a one-class split) become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
