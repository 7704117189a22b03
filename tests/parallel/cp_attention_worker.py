"""One rank of a context-parallel attention run (launched by torchrun from test_context_parallel.py).

Two ranks in a CP=2 megatron world run ``SegmentCoreAttention`` (context_parallel_size=2) on their
load-balanced chunks of fixed q/k/v with packed causal segments, backpropagate a fixed loss, gather the
outputs and the q/k/v gradients back to the full sequence, and rank 0 saves them for the test to compare
with the single-process (cp=1) result. The inputs live here so the test builds exactly the same ones.
"""

import argparse

import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

SEQ, BATCH, HEADS, GROUPS, HEAD_DIM = 16, 2, 4, 2, 16
# Packed samples crossing the CP chunk boundaries (chunks of 4 tokens), with a padding segment 0 at the end.
SEGMENTS = torch.tensor([
    [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 0, 0, 0],
    [1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3],
])


def make_inputs():
    """q [s, b, H, d], k/v [s, b, G, d] and the weight of the loss sum(out * weight), out [s, b, H*d]."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(SEQ, BATCH, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=gen)
    v = torch.randn(SEQ, BATCH, GROUPS, HEAD_DIM, generator=gen)
    weight = torch.randn(SEQ, BATCH, HEADS * HEAD_DIM, generator=gen)
    return q, k, v, weight


def make_attention(context_parallel_size: int):
    from megatron_ovr.parallel.attention import SegmentCoreAttention

    config = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=HEADS, num_query_groups=GROUPS, kv_channels=HEAD_DIM,
        context_parallel_size=context_parallel_size, attention_dropout=0.0, hidden_dropout=0.0,
    )
    return SegmentCoreAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def main() -> None:
    from megatron.core import parallel_state

    from megatron_ovr.config import ParallelConfig
    from megatron_ovr.distributed import init_distributed, shutdown_distributed
    from megatron_ovr.parallel.context_parallel import gather_from_context_parallel, split_for_context_parallel

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    init_distributed(ParallelConfig(context_parallel=2))
    group = parallel_state.get_context_parallel_group()
    cp_rank = parallel_state.get_context_parallel_rank()
    cp_size = parallel_state.get_context_parallel_world_size()
    assert cp_size == 2

    q, k, v, weight = make_inputs()
    local = [split_for_context_parallel(t, 0, cp_rank, cp_size).clone().requires_grad_() for t in (q, k, v)]
    attention = make_attention(cp_size)
    out = attention(*local, attention_mask=SEGMENTS)
    assert out.shape == (SEQ // cp_size, BATCH, HEADS * HEAD_DIM), out.shape
    (out * split_for_context_parallel(weight, 0, cp_rank, cp_size)).sum().backward()

    results = {"out": gather_from_context_parallel(out.detach(), 0, group)}
    for name, tensor in zip(("q", "k", "v"), local):
        results[f"grad_{name}"] = gather_from_context_parallel(tensor.grad, 0, group)
    if torch.distributed.get_rank() == 0:
        torch.save(results, args.out)
    shutdown_distributed()


if __name__ == "__main__":
    main()
