"""Process group and torchrec sharding: the same code path for one process and for torchrun.

One process still goes through ``DistributedModelParallel``: that is where torchrec plugs
fbgemm's table-batched embedding kernels with the optimizer fused into the backward pass
(on CPU too), so a single-process run trains exactly as a sharded one does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torchrec.optim as trec_optim
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
from torchrec.distributed.types import ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

log = logging.getLogger(__name__)

EMBEDDING_OPTIMIZERS = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
DENSE_OPTIMIZERS = {"adagrad": torch.optim.Adagrad, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    device: torch.device


def init_process_group(device: str = "auto") -> ProcessInfo:
    """Join torchrun's group (RANK/WORLD_SIZE set) or make a single-process one.

    gloo on CPU, nccl on CUDA. Idempotent: an existing group is reused.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return ProcessInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), device=dev)


@contextlib.contextmanager
def owned_process_group() -> Iterator[None]:
    """Destroy, when the block ends cleanly, a process group that was made inside it.

    Left to the interpreter's exit, gloo's worker threads may still hold work whose tensors
    need the GIL while the interpreter is torn down, and a torchrun rank of a finished run ends
    in ``terminate called without an active exception`` (SIGABRT; pytorch/pytorch#179291).
    The ranks meet at a barrier first, so none tears its group down while a peer still talks to
    it. After an error nothing is destroyed: the peers may be mid-collective, and destroying
    then can hang (torchtitan#1342); the process is failing anyway. A group that existed
    before the block (a caller's) is left alone.
    """
    made_here = not dist.is_initialized()
    yield
    if made_here and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


class FusedTableSharder(EmbeddingBagCollectionSharder):
    """torchrec's table sharder without ``data_parallel``: every table keeps its fused optimizer.

    The planner may replicate a small table (``data_parallel``) depending on the world size and the
    other tables; a replicated table leaves fbgemm's fused kernel and falls to the dense optimizer
    (another optimizer, another learning rate), so a run on N processes would no longer train as one.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        return [t for t in types if t != ShardingType.DATA_PARALLEL.value]


def shard_with_fused_optimizer(
    model: nn.Module,
    sparse_module: nn.Module | None,
    embedding_optimizer: str,
    embedding_lr: float,
    dense_optimizer: str,
    dense_lr: float,
    device: torch.device,
    self_updating: Sequence[str] = (),
) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    """Wrap ``model`` in DMP with ``sparse_module``'s tables updated inside the backward pass.

    ``self_updating`` names parameters that update themselves in their own backward (the
    TT cores): they are kept out of DDP's gradient reduction and of the dense optimizer.
    Returns the sharded model and one optimizer whose ``step()`` updates the dense
    parameters (the fused tables were already updated during ``backward()``) and whose
    state dict holds both, for checkpoints.
    """
    if embedding_optimizer not in EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"embedding optimizer must be one of {sorted(EMBEDDING_OPTIMIZERS)}, got {embedding_optimizer!r}"
        )
    if dense_optimizer not in DENSE_OPTIMIZERS:
        raise ValueError(f"dense optimizer must be one of {sorted(DENSE_OPTIMIZERS)}, got {dense_optimizer!r}")
    if sparse_module is not None:
        apply_optimizer_in_backward(
            EMBEDDING_OPTIMIZERS[embedding_optimizer], sparse_module.parameters(), {"lr": embedding_lr}
        )
    wrapper = DefaultDataParallelWrapper(params_to_ignore=list(self_updating))
    dmp = DistributedModelParallel(
        module=model, device=device, sharders=[FusedTableSharder()], data_parallel_wrapper=wrapper
    )
    skip = set(self_updating)
    dense_params = {
        name: p for name, p in in_backward_optimizer_filter(dmp.named_parameters()) if _unwrapped_name(name) not in skip
    }
    dense = KeyedOptimizerWrapper(dense_params, lambda params: DENSE_OPTIMIZERS[dense_optimizer](params, lr=dense_lr))
    return dmp, CombinedOptimizer([dmp.fused_optimizer, dense])


_INIT_CHUNK_ROWS = 65_536


@torch.no_grad()
def init_embedding_tables(model: nn.Module, seed: int) -> None:
    """Re-initialise every sharded embedding table the same way whatever the sharding.

    torchrec initialises each shard with the rank's own random stream, so a table's initial
    values depend on the number of processes and the plan. Here row block ``c`` of table
    ``t`` is drawn from a generator seeded by ``(seed, t, c)``, uniform in ``+-1/sqrt(N)``
    (torchrec's default), and each rank fills only the rows and columns of its shards: runs on
    any number of processes start from the same tables.
    """
    for name, value in model.state_dict().items():
        if ".embedding_bags." not in name or not name.endswith(".weight"):
            continue
        rows, cols = value.shape
        bound = 1.0 / math.sqrt(rows)
        shards = (
            [(s.metadata.shard_offsets, s.tensor) for s in value.local_shards()]
            if isinstance(value, ShardedTensor)
            else [((0, 0), value)]
        )
        table_seed = zlib.crc32(name.encode())
        for (row0, col0), tensor in shards:
            n = tensor.shape[0]
            for chunk in range(row0 // _INIT_CHUNK_ROWS, (row0 + n - 1) // _INIT_CHUNK_ROWS + 1 if n else 0):
                start = chunk * _INIT_CHUNK_ROWS
                g = torch.Generator().manual_seed(hash((seed, table_seed, chunk)) & 0x7FFF_FFFF_FFFF_FFFF)
                block = torch.empty(min(_INIT_CHUNK_ROWS, rows - start), cols).uniform_(-bound, bound, generator=g)
                lo, hi = max(start, row0), min(start + block.shape[0], row0 + n)
                tensor[lo - row0 : hi - row0] = block[lo - start : hi - start, col0 : col0 + tensor.shape[1]].to(
                    tensor.dtype
                )


def _unwrapped_name(name: str) -> str:
    """A DMP parameter name without the wrappers' prefixes (``_dmp_wrapped_module.``, ``module.``)."""
    for prefix in ("_dmp_wrapped_module.", "module."):
        name = name.removeprefix(prefix)
    return name
