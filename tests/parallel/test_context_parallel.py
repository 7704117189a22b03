"""The load-balanced context-parallel layout (pure tensors) and CP attention across two real processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_ovr.parallel.context_parallel import (
    cp_chunk_size,
    cp_gathered_positions,
    cp_local_positions,
    gather_from_context_parallel,
    split_for_context_parallel,
)

CASES = [(8, 2), (16, 2), (8, 4), (24, 4), (12, 3), (2, 1)]


@pytest.mark.parametrize("seq_len,cp_size", CASES)
def test_local_positions_are_chunks_r_and_mirror(seq_len, cp_size):
    chunk = seq_len // (2 * cp_size)
    assert cp_chunk_size(seq_len, cp_size) == chunk
    every = []
    for rank in range(cp_size):
        local = cp_local_positions(seq_len, rank, cp_size)
        mirror = 2 * cp_size - 1 - rank
        by_hand = list(range(rank * chunk, (rank + 1) * chunk)) + list(range(mirror * chunk, (mirror + 1) * chunk))
        assert local.tolist() == by_hand
        assert local.dtype == torch.long
        every += local.tolist()
    assert sorted(every) == list(range(seq_len))
    assert cp_gathered_positions(seq_len, cp_size).tolist() == every


def test_local_positions_known_values():
    # megatron-core's convention, spelled out for cp=2 and s=8: rank 0 holds chunks 0 and 3.
    assert cp_local_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert cp_local_positions(8, 1, 2).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize("seq_len,cp_size", CASES)
@pytest.mark.parametrize("seq_dim", [0, 1, 2])
def test_split_then_gather_in_order_recovers_the_original(seq_len, cp_size, seq_dim):
    shape = [3, 2, 5]
    shape[seq_dim] = seq_len
    full = torch.arange(torch.Size(shape).numel()).reshape(shape)
    parts = [split_for_context_parallel(full, seq_dim, r, cp_size) for r in range(cp_size)]
    for r, part in enumerate(parts):
        assert part.shape[seq_dim] == seq_len // cp_size
        assert torch.equal(part, full.index_select(seq_dim, cp_local_positions(seq_len, r, cp_size)))
    gathered = torch.cat(parts, dim=seq_dim)
    order = torch.argsort(cp_gathered_positions(seq_len, cp_size))
    assert torch.equal(gathered.index_select(seq_dim, order), full)


def test_split_is_identity_for_cp1_and_gather_without_group():
    x = torch.randn(7, 3)
    assert split_for_context_parallel(x, 0, 0, 1) is x
    assert gather_from_context_parallel(x, 0, None) is x


@pytest.mark.parametrize("seq_len,cp_size", [(10, 2), (12, 4), (6, 4), (7, 1)])
def test_indivisible_length_names_the_numbers(seq_len, cp_size):
    with pytest.raises(ValueError, match=rf"{seq_len}.*{2 * cp_size}"):
        cp_local_positions(seq_len, 0, cp_size)
    if cp_size > 1:
        with pytest.raises(ValueError, match=rf"{seq_len}.*{2 * cp_size}"):
            split_for_context_parallel(torch.zeros(2, seq_len), 1, 0, cp_size)


# ---- two real processes ------------------------------------------------------------------------------


@pytest.mark.distributed
def test_cp2_attention_matches_single_process(tmp_path: Path, single_rank_megatron):
    from launch import torchrun

    import cp_attention_worker as worker

    out_path = tmp_path / "cp2.pt"
    torchrun(Path(worker.__file__), 2, "--out", str(out_path))
    got = torch.load(out_path)

    q, k, v, weight = (t.clone() for t in worker.make_inputs())
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = worker.make_attention(1)(q, k, v, attention_mask=worker.SEGMENTS)
    (out * weight).sum().backward()
    want = {"out": out.detach(), "grad_q": q.grad, "grad_k": k.grad, "grad_v": v.grad}

    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
