"""From an export directory to a scoring model: the runtime the service and the export gate share.

Why apart from training: serving must start fast and carry no trainer. This module imports only
``kernels``, ``recsys`` and torch (no torchrec, whose import pulls in ``torch.distributed``
checkpointing and FBGEMM): the DLRM is rebuilt as :class:`recsys.serving.dlrm.InferenceDLRM`,
whose state dict has torchrec's ``DLRM`` keys, so the trainer's weights load unchanged.

Example::

    exported = load_exported("exports/dlrm")
    probabilities = exported.score_rows(dense=[[1, None, 3, ...]], sparse=[["68fd1e64", None, ...]])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from recsys.configs import DLRMConfig, TTConfig
from recsys.lsh_output import LSHConfig, LSHOutputLayer
from recsys.sequence_encoders import HistoryEncoder, build_history_encoder
from recsys.sequence_transformer import SequenceTransformer, SequenceTransformerConfig
from recsys.serving.dlrm import InferenceDLRM
from recsys.serving.features import FeatureEncoder
from recsys.serving.format import (
    FEATURES_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    RETRIEVAL_FILE,
    SCALE_SUFFIX,
    ExportFormatError,
    dequantize,
    read_manifest,
    read_tensors,
)

log = logging.getLogger(__name__)


# -- the model --------------------------------------------------------------------------------
def build_model(model: dict, vocab_sizes: Mapping[str, int], num_dense: int) -> InferenceDLRM:
    """The DLRM an export describes (eval mode, CPU, float32), from the manifest's ``model`` section.

    The section holds ``DLRMConfig`` and ``TTConfig`` whole (``dlrm``, ``tt``); exports of format 1
    that listed the architecture flat are read too. TT tables are built with plain SGD (nothing
    trains here) and with the training run's cache, whose rows the export carries.
    """
    try:
        arch = DLRMConfig(**_tuples(model["dlrm"])) if "dlrm" in model else _flat_dlrm_config(model)
        tt = TTConfig(**{**_tuples(model["tt"]), "optimizer": "sgd"}) if model["embeddings"] == "tt" else None
    except (TypeError, ValueError) as exc:
        raise ExportFormatError(f"the manifest's model config is not readable by this code ({exc})") from exc
    if tt is not None:
        return InferenceDLRM(arch, vocab_sizes, num_dense, tt).eval()
    if model["embeddings"] == "dense":
        return InferenceDLRM(arch, vocab_sizes, num_dense).eval()
    raise ExportFormatError(f"unknown embeddings kind {model['embeddings']!r}")


def _tuples(section: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples the frozen configs hold."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}


def _flat_dlrm_config(model: dict) -> DLRMConfig:
    """``DLRMConfig`` of a format-1 manifest, which wrote its fields flat next to ``embeddings``."""
    names = ("embedding_dim", "dense_arch", "over_arch", "interaction", "dcn_layers", "dcn_low_rank")
    return DLRMConfig(**_tuples({k: model[k] for k in names if k in model}))


def serving_state_keys(model: nn.Module) -> list[str]:
    """State-dict entries an export carries: all but the TT frequency counts (training only)."""
    return [k for k in model.state_dict() if not k.endswith(".cache_counts")]


def tt_core_names(model: nn.Module) -> list[str]:
    return [k for k in model.state_dict() if ".tt_cores." in k]


CACHE_TENSORS = (".cache_rows", ".cache_weight")
"""The LFU cache of a TT group: an export ships its occupied slots only (sorted ids first, as the cache holds them)."""


def model_from_tensors(
    section: dict, vocab_sizes: Mapping[str, int], num_dense: int, stored: Mapping[str, torch.Tensor], source: Any
) -> InferenceDLRM:
    """The DLRM of a manifest's ``model`` section with the tensors of ``model.safetensors`` loaded.

    Quantized cores are dequantized. A TT cache may be shipped shorter than the cache the section
    builds (its occupied slots only; the section rounds the slots up to whole rows per table): the
    built cache's own empty slots fill the rest, which keeps its ids sorted as lookups need.
    ``source`` names the file in errors. The export writer scores this same model before it writes.
    """
    model = build_model(section, vocab_sizes, num_dense)
    expected = model.state_dict()
    state = {}
    for key in serving_state_keys(model):
        if key not in stored:
            raise ExportFormatError(f"{source}: no tensor {key!r}, which the manifest's model needs")
        value, want = stored[key], expected[key]
        if value.dtype in (torch.int8, torch.float16):
            value = dequantize(value, stored.get(key + SCALE_SUFFIX))
        if key.endswith(CACHE_TENSORS) and value.shape[1:] == want.shape[1:] and len(value) <= len(want):
            if key.endswith(".cache_rows"):
                empty = model.get_submodule(key.rpartition(".")[0]).layout.total_rows  # the id of an empty slot
                _check_cache_rows(value, empty, name=f"{source}: {key!r}")
            value = torch.cat([value, want[len(value) :]])
        if tuple(value.shape) != tuple(want.shape):
            raise ExportFormatError(
                f"{source}: tensor {key!r} has shape {list(value.shape)}, the model needs {list(want.shape)}"
            )
        state[key] = value
    model.load_state_dict(state, strict=False)
    return model


def _check_cache_rows(rows: torch.Tensor, empty: int, name: str) -> None:
    """Cached row ids: distinct, increasing, below ``empty`` (the id of an empty slot), then empty slots only."""
    occupied = int((rows < empty).sum())
    if not bool((rows[:occupied].diff() > 0).all() and (rows[occupied:] == empty).all() and (rows >= 0).all()):
        raise ExportFormatError(f"{name} must hold distinct cached row ids in increasing order, then empty slots")


# -- retrieval: next-item encoder + LSH output layer ------------------------------------------
RETRIEVAL_LAYER_KEYS = ("weight", "projection", "codes", "offsets", "members")
"""What ``LSHOutputLayer.topk`` reads; the training-only state (fingerprints, triplet buffer, scheduler) stays out."""
CATALOGUE_KEY = "catalogue.item_ids"
HISTORY_ENCODER_KIND = "recsys.sequence_encoders.HistoryEncoder"
SEQUENCE_TRANSFORMER_KIND = "recsys.sequence_transformer.SequenceTransformer"
"""The retrieval encoder's ``kind``: the position-aware mean (every export before the transformer), the transformer."""


