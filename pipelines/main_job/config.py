"""What the main job does, in one place: data, the two trainings, the export, the service queries."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.export.cache import CACHE_POLICIES
from recsys.serving import CORE_DTYPES
from recsys.serving.criteo import KAGGLE_VOCAB_SIZES, NUM_RESERVED_INDICES, kaggle_table_rows


@dataclass(frozen=True)
class MainJobConfig:
    """The main job: ``python -m pipelines`` (``make demo``) builds one from its flags.

    Args:
        out: the job directory (raw/, data/, dense/, tt/, export/, service.log, summary.json, summary.png).
        inputs: raw Criteo logs to train on; empty: synthetic rows from ``pipelines.generate``.
        test: raw logs that form the test split whole (with ``inputs``; synthetic: a second generated file).
        rows: synthetic training rows (the test file gets a tenth, at least 1,000).
        seed: seed of the synthetic rows (the test file uses ``seed + 1``; both share one click model).
        vocab: categorical mapping of ``pipelines.preprocess``.
        max_index: rows per table at most. ``hash``: column ``k`` hashes to min(Kaggle vocabulary of ``k`` + 2,
            ``max_index``) rows, as DLRM's ``--max-ind-range`` sizes Kaggle's tables; ``freq``: the vocabulary cap.
        dense: train the dense baseline (off: ``--skip-dense``; its bytes are still reported, from the shapes).
        serve: start the service on the export and query it (off: ``--no-serve``).
        tt_cache_size: LFU cache rows per TT table of the TT run.
        core_dtypes: the export's TT core storage, tried in order: the first the AUC gate accepts is kept.
        max_auc_drop: the export's AUC gate.
        cache: what the export keeps of the cache (``pipelines.export --cache``).
        rank_requests: 100-candidate ``/v1/rank`` requests timed, one at a time.
        rank_candidates: candidates per rank request.
        score_batch: rows per ``/v1/score`` request when scoring the test split.
        train_args: further ``pipelines.train`` flags, given to both runs.
    """

    out: Path = Path("runs/demo")
    inputs: tuple[Path, ...] = ()
    test: tuple[Path, ...] = ()
    rows: int = 1_000_000
    seed: int = 0
    vocab: Literal["hash", "freq"] = "hash"
    max_index: int = 1_000_000
    dense: bool = True
    serve: bool = True
    tt_cache_size: int = 512
    core_dtypes: tuple[str, ...] = ("int8", "fp16", "fp32")
    max_auc_drop: float = 0.001
    cache: str = "occupied"
    rank_requests: int = 200
    rank_candidates: int = 100
    score_batch: int = 2048
    train_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.inputs and not self.test and self.serve:
            raise ValueError(
                "--input without --test: the service scores the raw rows of the test split, which only --test "
                "files give whole; pass --test FILE (e.g. the last day) or --no-serve"
            )
        if self.test and not self.inputs:
            raise ValueError("--test needs --input (synthetic runs generate their own test file)")
        for name in ("rows", "max_index", "rank_requests", "rank_candidates", "score_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_index <= NUM_RESERVED_INDICES:
            raise ValueError(
                f"--max-index must be > {NUM_RESERVED_INDICES} (rows 0 and 1 are reserved), got {self.max_index}"
            )
        if self.tt_cache_size < 0:
            raise ValueError(f"--tt-cache-size must be >= 0, got {self.tt_cache_size}")
        if not self.core_dtypes or any(d not in CORE_DTYPES for d in self.core_dtypes):
            raise ValueError(f"--core-dtypes must name some of {CORE_DTYPES}, got {self.core_dtypes}")
        if self.cache not in CACHE_POLICIES:
            raise ValueError(f"--cache must be one of {CACHE_POLICIES}, got {self.cache!r}")
        if self.vocab not in ("hash", "freq"):
            raise ValueError(f"--vocab must be hash or freq, got {self.vocab!r}")

    @property
    def test_rows(self) -> int:
        return max(self.rows // 10, 1_000)

    def table_rows(self) -> tuple[int, ...]:
        """``pipelines.preprocess --max-index`` per column."""
        if self.vocab == "freq":
            return (self.max_index,) * len(KAGGLE_VOCAB_SIZES)
        return kaggle_table_rows(self.max_index)
