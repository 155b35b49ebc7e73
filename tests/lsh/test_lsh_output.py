"""LSHOutputLayer against the full softmax, its sparse-gradient contract, state and schedules."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.lsh import build_buckets
from pipelines.training.checkpoint import load_checkpoint, save_checkpoint
from recsys import lsh_output
from recsys.lsh_output import FullSoftmaxOutput, LSHConfig, LSHOutputLayer


# -- references written out in the test (never through sampled_loss / FullSoftmaxOutput) ---------------------
def _softmax_cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over rows of ``logsumexp(row) - row[label]`` and its gradient ``(softmax - one_hot) / B``."""
    batch = logits.shape[0]
    shift = logits.max(dim=1, keepdim=True).values
    exp = torch.exp(logits - shift)
    logsumexp = shift.squeeze(1) + torch.log(exp.sum(1))
    loss = (logsumexp - logits[torch.arange(batch), labels]).mean()
    grad = exp / exp.sum(1, keepdim=True)
    grad[torch.arange(batch), labels] -= 1.0
    return loss, grad / batch


def _bce_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_columns (log(1 + e^z) - y z)``, mean over rows, and its gradient ``(sigmoid(z) - y) / B``."""
    batch = logits.shape[0]
    softplus = logits.clamp(min=0) + torch.log1p(torch.exp(-logits.abs()))  # log(1 + e^z), stable
    loss = (softplus - targets * logits).sum() / batch
    return loss, (1.0 / (1.0 + torch.exp(-logits)) - targets) / batch


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 2e-15) -> None:
    """``max |actual - expected| <= rel * max |expected|``: float64 rounding only (observed <= 6e-16 throughout)."""
    error = float((actual - expected).abs().max()) / float(expected.abs().max())
    assert error <= rel, error


def _targets(label_lists: list[list[int]], columns: torch.Tensor) -> torch.Tensor:
    """``(B, len(columns))`` 0/1 matrix: row ``b`` has a 1 at the column of each of its labels."""
    targets = torch.zeros(len(label_lists), columns.numel(), dtype=torch.float64)
    for row, labels in enumerate(label_lists):
        for label in labels:
            targets[row, int((columns == label).nonzero())] = 1.0
    return targets


def _pair(num_classes: int, dim: int, seed: int, **config) -> tuple[LSHOutputLayer, FullSoftmaxOutput]:
    layer = LSHOutputLayer(dim, num_classes, LSHConfig(seed=seed, **config)).double()
    full = FullSoftmaxOutput(dim, num_classes).double()
    full.weight.data.copy_(layer.weight.data)
    return layer, full


def _loss_and_grads(module: torch.nn.Module, hidden: torch.Tensor, labels) -> tuple[torch.Tensor, ...]:
    """``(loss, d loss / d hidden, d loss / d weight (dense))`` of one forward of ``module``."""
    loss = module(hidden, labels)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, module.weight])
    return loss.detach(), grad_hidden, grad_weight.to_dense() if grad_weight.is_sparse else grad_weight


@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_all_classes_in_one_bucket_gives_the_full_softmax_and_its_gradients(seed, logq):
    """One bucket and a budget of all classes: the training loss is the full softmax (log-Q is log 1 = 0).

    The reference is the cross-entropy written out here, so a wrong ``sampled_loss`` (shared by
    the layer, its eval mode and ``FullSoftmaxOutput``) cannot agree with itself.
    """
    g = torch.Generator().manual_seed(seed)
    num_classes, dim, batch = 300, 16, 24
    layer, full = _pair(
        num_classes, dim, seed, num_tables=2, num_bits=0, sample_size=num_classes, logq=logq, sparse=False
    )
    hidden = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    weight = layer.weight.detach()
    ref_loss, grad_logits = _softmax_cross_entropy_by_hand(hidden.detach() @ weight.t(), labels)
    ref_hidden, ref_weight = grad_logits @ weight, grad_logits.t() @ hidden.detach()
    sampled = _loss_and_grads(layer, hidden, labels)
    baseline = _loss_and_grads(full, hidden, labels)
    evaluated = layer.eval()(hidden, labels).detach()
    for loss in (sampled[0], baseline[0], evaluated):
        _assert_close(loss, ref_loss)  # observed relative error <= 3e-16
    for _, grad_hidden, grad_weight in (sampled, baseline):
        _assert_close(grad_hidden, ref_hidden)  # observed <= 2e-16 of the largest entry
        _assert_close(grad_weight, ref_weight)


def test_multilabel_bce_with_all_classes_equals_full_bce():
    """Label lists (one empty): BCE summed over classes and averaged over rows, written out here."""
    g = torch.Generator().manual_seed(7)
    num_classes, dim = 120, 8
    layer, full = _pair(num_classes, dim, 3, num_tables=1, num_bits=0, sample_size=num_classes)
    hidden = torch.randn(5, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = [[1, 5, 119], [0], [], [7, 8, 9, 10], [64]]
    weight = layer.weight.detach()
    targets = _targets(labels, torch.arange(num_classes))
    ref_loss, grad_logits = _bce_by_hand(hidden.detach() @ weight.t(), targets)
    ref_hidden, ref_weight = grad_logits @ weight, grad_logits.t() @ hidden.detach()
    sampled = _loss_and_grads(layer, hidden, labels)  # sparse weight gradient, made dense
    baseline = _loss_and_grads(full, hidden, labels)
    evaluated = layer.eval()(hidden, labels).detach()
    for loss in (sampled[0], baseline[0], evaluated):
        _assert_close(loss, ref_loss)  # observed relative error 0
    for _, grad_hidden, grad_weight in (sampled, baseline):
        _assert_close(grad_hidden, ref_hidden)  # observed <= 3e-16 of the largest entry
        _assert_close(grad_weight, ref_weight)


# -- log-Q correction with real collisions ----------------------------------------------------------------------
# 600 classes in 2^7 = 128 buckets x 3 tables: a 6-row batch retrieves ~110 classes, so a 160-class sample is a
# strict subset (labels + every retrieved class + ~40 uniform draws) and collision probabilities span 1e-4 .. 0.99
LOGQ_CLASSES, LOGQ_DIM, LOGQ_BATCH, LOGQ_TABLES, LOGQ_BITS, LOGQ_SAMPLE = 600, 16, 6, 3, 7, 160


def _record_selection(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Wrap the layer's ``select_sample`` to keep the retrieval counts it saw and the sample it drew."""
    drawn: dict[str, torch.Tensor] = {}
    select = lsh_output.select_sample

    def recording(counts, labels, sample_size, generator=None):
        sample, in_sample = select(counts, labels, sample_size, generator)
        drawn["counts"], drawn["sample"] = counts.clone(), sample.clone()
        return sample, in_sample

    monkeypatch.setattr(lsh_output, "select_sample", recording)
    return drawn


