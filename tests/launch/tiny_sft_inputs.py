"""What the launch tests train: the tiny Qwen2.5-VL checkpoint and Qwen-tokenised synthetic conversations
(made once per pytest process), and the ``--set`` overrides that point examples/cold_start/tiny.yaml at them
and at a run directory. Short runs: 128-token rows, 2 rows per step."""

from __future__ import annotations

import json
from pathlib import Path

from launch import REPO

TINY_CONFIG = "examples/cold_start/tiny.yaml"
_made: dict[str, str] = {}


def tiny_inputs(root: Path) -> tuple[str, str]:
    """(HF checkpoint dir, dataset prefix), created under ``root`` on the first call."""
    if not _made:
        from megatron_ovr.data.chat import tokenize_conversation
        from megatron_ovr.data.indexed import write_indexed
        from megatron_ovr.data.synthetic import generate_conversations
        from megatron_ovr.data.tokenizer import load_tokenizer, qwen_tokenizer_dir
        from tools.make_tiny_checkpoint import make_checkpoint

        tokenizer = load_tokenizer(qwen_tokenizer_dir())
        prefix = root / "synthetic"
        samples = (tokenize_conversation(c["messages"], tokenizer) for c in generate_conversations(200, seed=0))
        write_indexed(prefix, samples, vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
        _made["hf"] = str(make_checkpoint(root / "hf", "tiny", seed=0))
        _made["data"] = str(prefix)
    return _made["hf"], _made["data"]


def sft_overrides(hf_dir: str, data: str, run: Path, train_steps: int, *extra: str) -> list[str]:
    """``--set`` arguments for a short tiny run writing to ``run`` (metrics.jsonl, ckpt/)."""
    sets = [f"model.hf_dir={hf_dir}", f"data.paths=[{data}]", "data.seq_length=128",
            "batch.global_batch_size=2", "batch.micro_batch_size=1", f"train_steps={train_steps}",
            "optimizer.warmup_steps=1", f"checkpoint.dir={run / 'ckpt'}", "checkpoint.save_interval=0",
            "logging.log_interval=1", "logging.tensorboard_dir=null", "logging.plot_path=null",
            f"logging.metrics_path={run / 'metrics.jsonl'}", *extra]
    return [arg for s in sets for arg in ("--set", s)]


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[tuple[int, float, float]]:
    """(step, loss, grad norm) per logged step."""
    return [(h["step"], h["loss"], h["grad_norm"]) for h in history(run)]


__all__ = ["REPO", "TINY_CONFIG", "history", "losses", "sft_overrides", "tiny_inputs"]
