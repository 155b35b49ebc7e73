"""The model configs, apart from the modules that build them.

Why a module of their own: the export manifest records these configs whole and the serving
runtime rebuilds the model from them; keeping them free of torchrec lets serving read them
without importing the training stack. ``recsys.dlrm`` and ``recsys.tt_collection`` use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch

from recsys.tt_embedding import OptimType, TableBatchedTTEmbeddingBag

FBGEMM_EPS = 1.0e-8
"""``eps`` of the trainer's row-wise Adagrad: FBGEMM's / torchrec's default, which the dense tables train with
(``TTEmbeddingBag`` itself keeps FBTT's ``1e-10``, ``recsys.tt_embedding.FBTT_EPS``, as a drop-in module)."""


class TableSpec(Protocol):
    """What :meth:`TTConfig.is_tt` reads of a table (torchrec's ``EmbeddingBagConfig`` has both)."""

    name: str
    num_embeddings: int


@dataclass(frozen=True)
class DLRMConfig:
    """Architecture of a DLRM.

    Args:
        embedding_dim: width of every embedding table (and of the dense arch's output).
        dense_arch: layer sizes of the bottom MLP over the 13 dense features; the last
            must equal ``embedding_dim`` (DLRM interacts it with the embeddings).
        over_arch: layer sizes of the top MLP, two or more (torchrec's ``OverArch``); the last must be 1 (one logit).
        interaction: ``dot`` (DLRM's pairwise dot products) or ``dcn`` (DCN-v2 cross layers).
        dcn_layers / dcn_low_rank: depth and rank of the DCN cross net.
    """

    embedding_dim: int = 16
    dense_arch: tuple[int, ...] = (64, 16)
    over_arch: tuple[int, ...] = (128, 64, 1)
    interaction: Literal["dot", "dcn"] = "dot"
    dcn_layers: int = 2
    dcn_low_rank: int = 32

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if not self.dense_arch or self.dense_arch[-1] != self.embedding_dim:
            raise ValueError(
                f"dense_arch must end with embedding_dim={self.embedding_dim}, got {list(self.dense_arch)}"
            )
        if len(self.over_arch) < 2 or self.over_arch[-1] != 1:  # torchrec's OverArch needs two layers or more
            raise ValueError(f"over_arch must have at least two layers and end with 1, got {list(self.over_arch)}")
        if self.interaction not in ("dot", "dcn"):
            raise ValueError(f"interaction must be 'dot' or 'dcn', got {self.interaction!r}")


TT_OPTIMIZERS = {
    "sgd": OptimType.EXACT_SGD,
    "adagrad": OptimType.EXACT_ADAGRAD,
    "rowwise_adagrad": OptimType.EXACT_ROWWISE_ADAGRAD,
}

STANDALONE_OPTIMIZER = "rowwise_adagrad"
STANDALONE_LEARNING_RATE = 0.02
"""The TT cores' optimizer when nothing sets one: FBGEMM's default table optimizer and TT-Rec's learning rate."""


@dataclass(frozen=True)
class TTConfig:
    """How the tables of a collection are compressed.

    Args:
        ranks: TT ranks, one int for all inner ranks or a list of d-1.
        threshold: tables with more rows than this become TT (TT-Rec leaves small ones dense).
        tt_tables / dense_tables: table names forced to TT / to dense, whatever their size.
        optimizer: the fused optimizer of the TT cores (``sgd``, ``adagrad``, ``rowwise_adagrad``); unset, a
            trainer gives the TT cores its embedding optimizer, and a collection built from this config alone
            uses ``rowwise_adagrad``.
        learning_rate: the TT cores' learning rate; unset, the trainer's embedding learning rate, or 0.02.
        eps: the Adagrad epsilon.
        num_cores: d, the number of cores (2-4), shapes chosen automatically.
        cache_size: LFU cache rows per TT table (0 = no cache); the tables of a group share
            one cache of ``cache_size x tables`` rows, filled by frequency across all of them.
        weight_dist: initialisation of the cores (``kernels.tt.init_cores``).
    """

    ranks: int | tuple[int, ...] = 16
    threshold: int = 10_000
    tt_tables: tuple[str, ...] = ()
    dense_tables: tuple[str, ...] = ()
    optimizer: Literal["sgd", "adagrad", "rowwise_adagrad"] | None = None
    learning_rate: float | None = None
    eps: float = FBGEMM_EPS
    num_cores: int = 3
    cache_size: int = 0
    weight_dist: str = "approx-normal"

    def __post_init__(self) -> None:
        if isinstance(self.ranks, (tuple, list)):  # one rank for all is stored as an int, as flags give (16,)
            ranks = tuple(int(r) for r in self.ranks)
            object.__setattr__(self, "ranks", ranks[0] if len(ranks) == 1 else ranks)
        for name in ("tt_tables", "dense_tables"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.optimizer is not None and self.optimizer not in TT_OPTIMIZERS:
            raise ValueError(f"TT optimizer must be one of {sorted(TT_OPTIMIZERS)}, got {self.optimizer!r}")
        if self.threshold < 0 or self.cache_size < 0:
            raise ValueError(f"threshold and cache_size must be >= 0, got {self.threshold}, {self.cache_size}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ValueError(f"TT learning_rate must be positive, got {self.learning_rate}")
        if set(self.tt_tables) & set(self.dense_tables):
            raise ValueError(f"tables both forced TT and dense: {sorted(set(self.tt_tables) & set(self.dense_tables))}")

    def following(self, optimizer: str, learning_rate: float) -> TTConfig:
        """This config with an unset optimizer or learning rate taken from the model's other tables."""
        return replace(
            self,
            optimizer=self.optimizer if self.optimizer is not None else optimizer,
            learning_rate=self.learning_rate if self.learning_rate is not None else learning_rate,
        )

    def is_tt(self, table: TableSpec) -> bool:
        if table.name in self.tt_tables:
            return True
        if table.name in self.dense_tables:
            return False
        return table.num_embeddings > self.threshold

    def build_group(
        self, table_rows: list[int], embedding_dim: int, mode: str = "sum", device: torch.device | None = None
    ) -> TableBatchedTTEmbeddingBag:
        """The TT tables of ``table_rows`` as one ``TableBatchedTTEmbeddingBag`` (one contraction, one shared cache).

        The one place a ``TTConfig`` becomes modules: the training collection and the serving DLRM both call it,
        so their tables (and state-dict keys and shapes) cannot drift apart.
        """
        return TableBatchedTTEmbeddingBag(
            len(table_rows),
            list(table_rows),
            embedding_dim,
            tt_ranks=self.ranks if isinstance(self.ranks, int) else list(self.ranks),
            optimizer=TT_OPTIMIZERS[self.optimizer or STANDALONE_OPTIMIZER],
            learning_rate=self.learning_rate if self.learning_rate is not None else STANDALONE_LEARNING_RATE,
            eps=self.eps,
            num_cores=self.num_cores,
            use_cache=self.cache_size > 0,
            cache_size=self.cache_size * len(table_rows),
            weight_dist=self.weight_dist,
            enforce_embedding_dim=True,
            mode=mode,
            include_last_offset=True,
            device=device,
        )


QR_OPERATIONS = ("mult", "add")


@dataclass(frozen=True)
class QRConfig:
    """Quotient-remainder compositional embeddings (Shi et al., KDD 2020; DLRM's ``--qr-flag``).

    Row ``i`` of a table of ``n`` rows is ``Q[i // c] op R[i % c]``: a quotient table of ``ceil(n / c)`` rows and a
    remainder table of ``c`` rows, so every row stays unique (unlike the hashing trick) for
    ``ceil(n / c) + c`` stored rows instead of ``n``.

    Args:
        collisions: ``c``, the rows that share a quotient row (DLRM's ``--qr-collisions``, default 4). A table
            uses ``min(c, ceil(sqrt(n)))``: past ``sqrt(n)`` the remainder table outgrows the quotient table
            and the table only grows, so a large ``c`` means "as small as QR gets" (``~2 sqrt(n)`` rows).
        threshold: tables with more rows than this are composed; smaller ones stay plain rows.
        operation: ``mult`` (the paper's best: element-wise product) or ``add``.
    """

    collisions: int = 4
    threshold: int = 10_000
    operation: Literal["mult", "add"] = "mult"

    def __post_init__(self) -> None:
        if self.collisions < 2:
            raise ValueError(f"QR collisions must be >= 2 (1 is a plain table), got {self.collisions}")
        if self.threshold < 0:
            raise ValueError(f"QR threshold must be >= 0, got {self.threshold}")
        if self.operation not in QR_OPERATIONS:
            raise ValueError(f"QR operation must be one of {list(QR_OPERATIONS)}, got {self.operation!r}")

    def is_composed(self, table: TableSpec) -> bool:
        return table.num_embeddings > self.threshold

    def collisions_for(self, num_embeddings: int) -> int:
        """The remainder table's rows for a table of ``num_embeddings`` rows (never more than ``ceil(sqrt(n))``)."""
        return max(2, min(self.collisions, math.isqrt(num_embeddings - 1) + 1))

    def stored_rows(self, num_embeddings: int) -> int:
        """Rows stored for a table of ``num_embeddings`` rows: quotient + remainder, or the table itself."""
        if num_embeddings <= self.threshold:
            return num_embeddings
        c = self.collisions_for(num_embeddings)
        return -(-num_embeddings // c) + c
