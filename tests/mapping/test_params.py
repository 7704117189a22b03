"""Pure tests of the typed HF <-> megatron parameter mappings (megatron_ovr/mapping/params.py).

Every layout is checked against an independent construction by hand, so a wrong interleave, a wrong fuse
order or a wrong TP split cannot hide behind a round trip that is merely self-consistent.
"""

from __future__ import annotations

import pytest
import torch

from megatron_ovr.mapping.params import QKV, ColumnParallel, GatedMLP, PatchEmbed, Replicated, RowParallel

HIDDEN = 5

# (num_heads, num_groups, head_dim, stacked): MHA as the ViT uses it, GQA, MQA-like, odd sizes.
QKV_CASES = [
    pytest.param(4, 4, 3, True, id="mha-stacked"),
    pytest.param(2, 2, 8, True, id="mha-stacked-2heads"),
    pytest.param(8, 2, 4, False, id="gqa-8h-2g"),
    pytest.param(4, 1, 6, False, id="mqa-4h-1g"),
    pytest.param(6, 3, 2, False, id="gqa-6h-3g"),
    pytest.param(4, 4, 2, False, id="mha-separate"),
]


def _distinct(*shape: int, offset: int = 0) -> torch.Tensor:
    """Every element distinct (and exactly representable), so any misplaced row is visible."""
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n, dtype=torch.float64) + offset).reshape(shape)


def _hf_qkv(num_heads, num_groups, head_dim, bias: bool):
    """HF q [H*d, ...], k [G*d, ...], v [G*d, ...] with distinct values."""
    rest = () if bias else (HIDDEN,)
    q = _distinct(num_heads * head_dim, *rest)
    k = _distinct(num_groups * head_dim, *rest, offset=10_000)
    v = _distinct(num_groups * head_dim, *rest, offset=20_000)
    return q, k, v


def _by_hand_interleave(q, k, v, num_heads, num_groups, head_dim, groups=None):
    """Megatron's fused layout built row block by row block: for each group g, [q heads of g, k_g, v_g]."""
    per_group = num_heads // num_groups
    blocks = []
    for g in groups if groups is not None else range(num_groups):
        for h in range(g * per_group, (g + 1) * per_group):
            blocks.append(q[h * head_dim : (h + 1) * head_dim])
        blocks.append(k[g * head_dim : (g + 1) * head_dim])
        blocks.append(v[g * head_dim : (g + 1) * head_dim])
    return torch.cat(blocks, dim=0)


def _hf_inputs(mapping: QKV, q, k, v):
    return [torch.cat([q, k, v], dim=0)] if mapping.stacked else [q, k, v]


@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
@pytest.mark.parametrize("num_heads,num_groups,head_dim,stacked", QKV_CASES)
def test_qkv_round_trip_and_layout(num_heads, num_groups, head_dim, stacked, bias):
    mapping = QKV("m", ("q",), num_heads=num_heads, num_groups=num_groups, head_dim=head_dim, stacked=stacked)
    q, k, v = _hf_qkv(num_heads, num_groups, head_dim, bias)
    hf = _hf_inputs(mapping, q, k, v)

    fused = mapping.hf_to_megatron(hf)
    assert fused.shape == ((num_heads + 2 * num_groups) * head_dim, *(() if bias else (HIDDEN,)))
    assert torch.equal(fused, _by_hand_interleave(q, k, v, num_heads, num_groups, head_dim))

    back = mapping.megatron_to_hf(fused)
    assert len(back) == len(hf) == (1 if stacked else 3)
    for got, want in zip(back, hf):
        assert got.shape == want.shape
        assert torch.equal(got, want)


def test_qkv_stacked_and_separate_give_the_same_fused_tensor():
    q, k, v = _hf_qkv(4, 4, 3, bias=False)
    stacked = QKV("m", ("qkv",), num_heads=4, num_groups=4, head_dim=3, stacked=True)
    separate = QKV("m", ("q", "k", "v"), num_heads=4, num_groups=4, head_dim=3)
    assert torch.equal(stacked.hf_to_megatron([torch.cat([q, k, v])]), separate.hf_to_megatron([q, k, v]))


