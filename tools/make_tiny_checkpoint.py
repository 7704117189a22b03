"""Writes a randomly initialised HF Qwen2.5-VL checkpoint (the parity-test reference) to a directory.

The weights are those of ``reference.build_hf_model(cfg, seed)``: the same seed always gives the same
checkpoint, so tests and tools can rebuild it instead of storing it.

    python tools/make_tiny_checkpoint.py --out /tmp/tiny-qwen25vl [--preset tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ovr.checkpoint import write_hf_checkpoint
from megatron_ovr.config import PRESETS, get_preset
from megatron_ovr.models.qwen2_5_vl import reference


def make_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    cfg = get_preset(preset)
    model = reference.build_hf_model(cfg, seed=seed)
    return write_hf_checkpoint(out, cfg, reference.hf_state_dict(model).items())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="model size (default: tiny; the real sizes take their full memory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    args = parser.parse_args(argv)
    print(f"wrote {make_checkpoint(args.out, args.preset, args.seed)}")


if __name__ == "__main__":
    main()
