"""Replicated TT tables (``set_process_group``): two ranks of a real gloo group, run as two threads of this process.

``set_process_group`` documents DDP's semantics for the fused optimizers: every rank's backward averages the
cores' and the cached rows' gradients over the ranks before the fused update, and the LFU counts add every
rank's lookups, so the replicas stay identical. The references are independent of the module's sync: a
``sparse=False`` module (or a dense table) stepped by ``torch.optim`` on the mean of the ranks' losses, and the
counts of both ranks' lookups added by hand. A gloo group of two needs no second process: two
``ProcessGroupGloo`` objects over one ``HashStore`` talk to each other from two threads, which keeps these tests
at a second or so (the torchrun tests of ``tests/pipelines/training/test_distributed.py`` are slow).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import pytest
import torch
import torch.distributed as dist
from torch import nn

from kernels import tt_native
from recsys.tt_embedding import OptimType, TTEmbeddingBag

T = TypeVar("T")
WORLD = 2
P, Q, RANKS = (4, 5, 6), (2, 2, 2), (3, 3)  # 120 rows of width 8; rows 0-29 share core 0's slice 0
N, D = 120, 8
# a rank stuck in a collective its peer never joins (a bug) gives up after this, so a failing test ends
COLLECTIVE_TIMEOUT = timedelta(seconds=20)


@pytest.fixture(autouse=True)
def _native_kernels_loaded() -> None:
    """Build or load the native kernels here, not inside a rank's thread (a first build takes minutes)."""
    tt_native.ops()


def _on_ranks(fn: Callable[[int], T]) -> list[T]:
    """``fn(rank)`` for every rank, each on a thread of its own (collectives block until every rank joins)."""
    results: list[T | None] = [None] * WORLD
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:  # re-raised in the test's thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(WORLD)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=3 * COLLECTIVE_TIMEOUT.total_seconds())
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads), "a rank never returned"
    return results  # type: ignore[return-value]


