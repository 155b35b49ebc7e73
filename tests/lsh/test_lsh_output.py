"""LSHOutputLayer against the full softmax, its sparse-gradient contract, state and schedules."""

from __future__ import annotations

import pytest
import torch

from kernels.lsh import build_buckets
from pipelines.checkpoint import load_checkpoint, save_checkpoint
from recsys.lsh_output import FullSoftmaxOutput, LSHConfig, LSHOutputLayer


def _pair(num_classes, dim, seed, **config):
    layer = LSHOutputLayer(dim, num_classes, LSHConfig(seed=seed, **config)).double()
    full = FullSoftmaxOutput(dim, num_classes).double()
    full.weight.data.copy_(layer.weight.data)
    return layer, full


@pytest.mark.parametrize("logq", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_all_classes_in_one_bucket_gives_the_full_softmax_and_its_gradients(seed, logq):
    g = torch.Generator().manual_seed(seed)
    num_classes, dim, batch = 300, 16, 24
    layer, full = _pair(
        num_classes, dim, seed, num_tables=2, num_bits=0, sample_size=num_classes, logq=logq, sparse=False
    )
    hidden = torch.randn(batch, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    loss = layer(hidden, labels)
    (grad_h, grad_w) = torch.autograd.grad(loss, [hidden, layer.weight])
    ref = full(hidden, labels)
    ref_h, ref_w = torch.autograd.grad(ref, [hidden, full.weight])
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(grad_h, ref_h, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad_w, ref_w, rtol=1e-10, atol=1e-12)


def test_multilabel_bce_with_all_classes_equals_full_bce():
    g = torch.Generator().manual_seed(7)
    num_classes, dim = 120, 8
    layer, full = _pair(num_classes, dim, 3, num_tables=1, num_bits=0, sample_size=num_classes)
    hidden = torch.randn(5, dim, generator=g, dtype=torch.float64, requires_grad=True)
    labels = [[1, 5, 119], [0], [], [7, 8, 9, 10], [64]]
    loss = layer(hidden, labels)
    ref = full(hidden, labels)
    targets = torch.zeros(5, num_classes, dtype=torch.float64)
    for row, ls in enumerate(labels):
        targets[row, ls] = 1.0
    by_hand = (
        torch.nn.functional.binary_cross_entropy_with_logits(hidden @ full.weight.t(), targets, reduction="none")
        .sum(1)
        .mean()
    )
    assert torch.allclose(ref, by_hand) and torch.allclose(loss, ref, rtol=1e-12)
    sparse_grad = torch.autograd.grad(loss, layer.weight)[0].to_dense()
    assert torch.allclose(sparse_grad, torch.autograd.grad(ref, full.weight)[0], rtol=1e-10, atol=1e-12)


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
    ref_scores, ref_ids = layer.exact_topk(hidden, 7)
    assert torch.equal(ids, ref_ids) and torch.allclose(scores, ref_scores)
    hashed = LSHOutputLayer(12, 500, LSHConfig(num_tables=3, num_bits=4, seed=1))
    scores, ids = hashed.topk(hidden, 7)
    valid = ids >= 0
    recomputed = (hidden[:, None, :] * hashed.weight.detach()[ids.clamp(min=0)]).sum(-1)
    assert torch.allclose(scores[valid], recomputed[valid], atol=1e-5)
    assert bool((scores[:, :-1] >= scores[:, 1:]).all())


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
    with pytest.raises(ValueError, match="labels must be in"):
        layer(torch.randn(2, 4), torch.tensor([1, 10]))
