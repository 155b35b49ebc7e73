"""Reference models that DLRM results are judged against."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


class LogisticCTR(nn.Module):
    """Logistic regression on one-hot categoricals plus the dense features (no interactions).

    The linear model every CTR paper reports next to its deep model: one weight per
    category (an ``EmbeddingBag`` of width 1 per feature) and one per dense feature.

    Example::

        model = LogisticCTR({"C1": 100, "C2": 50}, dense_in_features=13)
        logits = model(dense, kjt)  # (B,)
    """

    def __init__(self, vocab_sizes: Mapping[str, int], dense_in_features: int) -> None:
        super().__init__()
        self.features = list(vocab_sizes)
        self.weights = nn.ModuleDict(
            {f: nn.EmbeddingBag(int(n), 1, mode="sum", include_last_offset=True) for f, n in vocab_sizes.items()}
        )
        for table in self.weights.values():
            nn.init.zeros_(table.weight)
        self.dense = nn.Linear(dense_in_features, 1)

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        logit = self.dense(dense).squeeze(1)  # (B,)
        per_feature = sparse.to_dict()
        for name in self.features:
            jt = per_feature[name]
            logit = logit + self.weights[name](jt.values(), jt.offsets()).squeeze(1)
        return logit