def _retrieved_by_hand(hidden: torch.Tensor, weight: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """``(C,)`` bool: the class shares all ``K`` sign bits of some table with some row of the batch."""
    query_bits = (hidden @ projection > 0).view(hidden.shape[0], LOGQ_TABLES, LOGQ_BITS)
    class_bits = (weight @ projection > 0).view(weight.shape[0], LOGQ_TABLES, LOGQ_BITS)
    same_bucket = (query_bits[:, None] == class_bits[None]).all(-1)  # (B, C, L)
    return same_bucket.any(-1).any(0)


def _collision_probability_by_hand(cosine: torch.Tensor, bits: int, tables: int) -> torch.Tensor:
    """SimHash: one bit agrees w.p. ``1 - theta/pi``, a table needs all ``K``, a hit needs any of ``L`` tables."""
    per_bit = 1.0 - torch.arccos(cosine) / math.pi
    return 1.0 - (1.0 - per_bit**bits) ** tables


def _logq_layer_and_batch(seed: int, multi_label: bool, logq: bool = True):
    """A layer with several buckets and a batch whose rows lie near their (first) label's weight."""
    config = LSHConfig(num_tables=LOGQ_TABLES, num_bits=LOGQ_BITS, sample_size=LOGQ_SAMPLE, logq=logq, seed=seed,
                       max_per_bucket=0, per_query_quota=False)  # all colliding classes, batch-wide  # fmt: skip
    layer = LSHOutputLayer(LOGQ_DIM, LOGQ_CLASSES, config).double()
    layer.rebuild()  # codes of the float64 weights under the float64 projection
    g = torch.Generator().manual_seed(100 + seed)
    first = torch.randint(0, LOGQ_CLASSES, (LOGQ_BATCH,), generator=g)
    noise = torch.randn(LOGQ_BATCH, LOGQ_DIM, generator=g, dtype=torch.float64)
    hidden = (3.0 * layer.weight.detach()[first] + 0.1 * noise).requires_grad_()
    if not multi_label:
        return layer, hidden, first
    extra = torch.randint(0, LOGQ_CLASSES, (LOGQ_BATCH, 2), generator=g)
    counts = torch.randint(0, 3, (LOGQ_BATCH,), generator=g)  # 1 to 3 labels a row
    lists = [sorted({int(first[b]), *extra[b, : int(counts[b])].tolist()}) for b in range(LOGQ_BATCH)]
    return layer, hidden, lists


@pytest.mark.parametrize("multi_label", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_logq_sampled_loss_and_gradients_match_a_by_hand_computation(monkeypatch, seed, multi_label):
    """The log-Q corrected loss over the sample the layer drew, recomputed from its definition.

    ``q(b, j) = P_collide(cos(h_b, w_j)) + (1 - P_collide) * uniform`` with the SimHash probability
    ``1 - (1 - (1 - theta/pi)^K)^L`` and the uniform fill rate ``(S - retrieved - labels) / (C - retrieved)``
    (the layer's documented approximation); the logits ``h_b . w_j - log q(b, j)``; cross-entropy (or BCE)
    and its gradient (the correction is a constant) written out. Catches a flipped sign of the correction,
    a dropped collision or uniform term, swapped K / L, and a miscounted retrieval.
    """
    layer, hidden, labels = _logq_layer_and_batch(seed, multi_label)
    drawn = _record_selection(monkeypatch)
    loss, grad_hidden, grad_weight = _loss_and_grads(layer, hidden, labels)

    h, weight = hidden.detach(), layer.weight.detach()
    label_ids = torch.tensor(sorted({c for row in labels for c in row}) if multi_label else labels.tolist())
    n_labels = sum(len(row) for row in labels) if multi_label else LOGQ_BATCH
    retrieved = _retrieved_by_hand(h, weight, layer.projection)
    sample = drawn["sample"]
    assert torch.equal(drawn["counts"] > 0, retrieved)  # the layer retrieved exactly the colliding classes
    # the sample: every label and retrieved class, the rest uniform draws -- a strict subset of the classes
    assert sample.numel() == LOGQ_SAMPLE < LOGQ_CLASSES
    assert bool(torch.isin(label_ids, sample).all()) and bool(torch.isin(retrieved.nonzero(), sample).all())
    num_retrieved = int(retrieved.sum())
    uniform = (LOGQ_SAMPLE - num_retrieved - n_labels) / (LOGQ_CLASSES - num_retrieved)
    assert 0.01 < uniform < 0.2, uniform  # the setup leaves room for the uniform fill (observed 0.06 .. 0.095)

    w = weight[sample]  # (S, D)
    cosine = (h @ w.t()) / (h.norm(dim=1, keepdim=True) * w.norm(dim=1)[None, :])
    collide = _collision_probability_by_hand(cosine, LOGQ_BITS, LOGQ_TABLES)
    assert float(collide.min()) < 0.01 and float(collide.max()) > 0.9  # very different per class
    inclusion = collide + (1.0 - collide) * uniform
    logits = h @ w.t() - torch.log(inclusion)
    if multi_label:
        ref_loss, grad_logits = _bce_by_hand(logits, _targets(labels, sample))
    else:
        ref_loss, grad_logits = _softmax_cross_entropy_by_hand(logits, torch.searchsorted(sample, labels))
    ref_weight = torch.zeros_like(weight)
    ref_weight[sample] = grad_logits.t() @ h  # rows outside the sample get no gradient
    _assert_close(loss, ref_loss)  # observed relative error <= 2.2e-16
    _assert_close(grad_hidden, grad_logits @ w)  # observed <= 6e-16 of the largest entry
    _assert_close(grad_weight, ref_weight)


def test_plain_sampled_loss_scores_the_same_sample_without_correction(monkeypatch):
    """``logq=False``, same seed: the same draw, and the cross-entropy of the uncorrected logits over it."""
    samples, losses = [], []
    for logq in (True, False):
        layer, hidden, labels = _logq_layer_and_batch(0, multi_label=False, logq=logq)
        drawn = _record_selection(monkeypatch)
        losses.append(layer(hidden, labels).detach())
        samples.append(drawn["sample"])
    assert torch.equal(samples[0], samples[1])  # the correction does not change what is drawn
    h, w = hidden.detach(), layer.weight.detach()[samples[1]]
    plain, _ = _softmax_cross_entropy_by_hand(h @ w.t(), torch.searchsorted(samples[1], labels))
    _assert_close(losses[1], plain)  # observed 0 difference
    assert abs(float(losses[0] - losses[1])) > 0.5, losses  # observed 3.99 vs 2.13: the correction is no no-op


def test_gradients_reach_only_sampled_rows_and_the_optimizer_leaves_the_rest():
    g = torch.Generator().manual_seed(11)
    num_classes, dim, budget = 2000, 16, 150
    layer = LSHOutputLayer(dim, num_classes, LSHConfig(num_tables=4, num_bits=6, sample_size=budget, seed=2))
    hidden = torch.randn(32, dim, generator=g)
    labels = torch.randint(0, num_classes, (32,), generator=g)
    before = layer.weight.detach().clone()
    layer(hidden, labels).backward()
    grad = layer.weight.grad.coalesce()
    rows = grad.indices()[0]
    assert rows.numel() == budget  # exactly the sample
    assert bool(torch.isin(labels, rows).all())
    assert bool((grad.values().abs().sum(1) > 0).all())
    torch.optim.Adagrad(layer.parameters(), lr=0.1).step()
    changed = (layer.weight.detach() != before).any(1).nonzero().squeeze(1)
    assert torch.equal(changed, torch.sort(rows).values)


def test_topk_from_tables_scores_exactly_and_equals_exact_topk_when_all_collide():
    g = torch.Generator().manual_seed(5)
    layer = LSHOutputLayer(12, 500, LSHConfig(num_tables=1, num_bits=0, seed=1))
    hidden = torch.randn(9, 12, generator=g)
    scores, ids = layer.topk(hidden, 7)
    ref_scores, ref_ids = torch.topk(hidden @ layer.weight.detach().t(), 7, dim=1)  # every class, by hand
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(scores, ref_scores, rtol=0, atol=4e-6)  # float32 sums in another order: observed 7e-7
    assert torch.equal(layer.exact_topk(hidden, 7)[1], ref_ids)
    hashed = LSHOutputLayer(12, 500, LSHConfig(num_tables=3, num_bits=4, seed=1))
    scores, ids = hashed.topk(hidden, 7)
    # brute force: the classes sharing a bucket with the row in some table, best 7 by inner product
    colliding = (hashed.hash(hidden)[:, None, :] == hashed.codes[None]).any(-1)  # (9, 500)
    assert int(colliding.sum(1).min()) >= 7  # every row has enough candidates (observed >= 60)
    dense = (hidden @ hashed.weight.detach().t()).masked_fill(~colliding, float("-inf"))
    ref_scores, ref_ids = torch.topk(dense, 7, dim=1)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(scores, ref_scores, rtol=0, atol=4e-6)  # observed 7e-7


def test_changed_rows_rebuild_equals_a_full_rebuild_after_training():
    g = torch.Generator().manual_seed(9)
    layer = LSHOutputLayer(
        16, 1500, LSHConfig(num_tables=4, num_bits=6, sample_size=200, schedule="fixed", rebuild_period=1000, seed=4)
    )
    opt = torch.optim.Adagrad(layer.parameters(), lr=0.5)
    for _ in range(5):
        loss = layer(torch.randn(32, 16, generator=g), torch.randint(0, 1500, (32,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = layer.changed_rows()
    assert changed.numel() > 0
    assert changed.numel() < 1500  # only the rows some step sampled
    layer.rebuild(changed)
    assert layer.changed_rows().numel() == 0
    codes = layer.hash(layer.weight)
    assert torch.equal(layer.codes, codes)
    offsets, members = build_buckets(codes, layer.num_buckets)
    assert torch.equal(layer.offsets, offsets)
    for key in torch.randint(0, offsets.numel() - 1, (20,), generator=g).tolist():
        got = torch.sort(layer.members[layer.offsets[key] : layer.offsets[key + 1]]).values
        assert torch.equal(got, members[offsets[key] : offsets[key + 1]])


def test_state_dict_and_dcp_checkpoint_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    config = LSHConfig(num_tables=3, num_bits=5, sample_size=100, learned=True, pair_buffer=256, seed=8)
    layer = LSHOutputLayer(10, 700, config)
    opt = torch.optim.Adagrad(layer.parameters(), lr=0.3)
    for _ in range(4):
        loss = layer(torch.randn(16, 10, generator=g), torch.randint(0, 700, (16,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.train_hash(steps=3)
    layer.rebuild()
    save_checkpoint(tmp_path, 4, {"model": layer.state_dict()}, {"step": 4})
    fresh = LSHOutputLayer(
        10, 700, LSHConfig(num_tables=3, num_bits=5, sample_size=100, learned=True, pair_buffer=256, seed=99)
    )
    state = {"model": fresh.state_dict()}
    load_checkpoint(tmp_path / "step-00000004", state)
    fresh.load_state_dict(state["model"])
    for name, value in layer.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[name]), name
    query = torch.randn(6, 10, generator=g)
    assert torch.equal(layer.topk(query, 5)[1], fresh.topk(query, 5)[1])
    assert int(fresh.scheduler.steps) == 4 and int(fresh.scheduler.hash_trainings) == 1


@pytest.mark.parametrize("schedule,period,expected", [("every_step", 1, 12), ("fixed", 5, 2)])
def test_fixed_and_every_step_schedules_count(schedule, period, expected):
    g = torch.Generator().manual_seed(0)
    layer = LSHOutputLayer(
        8, 300, LSHConfig(num_tables=2, num_bits=3, sample_size=50, schedule=schedule, rebuild_period=period)
    )
    for _ in range(13):  # the check runs before each step: step 13 sees 12 finished steps
        layer(torch.randn(4, 8, generator=g), torch.randint(0, 300, (4,), generator=g)).backward()
    assert layer.scheduler.rebuilds == expected


def test_bad_config_and_labels_name_the_field():
    with pytest.raises(ValueError, match="num_bits"):
        LSHConfig(num_bits=40)
    with pytest.raises(ValueError, match="schedule"):
        LSHConfig(schedule="sometimes")  # type: ignore[arg-type]
    layer = LSHOutputLayer(4, 10, LSHConfig(num_tables=1, num_bits=1))
    hidden = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="labels must be in"):
        layer(hidden, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="labels must be in"):
        layer(hidden, [[0, 3], [-1]])
