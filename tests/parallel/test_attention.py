"""SegmentCoreAttention against a naive per-query reference, and the CP mask construction.

The reference loops over batch rows, heads and queries, softmaxes over the keys a query may see (same
segment, and not later when causal) and repeats KV heads for GQA: a wrong mask, a wrong GQA head mapping,
a wrong scale or a wrong output layout all show up here.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ovr.parallel.attention import SegmentCoreAttention, build_attention_mask
from megatron_ovr.parallel.context_parallel import cp_gathered_positions, cp_local_positions

HEADS, GROUPS, HEAD_DIM = 4, 2, 16
TOL = dict(rtol=1e-5, atol=1e-5)


def attention_config(context_parallel_size: int = 1) -> TransformerConfig:
    return TransformerConfig(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        kv_channels=HEAD_DIM,
        context_parallel_size=context_parallel_size,
        attention_dropout=0.0,
        hidden_dropout=0.0,
    )


def make_attention(mask_type: AttnMaskType, mask_index=None, context_parallel_size: int = 1) -> SegmentCoreAttention:
    return SegmentCoreAttention(
        attention_config(context_parallel_size), layer_number=1, attn_mask_type=mask_type,
        attention_type="self", mask_index=mask_index,
    )


def make_qkv(s: int, b: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(s, b, GROUPS, HEAD_DIM, generator=gen)
    v = torch.randn(s, b, GROUPS, HEAD_DIM, generator=gen)
    return q, k, v


def naive_attention(q, k, v, causal: bool, segment_ids=None) -> torch.Tensor:
    """q [s, b, H, d], k/v [s, b, G, d] -> [s, b, H*d], one query at a time in float64."""
    s, b, heads, d = q.shape
    groups = k.shape[2]
    out = torch.zeros(s, b, heads, d, dtype=torch.float64)
    for bi in range(b):
        for h in range(heads):
            g = h // (heads // groups)  # GQA: consecutive query heads share a KV head
            for i in range(s):
                allowed = [j for j in range(s)
                           if (not causal or j <= i)
                           and (segment_ids is None or segment_ids[bi, j] == segment_ids[bi, i])]
                assert allowed, "the reference never builds an empty row"
                scores = torch.stack([q[i, bi, h].double() @ k[j, bi, g].double() for j in allowed]) / math.sqrt(d)
                weights = torch.softmax(scores, dim=0)
                out[i, bi, h] = sum(w * v[j, bi, g].double() for w, j in zip(weights, allowed))
    return out.reshape(s, b, heads * d).float()


# Two rows of packed samples; row 0 ends in padding (segment 0, its own segment), row 1 has four samples.
PACKED = torch.tensor([
    [1, 1, 1, 2, 2, 2, 2, 2, 3, 0, 0, 0],
    [1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4],
])
# ViT-like windows (non-causal): non-contiguous windows too, to show ids, not order, decide.
WINDOWS = torch.tensor([
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
    [0, 1, 0, 1, 0, 1, 2, 2, 2, 3, 3, 3],
])


@pytest.fixture(scope="module")
def mp(single_rank_megatron):
    return None


@pytest.mark.parametrize(
    "mask_type,segments",
    [
        pytest.param(AttnMaskType.causal, None, id="causal-no-mask"),
        pytest.param(AttnMaskType.no_mask, None, id="non-causal-no-mask"),
        pytest.param(AttnMaskType.causal, PACKED, id="causal-packed-with-padding"),
        pytest.param(AttnMaskType.no_mask, WINDOWS, id="non-causal-windows"),
        pytest.param(AttnMaskType.padding_causal, PACKED, id="padding-causal-packed"),
    ],
)
def test_matches_naive_reference(mp, mask_type, segments):
    q, k, v = make_qkv(12, 2)
    attn = make_attention(mask_type)
    got = attn(q, k, v, attention_mask=segments)
    assert got.shape == (12, 2, HEADS * HEAD_DIM)
    causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
    torch.testing.assert_close(got, naive_attention(q, k, v, causal, segments), **TOL)


def test_forward_mask_type_overrides_the_layer_default(mp):
    q, k, v = make_qkv(12, 2, seed=1)
    attn = make_attention(AttnMaskType.no_mask)
    got = attn(q, k, v, attention_mask=PACKED, attn_mask_type=AttnMaskType.causal)
    torch.testing.assert_close(got, naive_attention(q, k, v, True, PACKED), **TOL)


def test_masks_change_the_result(mp):
    """Guards the reference comparisons above against a mask that is silently ignored."""
    q, k, v = make_qkv(12, 2, seed=2)
    attn = make_attention(AttnMaskType.causal)
    assert not torch.allclose(attn(q, k, v, attention_mask=PACKED), attn(q, k, v, attention_mask=None), atol=1e-3)


def test_stacked_masks_pick_the_row_of_mask_index(mp):
    q, k, v = make_qkv(12, 2, seed=3)
    stacked = torch.stack([PACKED, WINDOWS])  # [2, b, s]
    outs = []
    for index, segments in ((0, PACKED), (1, WINDOWS)):
        attn = make_attention(AttnMaskType.no_mask, mask_index=index)
        out = attn(q, k, v, attention_mask=stacked)
        torch.testing.assert_close(out, naive_attention(q, k, v, False, segments), **TOL)
        outs.append(out)
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


def test_stacked_mask_without_mask_index_raises(mp):
    q, k, v = make_qkv(12, 2)
    attn = make_attention(AttnMaskType.no_mask)
    with pytest.raises(ValueError, match="mask_index"):
        attn(q, k, v, attention_mask=torch.stack([PACKED, WINDOWS]))


def test_packed_seq_params_and_bias_raise(mp):
    q, k, v = make_qkv(12, 2)
    attn = make_attention(AttnMaskType.causal)
    with pytest.raises(ValueError, match="packed_seq_params"):
        attn(q, k, v, attention_mask=None, packed_seq_params=object())
    with pytest.raises(ValueError, match="attention_bias"):
        attn(q, k, v, attention_mask=None, attention_bias=torch.zeros(1))


def test_gradients_match_naive_reference(mp):
    q, k, v = (t.double().requires_grad_() for t in make_qkv(12, 2, seed=4))
    attn = make_attention(AttnMaskType.causal)
    weight = torch.randn(12, 2, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (attn(q, k, v, attention_mask=PACKED) * weight).sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    # The naive reference is differentiable (float64 throughout when given float64 inputs).
    ref = _naive_double(q2, k2, v2, PACKED)
    (ref * weight).sum().backward()
    for g, r in zip(got, (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def _naive_double(q, k, v, segments):
    """Vectorised causal segment attention with explicit KV repetition, as a differentiable reference."""
    s, b, heads, d = q.shape
    rep = heads // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("ibhd,jbhd->bhij", q, k) / math.sqrt(d)
    i = torch.arange(s)
    allowed = (i[None, :] <= i[:, None])[None, None] & (segments[:, None, :, None] == segments[:, None, None, :])
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("bhij,jbhd->ibhd", probs, v).reshape(s, b, heads * d)


# ---- masks under context parallelism (pure tensors) --------------------------------------------------


def _full_mask_by_hand(segments, causal, s):
    i = torch.arange(s)
    mask = segments[:, :, None] == segments[:, None, :] if segments is not None else torch.ones(1, s, s, dtype=torch.bool)
    if causal:
        mask = mask & (i[None, :] <= i[:, None])[None]
    return mask[:, None]  # [b, 1, s, s]


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("with_segments", [True, False])
def test_cp_masks_equal_rows_of_the_full_mask(cp_size, causal, with_segments):
    s = 24
    segments = torch.tensor([
        [1] * 5 + [2] * 9 + [3] * 4 + [0] * 6,
        [1] * 2 + [2] * 11 + [3] * 11,
    ]) if with_segments else None
    if not causal and not with_segments:
        assert build_attention_mask(None, torch.arange(s), torch.arange(s), False) is None
        return
    full = _full_mask_by_hand(segments, causal, s)
    assert torch.equal(build_attention_mask(segments, torch.arange(s), torch.arange(s), causal).expand_as(full), full)
    key_positions = cp_gathered_positions(s, cp_size)
    to_global = torch.argsort(key_positions)
    for rank in range(cp_size):
        query_positions = cp_local_positions(s, rank, cp_size)
        mask = build_attention_mask(segments, query_positions, key_positions, causal)
        assert mask.shape[-2:] == (s // cp_size, s)
        assert torch.equal(mask[..., to_global].expand(full.shape[0], 1, -1, -1), full[:, :, query_positions, :])
