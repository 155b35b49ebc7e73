"""Several TT tables in one set of cores, so a batch over all of them is one contraction.

FBTT's ``TableBatchedTTEmbeddingBag`` looks up equal-shape tables in one pass; DLRM's
tables differ in size. Tables with the same ``q_shapes`` and ranks can still share one
contraction: core ``k`` of every table has slices of the same shape ``(r_{k-1}, q_k r_k)``,
so we stack the tables' cores along the slice axis and give each table an offset. A row
is then addressed by a *global* id ``g = row_start[t] + i`` (table ``t``, row ``i``), and
its digits are ``core_start[t, k] + (i // suffix[t, k]) % p[t, k]``, each table with its
own mixed radix. One table is the special case ``T = 1``.

The prefix tree over global ids is built with ``unique_consecutive``: sorted global ids
sort by table then by row, so every level's prefixes come out sorted too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kernels.tt import PrefixTree


@dataclass(frozen=True)
class TTLayout:
    """Row and core-slice addressing of ``T`` TT tables stacked in shared cores.

    Args:
        num_embeddings: rows of each table.
        p_shapes: each table's row factorisation (d factors, product >= its rows).
    """

    num_embeddings: tuple[int, ...]
    p_shapes: tuple[tuple[int, ...], ...]
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.num_embeddings) != len(self.p_shapes) or not self.p_shapes:
            raise ValueError("one p_shapes per table, and at least one table")
        d = len(self.p_shapes[0])
        for n, p in zip(self.num_embeddings, self.p_shapes, strict=True):
            if len(p) != d:
                raise ValueError(f"all tables need {d} cores, got p_shapes {list(p)}")
            if math.prod(p) < n:
                raise ValueError(f"p_shapes {list(p)} cover {math.prod(p)} rows < {n}")

    @property
    def num_tables(self) -> int:
        return len(self.num_embeddings)

    @property
    def num_cores(self) -> int:
        return len(self.p_shapes[0])

    @property
    def total_rows(self) -> int:
        return sum(self.num_embeddings)

    def core_rows(self, k: int) -> int:
        """Slices of stacked core ``k``: the sum of the tables' ``p_k``."""
        return sum(p[k] for p in self.p_shapes)

    def row_start(self, t: int) -> int:
        return sum(self.num_embeddings[:t])

    def core_start(self, t: int, k: int) -> int:
        return sum(p[k] for p in self.p_shapes[:t])

    def table_slices(self, t: int) -> list[slice]:
        """Table ``t``'s slices of each stacked core."""
        return [
            slice(self.core_start(t, k), self.core_start(t, k) + self.p_shapes[t][k]) for k in range(self.num_cores)
        ]

    def _on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Small per-table index tensors, made once per device."""
        key = str(device)
        if key not in self._tensors:
            d, t_count = self.num_cores, self.num_tables
            p = [[self.p_shapes[t][k] for k in range(d)] for t in range(t_count)]
            suffix = [[math.prod(self.p_shapes[t][k + 1 :]) for k in range(d)] for t in range(t_count)]
            core_start = [[self.core_start(t, k) for k in range(d)] for t in range(t_count)]
            # level-k prefixes of earlier tables: keeps (table, prefix) keys distinct and sorted
            prefix_base = [
                [sum(math.prod(self.p_shapes[u][: k + 1]) for u in range(t)) for k in range(d)] for t in range(t_count)
            ]
            starts = [self.row_start(t) for t in range(t_count)]

            def long(x):
                return torch.tensor(x, dtype=torch.long, device=device)

            self._tensors[key] = {
                "row_start": long(starts),
                "row_end": long([s + n for s, n in zip(starts, self.num_embeddings, strict=True)]),
                "p": long(p),
                "suffix": long(suffix),
                "core_start": long(core_start),
                "prefix_base": long(prefix_base),
            }
        return self._tensors[key]

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global ids -> (table, row within the table)."""
        ts = self._on(rows.device)
        table = torch.searchsorted(ts["row_end"], rows, right=True)
        return table, rows - ts["row_start"][table]

    def digits(self, rows: torch.Tensor) -> torch.Tensor:
        """(n,) global ids -> (n, d) slice indices into the stacked cores."""
        ts = self._on(rows.device)
        table, local = self.split(rows)
        return ts["core_start"][table] + (local[:, None] // ts["suffix"][table]) % ts["p"][table]

    def build_tree(self, unique_rows: torch.Tensor) -> PrefixTree:
        """The prefix tree of sorted, distinct global ids (as ``torch.unique`` returns them).

        Every row's digit and node key at every level are computed at once as ``(n, d)`` matrices
        (one gather of the per-table constants each), then each level keeps one row per node: a
        few dozen fewer small operators than a level-by-level gather, which a lone served request
        and a one-thread training step both pay.
        """
        ts = self._on(unique_rows.device)
        table, local = self.split(unique_rows)
        d = self.num_cores
        prefixes = local[:, None] // ts["suffix"].index_select(0, table)  # (n, d): the row's node at each level
        digits_all = ts["core_start"].index_select(0, table) + prefixes % ts["p"].index_select(0, table)
        keys = ts["prefix_base"].index_select(0, table) + prefixes  # distinct per (table, node), sorted
        digits, parents = [], []
        previous_inverse = None
        for k in range(d - 1):
            _, inverse, counts = torch.unique_consecutive(keys[:, k], return_inverse=True, return_counts=True)
            first = torch.cumsum(counts, 0) - counts  # one row under each node
            digits.append(digits_all[:, k].index_select(0, first))
            parents.append(
                torch.zeros_like(first) if previous_inverse is None else previous_inverse.index_select(0, first)
            )
            previous_inverse = inverse
        digits.append(digits_all[:, d - 1].contiguous())  # the last level: one node per row
        parents.append(torch.zeros_like(local) if previous_inverse is None else previous_inverse)
        return PrefixTree(digit=digits, parent=parents, rows=unique_rows)


def tt_rows_from_digits(cores: list[torch.Tensor], digits: torch.Tensor, q_shapes: tuple[int, ...]) -> torch.Tensor:
    """Reference contraction of the rows whose core slices are ``digits`` (n, d): (n, D)."""
    n = digits.shape[0]
    left = cores[0][digits[:, 0]].reshape(n, q_shapes[0], -1)
    for k in range(1, len(cores)):
        left = torch.bmm(left, cores[k][digits[:, k]]).reshape(n, left.shape[1] * q_shapes[k], -1)
    return left.reshape(n, -1)