@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
@pytest.mark.parametrize(
    "num_heads,num_groups,head_dim,stacked,tp",
    [(4, 4, 3, True, 2), (4, 4, 3, True, 4), (8, 2, 4, False, 2), (6, 3, 2, False, 3), (8, 4, 2, False, 4)],
)
def test_qkv_tp_shards_hold_their_groups(num_heads, num_groups, head_dim, stacked, tp, bias):
    mapping = QKV("m", ("q",), num_heads=num_heads, num_groups=num_groups, head_dim=head_dim, stacked=stacked)
    q, k, v = _hf_qkv(num_heads, num_groups, head_dim, bias)
    full = mapping.hf_to_megatron(_hf_inputs(mapping, q, k, v))
    shards = [mapping.shard(full, r, tp) for r in range(tp)]
    groups_per_rank = num_groups // tp
    for r, shard in enumerate(shards):
        mine = range(r * groups_per_rank, (r + 1) * groups_per_rank)
        assert torch.equal(shard, _by_hand_interleave(q, k, v, num_heads, num_groups, head_dim, groups=mine))
        # The q rows of rank r are exactly query heads [r*H/tp, (r+1)*H/tp), in order.
        local = QKV("m", ("q",), num_heads=num_heads // tp, num_groups=groups_per_rank, head_dim=head_dim)
        q_r, k_r, v_r = local.megatron_to_hf(shard)
        rows = num_heads // tp * head_dim
        assert torch.equal(q_r, q[r * rows : (r + 1) * rows])
        assert torch.equal(k_r, k[r * groups_per_rank * head_dim : (r + 1) * groups_per_rank * head_dim])
        assert torch.equal(v_r, v[r * groups_per_rank * head_dim : (r + 1) * groups_per_rank * head_dim])
    assert torch.equal(mapping.unshard(shards), full)


@pytest.mark.parametrize("num_heads,num_groups,head_dim,tp", [(4, 1, 6, 2), (8, 2, 3, 4)])
def test_qkv_shard_rejects_tp_that_splits_a_group(num_heads, num_groups, head_dim, tp):
    mapping = QKV("lm.linear_qkv", ("q",), num_heads=num_heads, num_groups=num_groups, head_dim=head_dim)
    full = mapping.hf_to_megatron(list(_hf_qkv(num_heads, num_groups, head_dim, bias=False)))
    assert full.shape[0] % tp == 0  # the row count divides, so only a group-aware check can catch it
    with pytest.raises(ValueError, match="lm.linear_qkv"):
        mapping.shard(full, 0, tp)


# ---- GatedMLP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True], ids=["weight", "bias"])
def test_gated_mlp_shards_are_gate_chunk_then_up_chunk(tp, bias):
    ffn = 8
    rest = () if bias else (HIDDEN,)
    gate, up = _distinct(ffn, *rest), _distinct(ffn, *rest, offset=1000)
    mapping = GatedMLP("mlp.linear_fc1.weight", ("gate", "up"))
    full = mapping.hf_to_megatron([gate, up])
    assert torch.equal(full, torch.cat([gate, up]))
    shards = [mapping.shard(full, r, tp) for r in range(tp)]
    n = ffn // tp
    for r, shard in enumerate(shards):
        assert torch.equal(shard, torch.cat([gate[r * n : (r + 1) * n], up[r * n : (r + 1) * n]]))
    assert torch.equal(mapping.unshard(shards), full)
    got_gate, got_up = mapping.megatron_to_hf(mapping.unshard(shards))
    assert torch.equal(got_gate, gate) and torch.equal(got_up, up)


def test_gated_mlp_uneven_split_names_the_parameter():
    mapping = GatedMLP("vision.decoder.layers.*.mlp.linear_fc1.weight", ("gate", "up"))
    full = mapping.hf_to_megatron([_distinct(6, HIDDEN), _distinct(6, HIDDEN)])
    with pytest.raises(ValueError, match=r"vision\.decoder\.layers\.\*\.mlp\.linear_fc1\.weight.*6.*4"):
        mapping.shard(full, 0, 4)


# ---- Column / Row / Replicated ------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_parallel_splits_rows(tp):
    full = _distinct(8, 4)
    mapping = ColumnParallel("col", ("c",))
    assert mapping.tp_dim == 0
    shards = [mapping.shard(full, r, tp) for r in range(tp)]
    for r, s in enumerate(shards):
        assert torch.equal(s, full[r * 8 // tp : (r + 1) * 8 // tp, :])
    assert torch.equal(mapping.unshard(shards), full)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_row_parallel_splits_columns(tp):
    full = _distinct(3, 8)
    mapping = RowParallel("row", ("r",))
    assert mapping.tp_dim == 1
    shards = [mapping.shard(full, r, tp) for r in range(tp)]
    for r, s in enumerate(shards):
        assert torch.equal(s, full[:, r * 8 // tp : (r + 1) * 8 // tp])
    assert torch.equal(mapping.unshard(shards), full)


def test_column_and_row_uneven_split_name_the_parameter():
    with pytest.raises(ValueError, match="my.col.weight"):
        ColumnParallel("my.col.weight", ("c",)).shard(_distinct(6, 4), 0, 4)
    with pytest.raises(ValueError, match="my.row.weight"):
        RowParallel("my.row.weight", ("r",)).shard(_distinct(4, 6), 0, 4)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_replicated_is_whole_on_every_rank(tp):
    full = _distinct(8)
    mapping = Replicated("norm", ("n",))
    assert mapping.tp_dim is None
    for r in range(tp):
        assert torch.equal(mapping.shard(full, r, tp), full)
    assert torch.equal(mapping.unshard([full] * tp), full)
    assert torch.equal(mapping.hf_to_megatron([full]), full)
    (back,) = mapping.megatron_to_hf(full)
    assert torch.equal(back, full)


# ---- PatchEmbed ---------------------------------------------------------------------------------------


def test_patch_embed_reshape_round_trip():
    out, c, t, p = 6, 3, 2, 4
    conv = _distinct(out, c, t, p, p)
    mapping = PatchEmbed("vision.patch_embed.weight", ("visual.patch_embed.proj.weight",), conv_shape=(out, c, t, p, p))
    linear = mapping.hf_to_megatron([conv])
    assert linear.shape == (out, c * t * p * p)
    # Row o is the conv kernel o flattened in (c, t, kh, kw) order.
    for o in range(out):
        assert torch.equal(linear[o], conv[o].flatten())
    (back,) = mapping.megatron_to_hf(linear)
    assert back.shape == conv.shape and torch.equal(back, conv)
    assert torch.equal(mapping.shard(linear, 1, 2), linear)  # replicated over TP


def test_patch_embed_conv3d_equals_linear_on_flattened_patches():
    out, c, t, p, n = 7, 3, 2, 5, 11
    gen = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv3d(c, out, kernel_size=(t, p, p), stride=(t, p, p), bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    # HF processor layout: one flattened patch per row, (c, t, p, p) order.
    pixel_values = torch.randn(n, c * t * p * p, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        want = conv(pixel_values.view(n, c, t, p, p)).view(n, out)
    mapping = PatchEmbed("vision.patch_embed.weight", ("w",), conv_shape=(out, c, t, p, p))
    weight = mapping.hf_to_megatron([conv.weight.detach()])
    got = torch.nn.functional.linear(pixel_values, weight)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