def history_encoder(section: Mapping[str, Any]) -> HistoryEncoder | SequenceTransformer:
    """The retrieval section's ``encoder`` as an untrained module in eval mode (the export's tensors go in next).

    Raises:
        ExportFormatError: a kind this code does not know, or a transformer config it cannot read.
    """
    kind, num_items, max_len, hidden = section.get("kind"), section["num_items"], section["max_len"], section["hidden"]
    if kind == HISTORY_ENCODER_KIND:
        return build_history_encoder("mean", num_items, max_len, section["item_dim"], hidden, 0.0).eval()
    if kind == SEQUENCE_TRANSFORMER_KIND:
        try:
            config = SequenceTransformerConfig(**section["transformer"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportFormatError(f"retrieval: transformer config not readable by this code ({exc})") from exc
        return build_history_encoder("transformer", num_items, max_len, 0, hidden, 0.0, config).eval()
    raise ExportFormatError(
        f"retrieval: encoder kind {kind!r} unknown; this code reads {[HISTORY_ENCODER_KIND, SEQUENCE_TRANSFORMER_KIND]}"
    )


class Retrieval:
    """The candidate generator of ``/v1/recommend``: history -> hidden -> ``LSHOutputLayer.topk``.

    The history encoder is the export's kind (:func:`history_encoder`): the position-aware mean or the
    causal transformer, whose hidden vector is its last position's. (In eval mode ``reformer`` and
    ``smyrf`` draw the same hashes on every call, so every attention answers one history one way.)

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
        self.encoder = history_encoder(enc)
        self.layer = LSHOutputLayer(enc["hidden"], self.num_items, lsh).eval()
        if isinstance(self.encoder, SequenceTransformer) and self.encoder.config.tied:
            self.encoder.tie_items_to(self.layer)  # its items are the layer's weight rows, loaded below
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

    def _find(self, items: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(position in the sorted catalogue, whether the item is there) of each item id."""
        items_array = np.asarray(items, dtype=np.int64).reshape(-1)
        at = np.searchsorted(self._sorted_ids, items_array).clip(max=len(self._sorted_ids) - 1)
        return at, self._sorted_ids[at] == items_array

    def in_catalogue(self, items: Sequence[int]) -> np.ndarray:
        """``(len(items),)`` bool: which item ids the catalogue holds (a history may name newer items)."""
        return self._find(items)[1]

    def classes_of(self, items: Sequence[int], field_name: str = "history") -> np.ndarray:
        """Item ids -> class ids; raises ``ValueError`` naming ``field_name[i]`` for an item not in the catalogue."""
        at, known = self._find(items)
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
    if strict and (extra := sorted(set(state) - set(expected))):
        raise ExportFormatError(f"{RETRIEVAL_FILE}: {prefix + extra[0]!r} is not a tensor of the retrieval model")
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
    def logits(self, dense: np.ndarray, sparse_ids: np.ndarray, group: np.ndarray | None = None) -> torch.Tensor:
        """(B,) logits of encoded rows (dense (B, 13) float32, ids (B, 26) int64).

        ``group`` (B,) int64, non-decreasing: rows of one group are variants of one row (a rank request's
        candidates), scored sharing what they have in common (``InferenceDLRM.forward``); the same scores.
        """
        if len(dense) == 0:
            return torch.empty(0)
        group_tensor = None if group is None else torch.from_numpy(group)
        return self.model(torch.from_numpy(dense), torch.from_numpy(sparse_ids), group_tensor).reshape(-1)

    def predict(self, dense: np.ndarray, sparse_ids: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
        """(B,) click probabilities (float64) of encoded rows (``group``: see :meth:`logits`)."""
        return torch.sigmoid(self.logits(dense, sparse_ids, group).double()).numpy()

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
        probabilities = self.predict(*self.encode_items(items, dense, sparse), np.zeros(len(items), np.int64))
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
        return {**self.manifest, "files": {name: {"bytes": f["bytes"]} for name, f in self.manifest["files"].items()}}


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
    num_dense = len(encoder.dense_columns)
    model = model_from_tensors(manifest["model"], encoder.vocab_sizes, num_dense, stored, path / MODEL_FILE)
    _check_tt_shapes(model, manifest)
    retrieval = None
    if manifest.get("retrieval"):
        tensors = read_tensors(path, manifest, RETRIEVAL_FILE)
        try:
            retrieval = Retrieval(manifest["retrieval"], tensors, encoder.sparse_columns)
        except KeyError as exc:
            raise ExportFormatError(f"{path / MANIFEST_FILE}: retrieval section lacks {exc}") from exc
    log.info("loaded export %s (version %s) in %.2fs", path, manifest["version"], time.perf_counter() - start)
    return ExportedModel(path=path, manifest=manifest, model=model, encoder=encoder, retrieval=retrieval)


def _check_tt_shapes(model: InferenceDLRM, manifest: dict) -> None:
    """The rebuilt TT tables have the shapes the manifest recorded at export."""
    built_shapes = model.table_report()
    for name, entry in manifest.get("tables", {}).items():
        if entry.get("kind") != "tt":
            continue
        built = built_shapes.get(f"t_{name}", {})
        for key in ("p_shapes", "q_shapes", "ranks"):
            if built.get(key) != entry.get(key):
                raise ExportFormatError(
                    f"table {name}: {key} {built.get(key)} rebuilt, {entry.get(key)} exported; incompatible code"
                )
