"""Converts an HF Qwen2.5-VL checkpoint (a policy, or a PPO critic) into a megatron-core dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir IN --out OUT [--dtype bfloat16]

One process, no GPU, no model: every HF tensor is read once, converted through the one mapping table
(QKV grouped per query group, gate/up fused) and written straight to disk as the full sharded-state-dict
tensor megatron saves (transformer layers stacked on a leading layer axis), one layer at a time, with a
progress bar. Megatron reshards on load, so the checkpoint loads at ANY TP/PP/VP layout: the SFT trainer
(``model.megatron_dir``), ``checkpointing.load_checkpoint`` and the reverse converter read it as is.
``--tp/--pp/--vp`` check that the layout you intend fits the model (heads, layers) and are recorded;
``--tp`` also stores each TP-split weight as the fragments a TP=--tp model saves, so loading at that TP
reads only each rank's own bytes (other layouts stitch fragments, as from any training checkpoint).

Written as ``OUT/iter_0000000`` + ``OUT/latest`` (model weights only), assembled in a temp directory next
to OUT and renamed when complete. Each tensor keeps its stored dtype unless ``--dtype`` is given. The model
config, the head and the source directory are recorded in the checkpoint.

Critic: an HF directory without ``lm_head.weight`` and with ``value_head.safetensors`` (``value_head.weight``
[1, hidden], as ``convert_megatron_to_hf.py`` writes it) becomes a critic checkpoint (the value head in the
place of ``language_model.output_layer.weight``). Detected from the files; nothing to pass.

``--backend`` picks the layer spec whose norm names the checkpoint uses (Transformer Engine fuses the
pre-attention/pre-MLP norms into the next linear): ``auto`` is what the trainer on this machine would build.
Launched under torchrun (older instructions), rank 0 converts and the other ranks exit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_ovr.checkpoint.convert import hf_to_megatron, is_secondary_rank
from megatron_ovr.checkpoint.hf import HFCheckpoint
from megatron_ovr.config.checks import DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, help="megatron checkpoint root to create (must not exist or be empty)")
    parser.add_argument("--tp", type=int, default=1,
                        help="intended tensor-parallel size (checked, recorded, and the stored TP fragments)")
    parser.add_argument("--pp", type=int, default=1, help="intended pipeline-parallel size (checked, recorded)")
    parser.add_argument("--vp", type=int, default=None, help="intended virtual pipeline chunks per pipeline rank")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast the weights to this dtype (default: keep each tensor's stored dtype)")
    parser.add_argument("--backend", choices=("auto", "torch", "te"), default="auto",
                        help="layer spec of the model that will load it (default: auto, as the trainer picks)")
    parser.add_argument("--fsync", action="store_true", help="flush the data to disk before the final rename")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def resolve_backend(choice: str) -> str:
    if choice != "auto":
        return choice
    from megatron_ovr import platform  # torch only: the same rule as the model's layer specs

    return "te" if platform.use_transformer_engine() else "torch"


def main(argv=None) -> int:
    args = parse_args(argv)
    if is_secondary_rank():
        return 0
    start = time.perf_counter()
    cfg = HFCheckpoint(args.hf_dir).config
    cfg.validate_parallel(args.tp)
    stages = args.pp * (args.vp or 1)
    if cfg.text.num_layers % stages:
        raise ValueError(f"--pp {args.pp} x --vp {args.vp} = {stages} does not divide the {cfg.text.num_layers} "
                         "LM layers")
    layout = {"tensor_parallel": args.tp, "pipeline_parallel": args.pp, "virtual_pipeline": args.vp}
    out = hf_to_megatron(args.hf_dir, args.out, backend=resolve_backend(args.backend),
                         dtype=DTYPES[args.dtype] if args.dtype else None, tp=args.tp,
                         extra={"intended_layout": layout}, fsync=args.fsync,
                         progress=not args.no_progress)
    print(f"wrote {Path(out) / 'iter_0000000'} in {time.perf_counter() - start:.1f} s "
          f"(loads at any TP/PP/VP; checked for tp={args.tp} pp={args.pp} vp={args.vp})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
