"""The TT modules on CUDA give what they give on the CPU (skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

from recsys.tt_embedding import OptimType, TableBatchedTTEmbeddingBag, TTEmbeddingBag

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("optimizer", [OptimType.EXACT_SGD, OptimType.EXACT_ADAGRAD, OptimType.EXACT_ROWWISE_ADAGRAD])
@pytest.mark.parametrize("use_cache", [False, True])
def test_training_steps_on_cuda_match_cpu(optimizer, use_cache):
    torch.manual_seed(0)
    kw = dict(tt_ranks=[8, 8], optimizer=optimizer, learning_rate=0.05, dtype=torch.float64,
              use_cache=use_cache, cache_size=64)  # fmt: skip
    cpu = TTEmbeddingBag(30_000, 16, **kw)
    gpu = TTEmbeddingBag(30_000, 16, device="cuda", **kw)
    gpu.load_state_dict(cpu.state_dict())
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        indices = (torch.rand(2_000, generator=g) ** 3 * 30_000).long()  # skewed: repeats and hot rows
        offsets = torch.arange(0, 2_000, 20)
        probe = torch.randn(100, 16, dtype=torch.float64, generator=g)
        out_cpu = cpu(indices, offsets)
        out_gpu = gpu(indices.cuda(), offsets.cuda())
        torch.testing.assert_close(out_gpu.cpu(), out_cpu)
        (out_cpu * probe).sum().backward()
        (out_gpu * probe.cuda()).sum().backward()
        if use_cache and step == 0:
            cpu.cache_populate()
            gpu.cache_populate()
    for a, b in zip(cpu.tt_cores, gpu.tt_cores, strict=True):
        torch.testing.assert_close(b.detach().cpu(), a.detach())


def test_table_batched_forward_on_cuda_matches_cpu():
    torch.manual_seed(0)
    cpu = TableBatchedTTEmbeddingBag(3, [5_000, 700, 12_000], 8, tt_ranks=4, dtype=torch.float64)
    gpu = TableBatchedTTEmbeddingBag(3, [5_000, 700, 12_000], 8, tt_ranks=4, dtype=torch.float64, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    indices = torch.cat([torch.randint(0, n, (40,)) for n in (5_000, 700, 12_000)])
    offsets = torch.arange(0, 120, 4)
    torch.testing.assert_close(gpu(indices.cuda(), offsets.cuda()).cpu(), cpu(indices, offsets))
