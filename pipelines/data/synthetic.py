"""A synthetic click log that looks like Criteo and carries a planted, learnable click model.

Why: the real Criteo rows we may use are few (10k), while the product must be exercised at
Criteo's scale (26 tables of up to 10^7 rows, heavy-tailed traffic). This generator gives
rows in Criteo's raw layout whose statistics follow the Kaggle log (vocabulary sizes,
power-law category frequencies, missing-value rates, count-like integer columns) and whose
labels are drawn from a known logistic click model, so tests can compare what a model
learns with what the planted signal allows (the oracle AUC).

The click model is fixed by ``model_seed`` and independent of the row ``seed``: files
generated with different row seeds (train, test) share one ground truth.

Planted logit of a row::

    bias + sum_j a_j * z(I_j)                       (dense: standardised log-counts)
         + sum_k s_k * e_k(c_k)                     (per-category effects, hot categories matter)
         + sum_(k,l) <u_k(c_k), u_l(c_l)>           (pairwise interactions, DLRM's dot products)

Category effects are pseudo-random functions of (feature, category rank), computed by
hashing, so no 10^7-row table of effects is ever held in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recsys.serving.criteo import (
    DENSE_COLUMNS,
    KAGGLE_DENSE_MISSING,
    KAGGLE_SPARSE_MISSING,
    KAGGLE_VOCAB_SIZES,
    LABEL,
    NUM_DENSE,
    NUM_SPARSE,
    SPARSE_COLUMNS,
)

_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_NIBBLE_SHIFTS = np.arange(28, -1, -4, dtype=np.uint32)
_LATENT_DIM = 4


@dataclass(frozen=True)
class SyntheticCriteoConfig:
    """What the generated log looks like.

    Args:
        vocab_sizes: categories per categorical column (Kaggle sizes by default).
        zipf_exponent: power-law exponent of category frequencies (rank r drawn with
            probability proportional to (r+1)^-s).
        target_ctr: mean click probability the bias is calibrated to (Kaggle: ~0.256).
        signal_scale: multiplies every planted effect; larger means an easier task.
        informative_sparse: categorical columns (0-based) with a main effect.
        interacting_pairs: pairs of categorical columns whose latent vectors interact.
        model_seed: fixes the click model (not the rows).
    """

    vocab_sizes: tuple[int, ...] = KAGGLE_VOCAB_SIZES
    zipf_exponent: float = 1.1
    target_ctr: float = 0.256
    signal_scale: float = 1.0
    informative_sparse: tuple[int, ...] = (0, 1, 4, 5, 6, 7, 9, 10, 12, 13, 16, 18, 23, 24)
    interacting_pairs: tuple[tuple[int, int], ...] = ((0, 5), (1, 13), (4, 16), (7, 24))
    model_seed: int = 0
    dense_missing: tuple[float, ...] = KAGGLE_DENSE_MISSING
    sparse_missing: tuple[float, ...] = KAGGLE_SPARSE_MISSING

    def __post_init__(self) -> None:
        if len(self.vocab_sizes) != NUM_SPARSE:
            raise ValueError(f"vocab_sizes must have {NUM_SPARSE} entries, got {len(self.vocab_sizes)}")
        if any(v < 1 for v in self.vocab_sizes):
            raise ValueError(f"vocab_sizes must be positive, got {self.vocab_sizes}")
        if not 0.0 < self.target_ctr < 1.0:
            raise ValueError(f"target_ctr must be in (0, 1), got {self.target_ctr}")
        if self.zipf_exponent <= 0 or self.zipf_exponent == 1.0:
            raise ValueError(f"zipf_exponent must be positive and not 1, got {self.zipf_exponent}")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A fast, well-mixing 64-bit hash (SplitMix64's finaliser), vectorised."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic uniforms in (0, 1) from integer keys and a salt."""
    h = _splitmix64(keys.astype(np.uint64) ^ _splitmix64(np.array([salt], dtype=np.uint64)))
    return ((h >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def _hash_normal(keys: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic standard normals (Box-Muller over two hashed uniforms)."""
    u1 = hash_uniform(keys, 2 * salt + 1)
    u2 = hash_uniform(keys, 2 * salt + 2)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def zipf_ranks(rng: np.random.Generator, size: int, vocab_size: int, exponent: float) -> np.ndarray:
    """Category ranks in [0, vocab_size) with P(r) roughly proportional to (r+1)^-exponent.

    Inverse-CDF sampling of the continuous power law on [1, V+1), floored: exact enough for
    a frequency profile and O(1) per draw, where numpy's zipf has no upper bound.
    """
    u = rng.random(size)
    one_minus_s = 1.0 - exponent
    top = (vocab_size + 1.0) ** one_minus_s
    ranks = np.floor((1.0 + u * (top - 1.0)) ** (1.0 / one_minus_s)) - 1.0
    return np.clip(ranks, 0, vocab_size - 1).astype(np.int64)


def _category_hash(feature: int, ranks: np.ndarray) -> np.ndarray:
    """Map (feature, rank) to the 32-bit value written as 8 hex digits, as Criteo's hashes are."""
    keys = ranks.astype(np.uint64) + (np.uint64(feature + 1) << np.uint64(40))
    return (_splitmix64(keys) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def hex8(values: np.ndarray) -> np.ndarray:
    """uint32 values -> numpy ``S8`` array of lowercase 8-digit hex strings."""
    nibbles = (values.astype(np.uint32)[:, None] >> _NIBBLE_SHIFTS[None, :]) & np.uint32(0xF)
    chars = _HEX_DIGITS[nibbles]  # (n, 8) uint8
    return np.ascontiguousarray(chars).view("S8").reshape(-1)


# Log-normal parameters (mu, sigma) of the integer columns, roughly Kaggle's magnitudes.
_DENSE_LOGNORMAL = (
    (0.8, 1.0), (3.0, 2.0), (1.8, 1.2), (1.6, 1.0), (7.5, 2.0), (3.5, 1.6), (2.0, 1.3),
    (2.3, 1.0), (3.6, 1.3), (0.4, 0.5), (1.0, 0.9), (0.3, 0.8), (1.8, 1.1),
)  # fmt: skip
# Weights of the standardised log-counts; with the effects below they give an oracle AUC of
# about 0.82 at signal_scale=1 (the best published Criteo models score about 0.80-0.81).
_DENSE_WEIGHTS = (0.21, -0.15, 0.0, 0.18, -0.12, 0.0, 0.15, 0.0, 0.09, 0.18, 0.12, 0.0, -0.09)


class SyntheticCriteo:
    """Draws blocks of synthetic Criteo rows; see the module docstring for the click model.

    Example::

        gen = SyntheticCriteo(SyntheticCriteoConfig())
        block = gen.sample(np.random.default_rng(0), 1000)
        block.table.num_columns  # 40
    """

    def __init__(self, config: SyntheticCriteoConfig) -> None:
        self.config = config
        self._bias = self._calibrate_bias()

    # -- the planted click model ------------------------------------------------------
    def _dense_logit(self, dense: np.ndarray, missing: np.ndarray) -> np.ndarray:
        z = np.log1p(np.maximum(dense, 0).astype(np.float64))
        mu = np.array([m for m, _ in _DENSE_LOGNORMAL])
        sd = np.array([s for _, s in _DENSE_LOGNORMAL])
        z = np.where(missing, 0.0, (z - mu) / sd)
        return z @ np.array(_DENSE_WEIGHTS)

    def _sparse_logit(self, ranks: np.ndarray, missing: np.ndarray) -> np.ndarray:
        cfg = self.config
        seed = cfg.model_seed * 1_000_003
        logit = np.zeros(ranks.shape[0])
        for k in cfg.informative_sparse:
            # Spread of the effects: ~0.36 per informative feature, hot categories included.
            effect = 0.36 * _hash_normal(ranks[:, k], seed + 17 * k + 1)
            logit += np.where(missing[:, k], 0.0, effect)
        for a, b in cfg.interacting_pairs:
            ua = np.stack([_hash_normal(ranks[:, a], seed + 1000 + 31 * a + d) for d in range(_LATENT_DIM)], 1)
            ub = np.stack([_hash_normal(ranks[:, b], seed + 2000 + 37 * b + d) for d in range(_LATENT_DIM)], 1)
            dot = (ua * ub).sum(1) * (0.42 / np.sqrt(_LATENT_DIM))
            logit += np.where(missing[:, a] | missing[:, b], 0.0, dot)
        return logit

    def logit(self, dense: np.ndarray, dense_missing: np.ndarray, ranks: np.ndarray, sparse_missing: np.ndarray):
        """Planted logit without the bias, scaled by ``signal_scale``."""
        raw = self._dense_logit(dense, dense_missing) + self._sparse_logit(ranks, sparse_missing)
        return self.config.signal_scale * raw

    def _calibrate_bias(self) -> float:
        """Bias that makes the mean click probability equal ``target_ctr`` (bisection on a pilot)."""
        rng = np.random.default_rng(self.config.model_seed + 7919)
        parts = self._draw_features(rng, 20_000)
        logits = self.logit(*parts)
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if (1.0 / (1.0 + np.exp(-(logits + mid)))).mean() < self.config.target_ctr:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    # -- drawing rows -----------------------------------------------------------------
    def _draw_features(self, rng: np.random.Generator, n: int):
        cfg = self.config
        mu = np.array([m for m, _ in _DENSE_LOGNORMAL])
        sd = np.array([s for _, s in _DENSE_LOGNORMAL])
        dense = np.floor(np.exp(rng.normal(mu, sd, size=(n, NUM_DENSE)))).astype(np.int64) - 1
        dense[:, 1] -= rng.integers(0, 3, size=n) * (rng.random(n) < 0.05)  # I2 has small negatives
        dense = np.maximum(dense, -3)
        dense_missing = rng.random((n, NUM_DENSE)) < np.array(cfg.dense_missing)
        ranks = np.stack([zipf_ranks(rng, n, v, cfg.zipf_exponent) for v in cfg.vocab_sizes], axis=1)  # (n, 26)
        sparse_missing = rng.random((n, NUM_SPARSE)) < np.array(cfg.sparse_missing)
        return dense, dense_missing, ranks, sparse_missing

    def sample(self, rng: np.random.Generator, n: int) -> SyntheticBlock:
        dense, dense_missing, ranks, sparse_missing = self._draw_features(rng, n)
        prob = 1.0 / (1.0 + np.exp(-(self.logit(dense, dense_missing, ranks, sparse_missing) + self._bias)))
        labels = (rng.random(n) < prob).astype(np.int8)
        columns: dict[str, pa.Array] = {LABEL: pa.array(labels)}
        for j, name in enumerate(DENSE_COLUMNS):
            columns[name] = pa.array(dense[:, j], mask=dense_missing[:, j])
        for k, name in enumerate(SPARSE_COLUMNS):
            hexes = hex8(_category_hash(k, ranks[:, k]))
            columns[name] = pa.array(hexes, type=pa.binary(), mask=sparse_missing[:, k]).cast(pa.string())
        return SyntheticBlock(table=pa.table(columns), click_probability=prob, ranks=ranks)


@dataclass
class SyntheticBlock:
    """Rows in raw Criteo layout plus the ground truth behind them."""

    table: pa.Table  # label, I1..I13 (int64, null = missing), C1..C26 (hex strings, null = missing)
    click_probability: np.ndarray  # (n,) planted P(click)
    ranks: np.ndarray  # (n, 26) category popularity ranks (0 = most frequent)