def _gloo_groups(world: int = WORLD) -> list[dist.ProcessGroup]:
    """One gloo process group per rank, all over one in-memory store (no default group is initialised)."""
    store = dist.HashStore()
    groups: list[dist.ProcessGroup | None] = [None] * world
    threads = [
        threading.Thread(
            target=lambda r=r: groups.__setitem__(r, dist.ProcessGroupGloo(store, r, world, COLLECTIVE_TIMEOUT))
        )
        for r in range(world)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(g is not None for g in groups), "gloo rendezvous failed"
    return groups  # type: ignore[return-value]


def _module(seed: int, **kwargs) -> TTEmbeddingBag:
    torch.manual_seed(seed)
    return TTEmbeddingBag(
        N, D, tt_ranks=list(RANKS), tt_p_shapes=list(P), tt_q_shapes=list(Q), learning_rate=0.05, eps=1e-8,
        weight_dist="normal", init_std=1.0, dtype=torch.float64, **kwargs,
    )  # fmt: skip


def _replicas(**kwargs) -> list[TTEmbeddingBag]:
    """WORLD identical replicas, each joined to its rank's group (as every rank builds it from one seed)."""
    replicas = [_module(seed=3, **kwargs) for _ in range(WORLD)]
    for replica, group in zip(replicas, _gloo_groups(), strict=True):
        replica.set_process_group(group)
        assert replica.process_group is group
    return replicas


def _batch(rows: list[int], lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bags of ``rows`` (lengths given; empty bags allowed) and a regression target per bag."""
    offsets = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    target = torch.randn(len(lengths), D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(rows, dtype=torch.long), offsets, target


def _loss(module: nn.Module, batch) -> torch.Tensor:
    indices, offsets, target = batch
    return (module(indices, offsets) - target).pow(2).sum()


# Per step, the batch of each rank. Step 0: the ranks look up different numbers of distinct rows, some rows on
# both. Step 1: rank 1's bags are all empty (it must still join the all-reduce); rank 0's rows all lie in core
# 0's slice 0 (a core with a single touched slice).
STEPS = [
    [
        _batch([3, 17, 17, 64, 119, 64, 90], [3, 0, 2, 2], seed=1),
        _batch([17, 5, 64, 64, 101, 33, 47, 8, 119], [2, 4, 0, 3], seed=2),
    ],
    [
        _batch([1, 29, 7, 7, 12], [2, 1, 2, 0], seed=3),
        _batch([], [0, 0, 0, 0], seed=4),
    ],
]


@pytest.mark.parametrize(
    ("optimizer", "torch_optimizer"),
    [
        (OptimType.EXACT_SGD, lambda params: torch.optim.SGD(params, lr=0.05)),
        (OptimType.EXACT_ADAGRAD, lambda params: torch.optim.Adagrad(params, lr=0.05, eps=1e-8)),
    ],
)
def test_replicas_apply_the_mean_gradient_of_all_ranks_and_stay_identical(optimizer, torch_optimizer):
    replicas = _replicas(optimizer=optimizer)
    reference = _module(seed=3, sparse=False)  # same initial cores, plain autograd
    opt = torch_optimizer(list(reference.parameters()))
    for step, batches in enumerate(STEPS):
        _on_ranks(lambda rank: _loss(replicas[rank], batches[rank]).backward())  # noqa: B023 - run at once
        opt.zero_grad()
        (sum(_loss(reference, batch) for batch in batches) / WORLD).backward()  # what DDP averages
        opt.step()
        for k, (core, want) in enumerate(zip(replicas[0].tt_cores, reference.tt_cores, strict=True)):
            # observed max |replica - torch.optim| 0 on entries up to 5 (float64), native and torch path alike
            torch.testing.assert_close(core.detach(), want.detach(), rtol=0, atol=1e-13, msg=f"step {step}, core {k}")
            assert torch.equal(core, replicas[1].tt_cores[k]), "the replicas drifted apart"


@torch.no_grad()
def _count_only(module: TTEmbeddingBag, batch) -> None:
    """A forward in training mode without gradients: the LFU counts move, nothing is trained."""
    module(*batch[:2])


def test_replicated_cache_counts_every_ranks_lookups_and_trains_cached_rows_on_the_mean_gradient():
    """LFU counts are the sum over the ranks; the cached rows, dense rows on every replica, take the mean gradient
    (SGD against ``torch.optim.SGD`` on a dense table holding the cached rows; every looked-up row is cached, so
    the cores never move)."""
    replicas = _replicas(optimizer=OptimType.SGD, use_cache=True, cache_size=16)
    counting = STEPS[0]  # 9 distinct rows in all
    _on_ranks(lambda rank: _count_only(replicas[rank], counting[rank]))
    expected = sum(torch.bincount(batch[0], minlength=N) for batch in counting)
    for replica in replicas:
        assert torch.equal(replica.cache_counts, expected.to(torch.int32))
        replica.cache_populate()
    cached_rows = torch.nonzero(expected).squeeze(1)
    assert torch.equal(replicas[0]._cached()[0], cached_rows)

    cores = [c.detach().clone() for c in replicas[0].tt_cores]
    table = nn.Parameter(replicas[0].full_weight().clone())
    opt = torch.optim.SGD([table], lr=0.05)
    training = [counting[0], _batch([17, 64, 64, 119, 3], [2, 3, 0, 0], seed=5)]  # rank 1: all cached, repeated
    for _ in range(2):
        _on_ranks(lambda rank: _loss(replicas[rank], training[rank]).backward())
        opt.zero_grad()
        sum(
            (nn.functional.embedding_bag(indices, table, offsets, mode="sum") - target).pow(2).sum()
            for indices, offsets, target in training
        ).div(WORLD).backward()
        opt.step()
    for replica in replicas:
        # observed max |replica - torch.optim| 0 on entries up to 6.4 (float64), native and torch path alike
        torch.testing.assert_close(replica.full_weight(), table.detach(), rtol=0, atol=1e-13)
        for core, before in zip(replica.tt_cores, cores, strict=True):
            assert torch.equal(core.detach(), before)
    # counts kept adding both ranks' lookups while training
    expected += 2 * sum(torch.bincount(batch[0], minlength=N) for batch in training)
    assert all(torch.equal(replica.cache_counts, expected.to(torch.int32)) for replica in replicas)


def test_a_group_of_one_or_none_means_no_replication():
    """One replica is no replication: ``set_process_group`` keeps no group (and runs no collective) for None or a
    group of one rank, and the module trains as an unreplicated one."""
    module = _module(seed=0)
    module.set_process_group(None)
    assert module.process_group is None
    (single,) = _gloo_groups(world=1)
    module.set_process_group(single)
    assert module.process_group is None
