"""Extreme-classification data in the XMC repository's sparse text format.

Format: a header ``N F C`` (points, features, labels), then one line per point,
``l1,l2,... f:v f:v ...`` with 0-based ids; a point without labels starts with a space.
Read into CSR tensors (features and labels), so batches are slices and the encoder is an
``nn.EmbeddingBag`` with per-sample weights.

Example::

    data = read_xmc("delicious.txt")
    train, test = data.rows(range(12920)), data.rows(range(12920, data.num_points))
    feat_idx, feat_val, feat_off, labels = train.batch(torch.arange(256))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class XMCData:
    """CSR features ``(indices, values, offsets (N+1,))`` and CSR labels ``(values, offsets (N+1,))``."""

    feature_indices: torch.Tensor
    feature_values: torch.Tensor
    feature_offsets: torch.Tensor
    label_values: torch.Tensor
    label_offsets: torch.Tensor
    num_features: int
    num_labels: int

    @property
    def num_points(self) -> int:
        return self.feature_offsets.numel() - 1

    def rows(self, rows: torch.Tensor | range) -> XMCData:
        """A new ``XMCData`` with these points, in this order."""
        rows = torch.as_tensor(list(rows) if isinstance(rows, range) else rows, dtype=torch.int64)
        f_idx, f_val, f_off, (l_val, l_off) = self.batch(rows)
        return XMCData(f_idx, f_val, f_off, l_val, l_off, self.num_features, self.num_labels)

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple]:
        """Features ``(indices, values, offsets (B+1,))`` and labels ``(values, offsets (B+1,))`` of ``rows``."""
        f_idx, f_off = _gather_csr(self.feature_offsets, rows)
        l_idx, l_off = _gather_csr(self.label_offsets, rows)
        return self.feature_indices[f_idx], self.feature_values[f_idx], f_off, (self.label_values[l_idx], l_off)


def _gather_csr(offsets: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the entries of ``rows`` in a CSR array, and the new offsets."""
    starts, lengths = offsets[rows], offsets[rows + 1] - offsets[rows]
    new_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    total = int(new_offsets[-1])
    segment = torch.repeat_interleave(torch.arange(rows.numel()), lengths, output_size=total)
    positions = starts[segment] + torch.arange(total) - new_offsets[:-1][segment]
    return positions, new_offsets


def read_xmc(path: str | Path) -> XMCData:
    """Parse an XMC-format file; malformed lines raise an error naming the file and line."""
    path = Path(path)
    with path.open() as f:
        header = f.readline().split()
        if len(header) != 3:
            raise ValueError(f"{path}:1: header must be 'points features labels', got {' '.join(header)!r}")
        num_points, num_features, num_labels = (int(v) for v in header)
        f_idx: list[int] = []
        f_val: list[float] = []
        f_len: list[int] = []
        l_val: list[int] = []
        l_len: list[int] = []
        for line_no, line in enumerate(f, start=2):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            label_part, _, feature_part = line.partition(" ")
            try:
                labels = [int(v) for v in label_part.split(",") if v]
                pairs = [item.split(":") for item in feature_part.split()]
                feats = [(int(i), float(v)) for i, v in pairs]
            except ValueError as exc:
                raise ValueError(f"{path}:{line_no}: malformed line ({exc})") from exc
            if any(not 0 <= c < num_labels for c in labels) or any(not 0 <= i < num_features for i, _ in feats):
                raise ValueError(f"{path}:{line_no}: label or feature id outside the header's ranges")
            l_val.extend(labels)
            l_len.append(len(labels))
            f_idx.extend(i for i, _ in feats)
            f_val.extend(v for _, v in feats)
            f_len.append(len(feats))
    if len(f_len) != num_points:
        raise ValueError(f"{path}: header says {num_points} points, found {len(f_len)}")

    def offsets(lengths: list[int]) -> torch.Tensor:
        return torch.cat([torch.zeros(1, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64).cumsum(0)])

    return XMCData(
        torch.tensor(f_idx, dtype=torch.int64),
        torch.tensor(f_val, dtype=torch.float32),
        offsets(f_len),
        torch.tensor(l_val, dtype=torch.int64),
        offsets(l_len),
        num_features,
        num_labels,
    )
