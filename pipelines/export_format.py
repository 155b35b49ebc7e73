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
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipelines.criteo import MISSING_INDEX, NUM_RESERVED_INDICES, OOV_INDEX
from pipelines.features import HashMapping, VocabMapping, decode_hex, transform_dense
from pipelines.loader import rows_to_batch
from recsys.dlrm import DLRMConfig, build_dense_collection, build_dlrm, table_configs
from recsys.tt_collection import TTConfig, TTEmbeddingBagCollection

log = logging.getLogger(__name__)

FORMAT = "recsys-tt-export"
FORMAT_VERSION = 1
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportFormatError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
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


# -- features -------------------------------------------------------------------------------
class FeatureEncoder:
    """Raw Criteo values -> model inputs, exactly as ``pipelines.preprocess`` maps them.

    Args:
        features: the manifest's ``features`` section (dense / sparse column names, the
            mapping kind and the hash moduli).
        vocabularies: ``freq`` mapping: uint32 keys per sparse column, most frequent first.

    The column mappings are ``pipelines.features``' ``HashMapping`` / ``VocabMapping``, applied
    to all columns at once (one modulo, or one ``searchsorted`` over every column's sorted keys
    offset by ``column << 32``): a request's few hundred values cost one numpy call, not 26.
    Hex strings are decoded with ``pipelines.features.decode_hex`` over Arrow buffers for large
    inputs and with ``int(value, 16)`` below ``SMALL_INPUT`` values (tested equal).
    """

    SMALL_INPUT = 2048

    def __init__(self, features: dict, vocabularies: Mapping[str, np.ndarray]) -> None:
        self.dense_columns: list[str] = list(features["dense_features"])
        self.sparse_columns: list[str] = list(features["sparse_features"])
        self.vocab_kind: str = features["vocab"]
        if self.vocab_kind == "hash":
            moduli = features["max_index"]
            self.mappings = [HashMapping(int(m)) for m in moduli]
            self._moduli = np.array([m.max_index - NUM_RESERVED_INDICES for m in self.mappings], dtype=np.int64)
        elif self.vocab_kind == "freq":
            missing = [c for c in self.sparse_columns if c not in vocabularies]
            if missing:
                raise ExportFormatError(f"no vocabulary for columns {missing}")
            self.mappings = [
                VocabMapping(keys=np.asarray(vocabularies[c], dtype=np.uint32)) for c in self.sparse_columns
            ]
            keys, ids = [], []
            for j, mapping in enumerate(self.mappings):
                order = np.argsort(mapping.keys, kind="stable")
                keys.append(mapping.keys[order].astype(np.int64) + (j << 32))
                ids.append(order.astype(np.int64) + NUM_RESERVED_INDICES)
            self._keys = np.concatenate(keys) if keys else np.empty(0, np.int64)  # sorted: column-major
            self._ids = np.concatenate(ids) if ids else np.empty(0, np.int64)
        else:
            raise ExportFormatError(f"unknown vocabulary kind {self.vocab_kind!r}")
        self.vocab_sizes = {c: m.num_embeddings for c, m in zip(self.sparse_columns, self.mappings, strict=True)}

    def map_columns(self, values: np.ndarray, missing: np.ndarray, columns: np.ndarray) -> np.ndarray:
        """Table ids of decoded values: ``values`` uint32, ``missing`` bool, ``columns`` column indices, all (n,)."""
        if self.vocab_kind == "hash":
            ids = NUM_RESERVED_INDICES + values.astype(np.int64) % self._moduli[columns]
        elif self._keys.size == 0:
            ids = np.full(values.shape, OOV_INDEX, dtype=np.int64)
        else:
            key = values.astype(np.int64) + (columns.astype(np.int64) << 32)
            pos = np.minimum(np.searchsorted(self._keys, key), self._keys.size - 1)
            ids = np.where(self._keys[pos] == key, self._ids[pos], OOV_INDEX)
        return np.where(missing, MISSING_INDEX, ids)

    def decode_sparse(self, raw: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, int | None]:
        """Hex strings or None -> (uint32 values, missing mask, index of the first invalid value or None)."""
        if len(raw) <= self.SMALL_INPUT:
            decoded = []  # -1 = missing
            for v in raw:
                if v is None:
                    decoded.append(-1)
                elif isinstance(v, str) and _HEX_FULLMATCH(v):
                    decoded.append(int(v, 16))
                else:
                    return np.empty(0, np.uint32), np.empty(0, bool), len(decoded)
            array = np.array(decoded, dtype=np.int64)
            missing = array < 0
            return np.where(missing, 0, array).astype(np.uint32), missing, None
        try:
            column = pa.array(raw, type=pa.string())
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return np.empty(0, np.uint32), np.empty(0, bool), next(k for k, v in enumerate(raw) if not _is_hex(v))
        valid = pc.fill_null(pc.match_substring_regex(column, HEX_PATTERN), True).to_numpy(zero_copy_only=False)
        if not valid.all():
            return np.empty(0, np.uint32), np.empty(0, bool), int(np.flatnonzero(~valid)[0])
        values, missing = decode_hex(column)
        return values, missing, None

    @staticmethod
    def transform_dense(values: Sequence[int | None], where: Callable[[int], str]) -> np.ndarray:
        """Integer counts or None -> float32 ``log1p(max(x, 0))`` via ``pipelines.features.transform_dense``.

        ``where(k)`` names the field of value ``k`` in the error of a value that is not an integer.
        """
        for k, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or abs(v) > MAX_DENSE_ABS):
                raise ValueError(f"{where(k)}: {v!r} is not an integer of at most 18 digits")
        return transform_dense(pa.array(values, type=pa.int64()))

    def encode(
        self, dense: Sequence[Sequence[int | None]], sparse: Sequence[Sequence[str | None]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of raw values -> (dense (B, 13) float32, sparse ids (B, 26) int64).

        ``dense[i]``: 13 integer counts or None (missing); ``sparse[i]``: 26 hex strings
        (1-8 digits) or None. Raises ``ValueError`` naming the row and column of a bad value.
        """
        n_dense, n_sparse = len(self.dense_columns), len(self.sparse_columns)
        if len(dense) != len(sparse):
            raise ValueError(f"dense has {len(dense)} rows, sparse {len(sparse)}")
        for i, (d, s) in enumerate(zip(dense, sparse, strict=True)):
            if len(d) != n_dense:
                raise ValueError(f"rows[{i}].dense: {len(d)} values, expected {n_dense}")
            if len(s) != n_sparse:
                raise ValueError(f"rows[{i}].sparse: {len(s)} values, expected {n_sparse}")
        batch = len(dense)
        flat_dense = [v for row in dense for v in row]  # row-major
        dense_out = self.transform_dense(flat_dense, lambda k: "rows[{}].dense[{}]".format(*divmod(k, n_dense)))
        raw = [v for row in sparse for v in row]
        values, missing, bad = self.decode_sparse(raw)
        if bad is not None:
            i, j = divmod(bad, n_sparse)
            raise ValueError(f"rows[{i}].sparse[{j}]: {raw[bad]!r} is not 1-8 hex digits")
        columns = np.tile(np.arange(n_sparse), batch)
        ids = self.map_columns(values, missing, columns).reshape(batch, n_sparse)
        return dense_out.reshape(batch, n_dense), ids

    def encode_variants(
        self,
        dense_row: Sequence[int | None],
        sparse_row: Sequence[str | None],
        dense_overrides: Sequence[Mapping[int, int | None]],
        sparse_overrides: Sequence[Mapping[int, str | None]],
    ) -> tuple[np.ndarray, np.ndarray]:
        """One context row, n variants of it (column index -> raw value replacing the context's).

        The same result as :meth:`encode` of the n modified rows, encoding the context once and
        only the replaced values: a 100-candidate rank costs 100 items' columns, not 100 rows.
        """
        if len(dense_overrides) != len(sparse_overrides):
            raise ValueError(f"{len(dense_overrides)} dense overrides, {len(sparse_overrides)} sparse ones")
        base_dense, base_ids = self.encode([dense_row], [sparse_row])
        n = len(dense_overrides)
        dense_out, ids_out = np.repeat(base_dense, n, axis=0), np.repeat(base_ids, n, axis=0)
        rows = [i for i, o in enumerate(dense_overrides) for _ in o]
        if rows:
            cols = [j for o in dense_overrides for j in o]
            values = [v for o in dense_overrides for v in o.values()]
            dense_out[rows, cols] = self.transform_dense(values, lambda k: f"candidates[{rows[k]}].dense[{cols[k]}]")
        rows = [i for i, o in enumerate(sparse_overrides) for _ in o]
        if rows:
            sparse_cols = np.fromiter((j for o in sparse_overrides for j in o), dtype=np.int64, count=len(rows))
            raw = [v for o in sparse_overrides for v in o.values()]
            values, missing, bad = self.decode_sparse(raw)
            if bad is not None:
                raise ValueError(
                    f"candidates[{rows[bad]}].sparse[{sparse_cols[bad]}]: {raw[bad]!r} is not 1-8 hex digits"
                )
            ids_out[rows, sparse_cols] = self.map_columns(values, missing, sparse_cols)
        return dense_out, ids_out


_HEX_FULLMATCH = re.compile(HEX_PATTERN.removeprefix("^").removesuffix("$")).fullmatch  # as RE2's ^...$: no "\n"


def _is_hex(value: Any) -> bool:
    return value is None or (isinstance(value, str) and _HEX_FULLMATCH(value) is not None)


# -- the model --------------------------------------------------------------------------------
def build_model(model: dict, vocab_sizes: Mapping[str, int], num_dense: int) -> nn.Module:
    """The single-process DLRM an export describes (eval mode, CPU, float32).

    ``model`` is the manifest's ``model`` section. TT tables are built with plain SGD (no
    optimizer state: nothing trains here) and with the cache of the training run, whose rows
    the export carries, so the served rows are the trained ones.
    """
    arch = DLRMConfig(
        embedding_dim=model["embedding_dim"],
        dense_arch=tuple(model["dense_arch"]),
        over_arch=tuple(model["over_arch"]),
        interaction=model["interaction"],
        dcn_layers=model.get("dcn_layers", 2),
        dcn_low_rank=model.get("dcn_low_rank", 32),
    )
    tables = table_configs(vocab_sizes, arch.embedding_dim)
    if model["embeddings"] == "tt":
        tt = model["tt"]
        collection: nn.Module = TTEmbeddingBagCollection(
            tables,
            TTConfig(
                ranks=tt["ranks"] if isinstance(tt["ranks"], int) else tuple(tt["ranks"]),
                threshold=tt["threshold"],
                tt_tables=tuple(tt.get("tt_tables", ())),
                dense_tables=tuple(tt.get("dense_tables", ())),
                optimizer="sgd",
                num_cores=tt["num_cores"],
                cache_size=tt["cache_size"],
            ),
            device=torch.device("cpu"),
            dense_device=torch.device("cpu"),
        )
    elif model["embeddings"] == "dense":
        collection = build_dense_collection(vocab_sizes, arch.embedding_dim, device=torch.device("cpu"))
    else:
        raise ExportFormatError(f"unknown embeddings kind {model['embeddings']!r}")
    return build_dlrm(arch, collection, num_dense, device=torch.device("cpu")).eval()


def serving_state_keys(model: nn.Module) -> list[str]:
    """State-dict entries an export carries: all but the TT frequency counts (training only)."""
    return [k for k in model.state_dict() if not k.endswith(".cache_counts")]


def tt_core_names(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if ".tt_cores." in k]


# -- retrieval: next-item encoder + LSH output layer ------------------------------------------
RETRIEVAL_LAYER_KEYS = ("weight", "projection", "codes", "offsets", "members")
"""What ``LSHOutputLayer.topk`` reads; the training-only state (fingerprints, triplet buffer, scheduler) stays out."""
CATALOGUE_KEY = "catalogue.item_ids"


class Retrieval:
    """The candidate generator of ``/v1/recommend``: history -> hidden -> ``LSHOutputLayer.topk``.

    Item ids are those of the sequence log the next-item model trained on (1-based); class ``c``
    of the layer is item ``item_ids[c]``. Re-ranking puts an item into the DLRM's categorical
    column ``column`` as the raw value ``format(item_id, "x")``, which the feature encoder then
    hashes or looks up exactly as preprocessing does.

    Args:
        section: the manifest's ``retrieval`` section (encoder and LSH config, re-rank column).
        tensors: ``retrieval.safetensors``: ``encoder.*``, ``output.*`` and the catalogue.

    Example::

        items, scores = exported.retrieval.retrieve([12, 7, 301], 100)   # (<=100,) item ids, inner products
    """

    def __init__(self, section: dict, tensors: Mapping[str, torch.Tensor], sparse_columns: Sequence[str]) -> None:
        from pipelines.train_next_item import HistoryEncoder
        from recsys.lsh_output import LSHConfig, LSHOutputLayer

        enc = section["encoder"]
        self.max_len: int = enc["max_len"]
        self.num_items: int = enc["num_items"]
        self.column: str = section["rerank"]["column"]
        if self.column not in sparse_columns:
            raise ExportFormatError(
                f"retrieval re-rank column {self.column!r} is not a categorical column of the model"
            )
        self.column_index = list(sparse_columns).index(self.column)
        try:
            lsh = LSHConfig(**section["lsh"])
        except (TypeError, ValueError) as exc:
            raise ExportFormatError(f"retrieval: LSH config not readable by this code ({exc})") from exc
        self.encoder = HistoryEncoder(self.num_items, self.max_len, enc["item_dim"], enc["hidden"], 0.0).eval()
        self.layer = LSHOutputLayer(enc["hidden"], self.num_items, lsh).eval()
        encoder_state = {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
        _load_exactly(self.encoder, encoder_state, "encoder.")
        layer_state = {k: tensors.get(f"output.{k}") for k in RETRIEVAL_LAYER_KEYS}
        _load_exactly(self.layer, layer_state, "output.", strict=False)
        item_ids = tensors.get(CATALOGUE_KEY)
        if item_ids is None or tuple(item_ids.shape) != (self.num_items,):
            raise ExportFormatError(f"{RETRIEVAL_FILE}: {CATALOGUE_KEY} missing or not ({self.num_items},)")
        self.item_ids = item_ids.numpy().astype(np.int64)  # class -> item id
        order = np.argsort(self.item_ids, kind="stable")
        self._sorted_ids, self._sorted_classes = self.item_ids[order], order

    def classes_of(self, items: Sequence[int], field_name: str = "history") -> np.ndarray:
        """Item ids -> class ids; raises ``ValueError`` naming ``field_name[i]`` for an item not in the catalogue."""
        items_array = np.asarray(items, dtype=np.int64).reshape(-1)
        at = np.searchsorted(self._sorted_ids, items_array).clip(max=len(self._sorted_ids) - 1)
        known = self._sorted_ids[at] == items_array
        if not known.all():
            i = int(np.flatnonzero(~known)[0])
            raise ValueError(f"{field_name}[{i}]: item {items[i]} is not in the catalogue of {self.num_items} items")
        return self._sorted_classes[at]

    @torch.inference_mode()
    def hidden(self, history: Sequence[int]) -> torch.Tensor:
        """``(1, D)`` hidden vector of one history (item ids, oldest first; the last ``max_len`` count)."""
        classes = self.classes_of(history)[-self.max_len :] if len(history) else np.empty(0, dtype=np.int64)
        padded = np.full((1, self.max_len), -1, dtype=np.int64)  # left-padded, as pipelines.sequences does
        if len(classes):
            padded[0, -len(classes) :] = classes
        return self.encoder(torch.from_numpy(padded))

    @torch.inference_mode()
    def retrieve(self, history: Sequence[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``n`` candidate item ids from the LSH tables, by decreasing inner product, and those products."""
        scores, classes = self.layer.topk(self.hidden(history), n)  # (1, n) each, -inf / -1 padding
        keep = classes[0] >= 0
        return self.item_ids[classes[0][keep].numpy()], scores[0][keep].double().numpy()

    def item_values(self, items: np.ndarray) -> list[str]:
        """The raw categorical value of each item in the re-rank column."""
        return [format(int(i), "x") for i in items]


def _load_exactly(
    module: nn.Module, state: Mapping[str, torch.Tensor | None], prefix: str, strict: bool = True
) -> None:
    """Load ``state`` into ``module`` after checking every tensor is there with the module's shape and dtype."""
    expected = module.state_dict()
    names = expected.keys() if strict else state.keys()
    for name in names:
        value = state.get(name)
        if value is None:
            raise ExportFormatError(f"{RETRIEVAL_FILE}: no tensor {prefix + name!r}, which the retrieval model needs")
        want = expected[name]
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
            raise ExportFormatError(
                f"{RETRIEVAL_FILE}: {prefix + name!r} is {value.dtype} {list(value.shape)}, the model needs "
                f"{want.dtype} {list(want.shape)}"
            )
    module.load_state_dict(dict(state), strict=strict)


@dataclass
class ExportedModel:
    """An export loaded for inference: the DLRM, its feature encoder and its manifest.

    Example::

        exported = load_exported("exports/dlrm")
        dense, ids = exported.encoder.encode(dense_rows, sparse_rows)   # (B, 13), (B, 26)
        probabilities = exported.predict(dense, ids)                    # (B,) float64 numpy
    """

    path: Path
    manifest: dict
    model: nn.Module
    encoder: FeatureEncoder
    retrieval: Retrieval | None = None

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @torch.inference_mode()
    def logits(self, dense: np.ndarray, sparse_ids: np.ndarray) -> torch.Tensor:
        """(B,) logits of encoded rows (dense (B, 13) float32, ids (B, 26) int64)."""
        if len(dense) == 0:
            return torch.empty(0)
        batch = rows_to_batch(np.zeros(len(dense), dtype=np.float32), dense, sparse_ids)
        return self.model(batch.dense_features, batch.sparse_features).reshape(-1)

    def predict(self, dense: np.ndarray, sparse_ids: np.ndarray) -> np.ndarray:
        """(B,) click probabilities (float64) of encoded rows."""
        return torch.sigmoid(self.logits(dense, sparse_ids).double()).numpy()

    def score_rows(self, dense: Sequence[Sequence[int | None]], sparse: Sequence[Sequence[str | None]]) -> np.ndarray:
        """Raw Criteo rows -> click probabilities: the offline reference of the service's /v1/score."""
        return self.predict(*self.encoder.encode(dense, sparse))

    def recommend(
        self,
        history: Sequence[int],
        dense: Sequence[int | None],
        sparse: Sequence[str | None],
        k: int,
        candidates: int = 100,
    ) -> list[tuple[int, float, float]]:
        """The offline ``/v1/recommend``: ``(item id, click probability, retrieval score)``, best ``k`` first.

        ``candidates`` items are retrieved from the LSH tables for ``history``, each put into the
        context row's re-rank column, scored by the DLRM and sorted (ties: retrieval order).
        """
        if self.retrieval is None:
            raise ValueError("this export has no retrieval model (export with --retrieval)")
        items, retrieval_scores = self.retrieval.retrieve(history, candidates)
        probabilities = self.predict(*self.encode_items(items, dense, sparse))
        order = np.argsort(-probabilities, kind="stable")[:k]
        return [(int(items[i]), float(probabilities[i]), float(retrieval_scores[i])) for i in order]

    def encode_items(
        self, items: np.ndarray, dense: Sequence[int | None], sparse: Sequence[str | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encoded rows (dense, ids) of the context row with each retrieved item in its re-rank column."""
        if self.retrieval is None:
            raise ValueError("this export has no retrieval model (export with --retrieval)")
        overrides = [{self.retrieval.column_index: v} for v in self.retrieval.item_values(items)]
        return self.encoder.encode_variants(dense, sparse, [{}] * len(items), overrides)

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/model`` shows: everything in the manifest but the per-file digests."""
        return {k: v for k, v in self.manifest.items() if k != "files"} | {
            "files": {name: {"bytes": f["bytes"]} for name, f in self.manifest["files"].items()}
        }


def load_exported(path: str | Path) -> ExportedModel:
    """Load and check an export directory; never unpickles. Raises :class:`ExportFormatError`."""
    path = Path(path)
    start = time.perf_counter()
    manifest = read_manifest(path)
    features = manifest["features"]
    vocabularies: dict[str, np.ndarray] = {}
    if features.get("vocab") == "freq":
        vocabularies = {k: v.numpy() for k, v in read_tensors(path, manifest, FEATURES_FILE).items()}
    encoder = FeatureEncoder(features, vocabularies)
    stored = read_tensors(path, manifest, MODEL_FILE)
    model = build_model(manifest["model"], encoder.vocab_sizes, len(encoder.dense_columns))
    state = {}
    for key in serving_state_keys(model):
        if key not in stored:
            raise ExportFormatError(f"{path / MODEL_FILE}: no tensor {key!r}, which the manifest's model needs")
        value = stored[key]
        if value.dtype in (torch.int8, torch.float16):
            value = dequantize(value, stored.get(key + SCALE_SUFFIX))
        state[key] = value
    expected = model.state_dict()
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ExportFormatError(
                f"{path / MODEL_FILE}: tensor {key!r} has shape {list(value.shape)}, the model needs "
                f"{list(expected[key].shape)}"
            )
    _check_tt_shapes(model, manifest)
    model.load_state_dict(state, strict=False)
    retrieval = None
    if manifest.get("retrieval"):
        tensors = read_tensors(path, manifest, RETRIEVAL_FILE)
        try:
            retrieval = Retrieval(manifest["retrieval"], tensors, encoder.sparse_columns)
        except KeyError as exc:
            raise ExportFormatError(f"{path / MANIFEST_FILE}: retrieval section lacks {exc}") from exc
    log.info("loaded export %s (version %s) in %.2fs", path, manifest["version"], time.perf_counter() - start)
    return ExportedModel(path=path, manifest=manifest, model=model, encoder=encoder, retrieval=retrieval)


def _check_tt_shapes(model: nn.Module, manifest: dict) -> None:
    """The rebuilt TT tables have the shapes the manifest recorded at export."""
    collection = model.sparse_arch.embedding_bag_collection
    if not isinstance(collection, TTEmbeddingBagCollection):
        return
    report = collection.table_report()
    for name, entry in manifest.get("tables", {}).items():
        if entry.get("kind") != "tt":
            continue
        built = report.get(f"t_{name}", {})
        for key in ("p_shapes", "q_shapes", "ranks"):
            if built.get(key) != entry.get(key):
                raise ExportFormatError(
                    f"table {name}: {key} {built.get(key)} rebuilt, {entry.get(key)} exported; incompatible code"
                )


def compressed_table_bytes(report: dict, core_dtype: str) -> int:
    """Bytes of a TT table's cores stored as ``core_dtype`` (int8 adds one float32 scale per core row)."""
    fp32 = report["bytes"]
    if core_dtype == "fp16":
        return fp32 // 2
    if core_dtype == "int8":
        return fp32 // 4 + 4 * sum(report["p_shapes"])
    return fp32


def finite_or_none(value: Any) -> Any:
    """JSON has no NaN: metrics that are NaN (AUC of a one-class split) become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
