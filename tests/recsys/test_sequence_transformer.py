"""The causal sequence transformer (recsys/sequence_transformer.py): torch's encoder as the reference, the LSH
attentions in their exact limit, causality, the lite options, and its builder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recsys.sequence_encoders import HistoryEncoder, build_history_encoder
from recsys.sequence_transformer import SequenceTransformer, SequenceTransformerConfig

ITEMS, T, D, HEADS = 40, 12, 16, 2
LSH_CAUSAL = ("reformer", "smyrf", "learned_lsh")


def _history(batch: int = 5, seed: int = 0) -> torch.Tensor:
    """Random left-padded histories (``-1``), each of 1..T real items, one of them full."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(0, ITEMS, (batch, T), generator=g)
    lengths = torch.randint(1, T + 1, (batch,), generator=g)
    lengths[0] = T
    real = torch.arange(T)[None, :] >= T - lengths[:, None]  # (batch, T)
    return torch.where(real, items, torch.full_like(items, -1))


def _model(attention: str = "dense", layers: int = 2, seed: int = 0, **options) -> SequenceTransformer:
    torch.manual_seed(seed)
    config = SequenceTransformerConfig(layers=layers, heads=HEADS, attention=attention, **options)
    return SequenceTransformer(ITEMS, T, D, 0.1, config).double().eval()


