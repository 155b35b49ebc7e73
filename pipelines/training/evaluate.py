"""Exact AUC and log loss of a click model over a split (gathered over all ranks)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchmetrics.functional.classification import binary_auroc
from torchrec.datasets.utils import Batch


def gather_predictions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (logits, labels), so the AUC is the AUC of the whole split, not an average."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return logits, labels
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (logits.cpu(), labels.cpu()))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """AUC (exact, no thresholds) and mean log loss of logits against 0/1 labels."""
    if labels.numel() == 0:
        raise ValueError("cannot evaluate on an empty split")
    logits, labels = logits.double(), labels.double()
    logloss = F.binary_cross_entropy_with_logits(logits, labels).item()
    auc = float("nan") if labels.min() == labels.max() else binary_auroc(logits, labels.long()).item()
    return {"auc": auc, "logloss": logloss, "rows": int(labels.numel()), "ctr": labels.mean().item()}


def _in_step(batches: Iterable[Batch], placeholder: Batch | None) -> Iterable[tuple[Batch, bool]]:
    """``(batch, real)`` until every rank is done: a sharded model's forward is a collective, so a rank
    whose split ran out keeps stepping with ``placeholder`` (its outputs are dropped)."""
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    last = placeholder
    for batch in batches:
        if distributed:
            more = torch.ones(1)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
        last = batch
        yield batch, True
    if not distributed:
        return
    while True:
        more = torch.zeros(1)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if last is None:
            raise RuntimeError("a rank has no evaluation rows and no placeholder batch to keep in step")
        yield last, False


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable[Batch], device: torch.device, placeholder: Batch | None = None
) -> dict[str, float]:
    """Run a ``DLRMTrain``-style model (returns ``loss, (loss, logits, labels)``) over ``batches``.

    Under ``torchrun`` every rank passes its own batches; ranks with fewer keep the others company
    (``placeholder``, or their last batch) and the predictions of all ranks are gathered.
    """
    was_training = model.training
    model.eval()
    all_logits, all_labels = [], []
    for batch, real in _in_step(batches, placeholder):
        _, (_, logits, labels) = model(batch.to(device))
        if not real:
            continue
        all_logits.append(logits.detach().reshape(-1).float().cpu())
        all_labels.append(labels.detach().reshape(-1).float().cpu())
    model.train(was_training)
    logits = torch.cat(all_logits) if all_logits else torch.empty(0)
    labels = torch.cat(all_labels) if all_labels else torch.empty(0)
    return binary_metrics(*gather_predictions(logits, labels))
