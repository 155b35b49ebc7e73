"""``QREmbeddingBagCollection``: quotient-remainder compositional embeddings behind torchrec's collection API.

Shi et al. (KDD 2020; DLRM's ``--qr-flag``) store a table of ``n`` rows as a quotient table of
``ceil(n / c)`` rows and a remainder table of ``c`` rows, and compose row ``i`` as
``Q[i // c] * R[i % c]`` (or ``+``): every row stays distinct, which the hashing trick at the same
bytes cannot give. It is the simplest compression a TT table has to beat at equal bytes
(``bench.compression``).

Both halves of every composed table live in ONE ordinary torchrec ``EmbeddingBagCollection``
(``inner``), so ``DistributedModelParallel`` shards them and fbgemm's fused optimizer updates
them in backward exactly as it does dense tables; this module only rewrites the ids
(``i // c``, ``i % c``) and composes the looked-up rows. Tables at or below
``QRConfig.threshold`` rows stay plain tables in the same inner collection.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys.configs import QRConfig
from recsys.feature_checks import check_distinct_features, check_features_present

__all__ = ["QRConfig", "QREmbeddingBagCollection"]

QUOTIENT, REMAINDER = "__quotient", "__remainder"


class QREmbeddingBagCollection(nn.Module):
    """Pooled embeddings of a ``KeyedJaggedTensor``; tables above ``qr_config.threshold`` rows composed.

    Args:
        tables: torchrec ``EmbeddingBagConfig`` s, one feature or more each, sum pooling.
        qr_config: which tables are composed, with how many collisions, by which operation.
        device: device of the inner collection (``meta`` lets ``DistributedModelParallel`` materialise it
            sharded).

    ``embedding_bag_configs()`` answers the original tables, so torchrec's ``DLRM`` reads its widths unchanged.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        qr_config: QRConfig | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not tables:
            raise ValueError("a collection needs at least one table")
        self.qr_config = qr_config or QRConfig()
        self._configs = list(tables)
        check_distinct_features(self._configs)
        self.collisions: dict[str, int] = {}  # composed table -> c
        self._feature_collisions: dict[str, int] = {}  # feature of a composed table -> c
        inner: list[EmbeddingBagConfig] = []
        for table in self._configs:
            if table.pooling.name.lower() != "sum":
                raise ValueError(f"table {table.name!r}: QR composes sum-pooled bags only, got {table.pooling.name}")
            if not self.qr_config.is_composed(table):
                inner.append(table)
                continue
            c = self.qr_config.collisions_for(table.num_embeddings)
            self.collisions[table.name] = c
            for suffix, rows in ((QUOTIENT, -(-table.num_embeddings // c)), (REMAINDER, c)):
                inner.append(
                    EmbeddingBagConfig(
                        name=table.name + suffix,
                        embedding_dim=table.embedding_dim,
                        num_embeddings=rows,
                        feature_names=[f + suffix for f in table.feature_names],
                    )
                )
            self._feature_collisions.update(dict.fromkeys(table.feature_names, c))
        self.inner = EmbeddingBagCollection(tables=inner, device=device)
        self._plain_features = [f for t in self._configs if t.name not in self.collisions for f in t.feature_names]
        self._composed_features = list(self._feature_collisions)
        self._num_embeddings = {f: t.num_embeddings for t in self._configs for f in t.feature_names}
        self._feature_order = [f for t in self._configs for f in t.feature_names]
        self._inner_order = [f for t in inner for f in t.feature_names]

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._configs

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys = features.keys()
        check_features_present(self._feature_order, keys)
        if features.weights_or_none() is not None:
            raise ValueError(
                "QREmbeddingBagCollection takes unweighted features (a plain EmbeddingBagCollection "
                "ignores the weights of an unweighted table; composed tables refuse them)"
            )
        index = {k: i for i, k in enumerate(keys)}
        kjt = features.permute([index[f] for f in self._plain_features + self._composed_features])
        values, batch = kjt.values().long(), kjt.stride()
        lengths2d = kjt.lengths().view(-1, batch)
        self._check_ids(values, lengths2d.sum(1))
        # every rank must take the same path: DMP's input dist needs one stride per step on all ranks
        single_hot = torch.tensor(int(lengths2d.numel() == 0 or int(lengths2d.max()) <= 1), device=values.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(single_hot, op=dist.ReduceOp.MIN)
        pooled = self._single_hot(values, lengths2d) if bool(single_hot) else self._multi_hot(values, lengths2d)
        return KeyedTensor.from_tensor_list(self._feature_order, [pooled[f] for f in self._feature_order])

    # -- lookups -------------------------------------------------------------------
    def _check_ids(self, values: torch.Tensor, per_feature: torch.Tensor) -> None:
        """Ids outside their table would be silently folded into another row by ``// c``: refuse them."""
        if not values.numel():
            return
        order = self._plain_features + self._composed_features
        sizes = torch.tensor([self._num_embeddings[f] for f in order], device=values.device)
        limit = torch.repeat_interleave(sizes, per_feature.to(sizes.device), output_size=values.numel())
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            at = int(bad.nonzero()[0])
            feature = order[int(torch.searchsorted(per_feature.cumsum(0), torch.tensor(at), right=True))]
            raise IndexError(f"feature {feature!r}: id {int(values[at])} outside its table of {int(limit[at])} rows")

    def _split_ids(self, values: torch.Tensor, per_feature: torch.Tensor):
        """The plain features' ids, and the composed features' quotient and remainder ids."""
        n_plain = len(self._plain_features)
        cs = torch.tensor(
            [1] * n_plain + [self._feature_collisions[f] for f in self._composed_features], device=values.device
        )
        c = torch.repeat_interleave(cs, per_feature.to(cs.device), output_size=values.numel())
        plain = int(per_feature[:n_plain].sum())
        return values[:plain], values[plain:] // c[plain:], values[plain:] % c[plain:]

    def _inner_kjt(self, plain, quotient, remainder, lengths: torch.Tensor) -> KeyedJaggedTensor:
        """One KJT of the inner collection: plain features, then each composed feature's quotient and remainder.

        ``lengths`` is ``(features, stride)``, the plain features first.
        """
        n_plain, stride = len(self._plain_features), lengths.shape[1]
        composed_lengths = lengths[n_plain:]
        per = composed_lengths.sum(1).tolist()
        keys, vals, lens = list(self._plain_features), [plain], [lengths[:n_plain].reshape(-1)]
        for f, q, r, ln in zip(self._composed_features, quotient.split(per), remainder.split(per), composed_lengths,
                               strict=True):  # fmt: skip
            keys += [f + QUOTIENT, f + REMAINDER]
            vals += [q, r]
            lens += [ln, ln]
        kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(vals), lengths=torch.cat(lens), stride=stride)
        index = {k: i for i, k in enumerate(keys)}
        return kjt.permute([index[f] for f in self._inner_order])

    def _compose(self, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return q * r if self.qr_config.operation == "mult" else q + r

    def _single_hot(self, values, lengths2d: torch.Tensor) -> dict[str, torch.Tensor]:
        """At most one id per bag (Criteo): the pooled halves are the rows themselves, composed per bag.

        An empty bag pools to zeros in both halves, and composes to zeros, as a plain table gives.
        """
        plain, quotient, remainder = self._split_ids(values, lengths2d.sum(1))
        out = self.inner(self._inner_kjt(plain, quotient, remainder, lengths2d)).to_dict()
        pooled = {f: out[f] for f in self._plain_features}
        for f in self._composed_features:
            pooled[f] = self._compose(out[f + QUOTIENT], out[f + REMAINDER])
        return pooled

    def _multi_hot(self, values, lengths2d: torch.Tensor) -> dict[str, torch.Tensor]:
        """Bags of several ids: each id of a composed feature looked up alone, composed, then summed per bag.

        The inner lookup's stride is the most ids any composed feature has in the batch (agreed across
        ranks: DMP's input dist needs one stride on every rank), padded with empty bags; plain features keep
        their bags, padded to the same stride.
        """
        n_plain, batch = len(self._plain_features), lengths2d.shape[1]
        per_feature = lengths2d.sum(1)
        plain, quotient, remainder = self._split_ids(values, per_feature)
        counts = per_feature[n_plain:]
        stride = torch.tensor(max(batch, int(counts.max()) if counts.numel() else 0), device=lengths2d.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stride, op=dist.ReduceOp.MAX)
        padded = torch.zeros(lengths2d.shape[0], int(stride), dtype=lengths2d.dtype, device=lengths2d.device)
        padded[:n_plain, :batch] = lengths2d[:n_plain]
        for i, count in enumerate(counts.tolist()):
            padded[n_plain + i, :count] = 1  # one id a bag
        out = self.inner(self._inner_kjt(plain, quotient, remainder, padded)).to_dict()
        pooled = {f: out[f][:batch] for f in self._plain_features}
        for i, f in enumerate(self._composed_features):
            count = int(counts[i])
            rows = self._compose(out[f + QUOTIENT][:count], out[f + REMAINDER][:count])  # (ids, D)
            bag = torch.repeat_interleave(
                torch.arange(batch, device=rows.device), lengths2d[n_plain + i].to(rows.device), output_size=count
            )
            pooled[f] = torch.zeros(batch, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, bag, rows)
        return pooled

    # -- reporting -----------------------------------------------------------------
    def table_report(self) -> dict[str, dict]:
        """Per table: kind (``qr`` or ``dense``), rows, bytes as stored, bytes dense, and the split if composed."""
        report = {}
        for table in self._configs:
            dim, rows = table.embedding_dim, table.num_embeddings
            dense_bytes = rows * dim * 4
            entry = {"rows": rows, "dense_bytes": dense_bytes, "cache_bytes": 0}
            if table.name in self.collisions:
                c = self.collisions[table.name]
                quotient_rows = -(-rows // c)
                entry |= {"kind": "qr", "bytes": (quotient_rows + c) * dim * 4, "collisions": c,
                          "quotient_rows": quotient_rows, "operation": self.qr_config.operation}  # fmt: skip
            else:
                entry |= {"kind": "dense", "bytes": dense_bytes}
            report[table.name] = entry
        return report