def _torch_reference(model: SequenceTransformer) -> nn.TransformerEncoder:
    """``nn.TransformerEncoder`` (pre-norm, GELU, final LayerNorm) holding ``model``'s block weights."""
    layer = nn.TransformerEncoderLayer(
        D, HEADS, dim_feedforward=model.config.ffn_mult * D, dropout=0.0, activation="gelu", batch_first=True,
        norm_first=True,
    )  # fmt: skip
    ref = nn.TransformerEncoder(layer, model.config.layers, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    ref = ref.double().eval()
    with torch.no_grad():
        for depth, torch_layer in enumerate(ref.layers):
            ours = model.layer(depth)
            torch_layer.self_attn.in_proj_weight.copy_(ours.qkv.weight)
            torch_layer.self_attn.in_proj_bias.copy_(ours.qkv.bias)
            torch_layer.self_attn.out_proj.load_state_dict(ours.proj.state_dict())
            torch_layer.linear1.load_state_dict(ours.ffn[0].state_dict())
            torch_layer.linear2.load_state_dict(ours.ffn[2].state_dict())
            torch_layer.norm1.load_state_dict(ours.norm_attn.state_dict())
            torch_layer.norm2.load_state_dict(ours.norm_ffn.state_dict())
        ref.norm.load_state_dict(model.norm.state_dict())
    return ref


def _reference_mask(valid: torch.Tensor) -> torch.Tensor:
    """``(B * H, T, T)`` bool, True = not attended: causal, padded keys out; a padded query reads itself only
    (torch gives NaN to a query with no key, which would reach the next layer through 0 * NaN)."""
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & valid[:, None, :]  # (B, T, T)
    allowed |= torch.eye(T, dtype=torch.bool) & ~valid[:, :, None]
    return ~allowed.repeat_interleave(HEADS, dim=0)


def test_dense_transformer_equals_torch_transformer_encoder_with_its_weights():
    model, history = _model(layers=2), _history()
    ref = _torch_reference(model)
    x, valid = model.embed(history)
    expected = ref(x, mask=_reference_mask(valid), src_key_padding_mask=~valid)  # (B, T, D)
    got = model.sequence(history)
    torch.testing.assert_close(got[valid], expected[valid], rtol=0, atol=1e-12)
    torch.testing.assert_close(model(history), expected[:, -1], rtol=0, atol=1e-12)  # the last position is real
    torch.testing.assert_close(model(history, positions=valid), expected[valid], rtol=0, atol=1e-12)


def test_the_embedding_is_item_plus_right_aligned_position_and_zero_at_padding():
    model, history = _model(item_factor_dim=6), _history()
    x, valid = model.embed(history[:, 4:])  # a shorter history uses the last positions
    items = model.items.weight[history[:, 4:].clamp(min=0)] @ model.item_proj.weight.t()
    expected = (items + model.positions.weight[4:]) * valid[..., None]
    torch.testing.assert_close(x, expected, rtol=0, atol=1e-12)
    assert valid.tolist() == (history[:, 4:] >= 0).tolist()
    with pytest.raises(ValueError, match="history of 13 positions, the model has 12"):
        model(torch.zeros(2, T + 1, dtype=torch.int64))


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("attention", LSH_CAUSAL)
def test_lsh_attention_in_its_exact_limit_is_the_dense_transformer(attention, n_hashes):
    """One chunk / cluster covering the history (bucket_size >= n), every round: the dense model's outputs and
    gradients, with the same weights."""
    dense = _model("dense", seed=3)
    lsh = _model(attention, seed=4, bucket_size=T, n_hashes=n_hashes)
    missing, unexpected = lsh.load_state_dict(dense.state_dict(), strict=False)
    assert unexpected == [] and all(".attention." in k for k in missing)  # learned_lsh's rotations stay its own
    history = _history(seed=1)
    valid = history >= 0
    out_dense, out_lsh = dense(history, positions=valid), lsh(history, positions=valid)
    torch.testing.assert_close(out_lsh, out_dense, rtol=0, atol=1e-10)
    weights = torch.randn_like(out_dense)
    (out_dense * weights).sum().backward()
    (out_lsh * weights).sum().backward()
    for (name, p_dense), (_, p_lsh) in zip(dense.named_parameters(), lsh.named_parameters(), strict=True):
        torch.testing.assert_close(p_lsh.grad, p_dense.grad, rtol=0, atol=1e-9, msg=name)


@pytest.mark.parametrize("attention", ["dense", *LSH_CAUSAL])
def test_a_changed_future_item_moves_no_earlier_output(attention):
    """Exactly so for dense attention; for the LSH ones in their exact limit (away from it the hashes of later
    positions decide the chunks, docs/attention.md)."""
    model = _model(attention, bucket_size=T)
    history = _history(seed=2)
    history[:, 5:] = torch.randint(0, ITEMS, (history.shape[0], T - 5))  # real from position 5 on in every row
    before = model.sequence(history)
    for t in (6, 9, T - 1):
        changed = history.clone()
        changed[:, t] = (changed[:, t] + 1 + torch.randint(0, ITEMS - 1, (history.shape[0],))) % ITEMS
        after = model.sequence(changed)
        real = (history >= 0)[:, :t]
        torch.testing.assert_close(after[:, :t][real], before[:, :t][real], rtol=0, atol=1e-12)
        assert (after[:, t] - before[:, t]).abs().amax() > 1e-3  # the changed position itself moves


def test_padding_ids_and_masked_positions_do_not_reach_real_outputs():
    model, history = _model(), _history(seed=5)
    valid = history >= 0
    out = model.sequence(history)
    # a shorter history of the same items gives the same outputs at the common real positions
    first_real = int(valid.any(0).nonzero()[0])
    trimmed = model.sequence(history[:, first_real:])
    torch.testing.assert_close(trimmed[valid[:, first_real:]], out[valid], rtol=0, atol=1e-12)


def test_shared_layers_share_storage_and_count_once():
    shared, plain = _model(layers=3, share_layers=True), _model(layers=3)
    blocks = [shared.layer(depth) for depth in range(3)]
    assert all(b is blocks[0] for b in blocks)
    assert {b.qkv.weight.data_ptr() for b in blocks} == {blocks[0].qkv.weight.data_ptr()}
    assert len({plain.layer(depth).qkv.weight.data_ptr() for depth in range(3)}) == 3
    block_params = sum(p.numel() for p in plain.layer(0).parameters())
    assert plain.parameter_count() - shared.parameter_count() == 2 * block_params
    assert sum(k.startswith("blocks.") for k in shared.state_dict()) * 3 == sum(
        k.startswith("blocks.") for k in plain.state_dict()
    )
    with pytest.raises(IndexError, match="depth must be in"):
        shared.layer(3)


def test_factorised_embedding_parameters():
    plain, factorised = _model(), _model(item_factor_dim=4)
    assert factorised.items.weight.shape == (ITEMS + 1, 4) and factorised.item_proj.weight.shape == (D, 4)
    saved = (ITEMS + 1) * D - ((ITEMS + 1) * 4 + 4 * D)
    assert plain.parameter_count() - factorised.parameter_count() == saved


def test_config_refusals_name_the_field():
    with pytest.raises(ValueError, match="yoso"):
        SequenceTransformerConfig(attention="yoso")
    with pytest.raises(ValueError, match="attention must be one of"):
        SequenceTransformerConfig(attention="linear")
    with pytest.raises(ValueError, match="layers must be >= 1, got 0"):
        SequenceTransformerConfig(layers=0)
    with pytest.raises(ValueError, match="item_factor_dim must be >= 0"):
        SequenceTransformerConfig(item_factor_dim=-1)
    with pytest.raises(ValueError, match="divisible by heads=3"):
        SequenceTransformer(ITEMS, T, D, 0.0, SequenceTransformerConfig(heads=3))


def test_build_history_encoder_names_both_kinds():
    config = SequenceTransformerConfig(heads=HEADS)
    assert isinstance(build_history_encoder("mean", ITEMS, T, 8, D, 0.0, config), HistoryEncoder)
    encoder = build_history_encoder("transformer", ITEMS, T, 8, D, 0.0, config)
    assert isinstance(encoder, SequenceTransformer) and encoder(_history()).shape == (5, D)
    with pytest.raises(ValueError, match="encoder must be one of"):
        build_history_encoder("rnn", ITEMS, T, 8, D, 0.0, config)


def _tied_pair(sparse: bool = False) -> tuple[SequenceTransformer, nn.Module, SequenceTransformer]:
    """A tied encoder bound to a full-softmax layer, and an untied copy whose item table is that weight
    (plus its zero padding row): the reference the tied one must equal."""
    from recsys.lsh_output import FullSoftmaxOutput

    tied = _model(tie_items=True)
    output = FullSoftmaxOutput(D, ITEMS, seed=3).double()
    tied.tie_items_to(output, sparse=sparse)
    untied = _model(tie_items=False)
    state = tied.state_dict() | {"items.weight": torch.cat((output.weight.detach(), torch.zeros(1, D).double()))}
    untied.load_state_dict(state)
    return tied, output, untied


@pytest.mark.parametrize("sparse", [False, True])
def test_tied_items_are_the_output_weight_forward_and_gradient(sparse):
    """Tied: the same outputs as an untied encoder whose table is the output weight, and the weight's gradient
    the sum of both ends' (autograd on the untied pair in float64); sparse or dense, the same values."""
    from recsys.lsh_output import FullSoftmaxOutput

    tied, output, untied = _tied_pair(sparse)
    history = _history(6, seed=4)
    positions = history >= 0
    targets = torch.randint(0, ITEMS, (int(positions.sum()),), generator=torch.Generator().manual_seed(5))
    output(tied(history, positions), targets).backward()
    reference_output = FullSoftmaxOutput(D, ITEMS, seed=3).double()
    reference_output.load_state_dict(output.state_dict())
    reference_output(untied(history, positions), targets).backward()
    expected = reference_output.weight.grad + untied.items.weight.grad[:ITEMS]
    grad = output.weight.grad  # the full softmax's own gradient is dense: so is the sum
    torch.testing.assert_close(grad.to_dense() if grad.is_sparse else grad, expected, rtol=1e-12, atol=1e-12)
    assert untied.items.weight.grad[:ITEMS].abs().sum() > 0  # the input end contributes
    torch.testing.assert_close(tied(history), untied(history), rtol=0, atol=0)


def test_tied_items_live_in_the_output_layer_once():
    """The tied encoder has no table of its own: not in its parameters (its optimizer), not in its state dict;
    ``EncoderWithOutput`` binds it and holds the weight once; a factorised config keeps its own table."""
    from recsys.lsh_output import LSHConfig, LSHOutputLayer
    from recsys.sequence_encoders import EncoderWithOutput

    encoder = SequenceTransformer(ITEMS, T, D, 0.0, SequenceTransformerConfig(tie_items=True))
    assert not any(k.startswith("items") for k in encoder.state_dict())
    with pytest.raises(RuntimeError, match="tie_items_to"):
        encoder(_history())
    layer = LSHOutputLayer(D, ITEMS, LSHConfig(num_tables=2, num_bits=3, sample_size=16))
    model = EncoderWithOutput(encoder, layer)
    assert [k for k in model.state_dict() if k.endswith("weight") and model.state_dict()[k].shape == (ITEMS, D)] == [
        "output.weight"
    ]
    assert all(p is not layer.weight for p in encoder.parameters())
    assert encoder._tied_sparse == layer.config.sparse
    history = _history()
    layer(encoder(history, history >= 0), torch.randint(0, ITEMS, (int((history >= 0).sum()),))).backward()
    assert layer.weight.grad.is_sparse  # both ends sparse: the sampled rows and the history's items
    factorised = SequenceTransformerConfig(tie_items=True, item_factor_dim=4)
    assert not factorised.tied and SequenceTransformer(ITEMS, T, D, 0.0, factorised).items is not None
    with pytest.raises(ValueError, match="own item embedding"):
        SequenceTransformer(ITEMS, T, D, 0.0, factorised).tie_items_to(layer)
    with pytest.raises(ValueError, match=r"\(40, 8\)"):
        SequenceTransformer(ITEMS, T, 8, 0.0, SequenceTransformerConfig(tie_items=True)).tie_items_to(layer)
