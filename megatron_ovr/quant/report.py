r"""How a quantised checkpoint compares with its source: logit error, size on disk, benchmark accuracy and
vLLM generation throughput.

- :func:`logit_deltas`: per-token logits of the original vs the (fake-)quantised model on the same inputs:
  largest absolute difference, relative RMS error ``||q - ref|| / ||ref||`` (scale-free: the tiny random
  model's logits are small), mean KL(ref || q) per token and top-1 agreement.
- :func:`compare`: two evaluation results (``results.json`` of ``megatron-ovr eval`` / the harness, run on
  the same benchmark files) and the two directories -> a Markdown table per benchmark with the accuracy
  difference, the weight bytes on disk, and optionally vLLM throughput.
- :func:`measure_throughput`: generated tokens per second of vLLM on a directory (``ignore_eos``, fixed
  length, so both models generate the same number of tokens).

Command line (after evaluating both directories with the same config)::

    python -m megatron_ovr.quant.report --baseline-dir HF --quantized-dir Q \
        --baseline-results outputs/eval_bf16/results.json --quantized-results outputs/eval_fp8/results.json \
        [--throughput-prompts data/rl_eval/prompts.jsonl --max-new-tokens 512 --dtype bfloat16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from megatron_ovr.rollout.vllm_engine import check_cpu_kernels

__all__ = ["LogitDeltas", "compare", "format_comparison", "logit_deltas", "measure_throughput"]


@dataclass(frozen=True)
class LogitDeltas:
    tokens: int
    max_abs: float
    rel_rms: float
    mean_kl: float
    top1_agreement: float

    def describe(self) -> str:
        return (f"max |dlogit| {self.max_abs:.4g}, rel. RMS {self.rel_rms:.4g}, mean KL {self.mean_kl:.3g} nats, "
                f"top-1 agreement {100 * self.top1_agreement:.1f}% over {self.tokens} tokens")


def logit_deltas(reference: Sequence[torch.Tensor], quantized: Sequence[torch.Tensor]) -> LogitDeltas:
    """``reference[i]`` and ``quantized[i]``: logits ``[tokens, vocab]`` of the same input."""
    if len(reference) != len(quantized) or not reference:
        raise ValueError(f"need the same non-zero number of logit tensors, got {len(reference)} and {len(quantized)}")
    ref = torch.cat([r.float().reshape(-1, r.shape[-1]) for r in reference])
    q = torch.cat([x.float().reshape(-1, x.shape[-1]) for x in quantized])
    if ref.shape != q.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} vs {tuple(q.shape)}")
    diff = q - ref
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(q, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return LogitDeltas(tokens=ref.shape[0], max_abs=float(diff.abs().max()),
                       rel_rms=float(diff.norm() / ref.norm().clamp_min(1e-30)), mean_kl=float(kl.mean()),
                       top1_agreement=float((ref.argmax(-1) == q.argmax(-1)).float().mean()))


def _weight_bytes(directory: str | Path) -> int:
    from .layouts import directory_bytes

    return directory_bytes(directory)


def _quant_label(directory: str | Path) -> str:
    from .layouts import quant_method

    method, _ = quant_method(directory)
    return method or "unquantised"


def measure_throughput(model_dir: str | Path, prompts_file: str | Path, *, max_new_tokens: int = 256,
                       num_prompts: int = 64, dtype: str = "bfloat16", max_model_len: int = 4096,
                       **engine_kwargs) -> dict:
    """vLLM generation throughput on ``model_dir``: ``num_prompts`` prompts of an evaluation-layout file (with
    their images), greedy, exactly ``max_new_tokens`` tokens each. Starts vLLM in this process (call it under
    ``if __name__ == "__main__":``)."""
    from megatron_ovr.data.prompts import build_prompt
    from megatron_ovr.eval.benchmarks import load_benchmark

    check_cpu_kernels(str(model_dir))
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    items = load_benchmark(prompts_file, limit=num_prompts)
    requests = []
    for item in items:
        request = {"prompt": build_prompt(item.question, len(item.images), item.choices)}
        if item.images:
            request["multi_modal_data"] = {"image": item.load_images()}
        requests.append(request)
    kwargs = dict(enforce_eager=not torch.cuda.is_available(), max_model_len=max_model_len, seed=0,
                  limit_mm_per_prompt={"image": max(1, max(len(i.images) for i in items))})
    kwargs.update(engine_kwargs)
    started = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype=dtype, **kwargs)
    load_s = time.perf_counter() - started
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(requests[:2], SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    del llm, outputs  # the next measurement in this process needs the memory back
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"model_dir": str(model_dir), "prompts": len(requests), "generated_tokens": generated,
            "seconds": round(seconds, 3), "tokens_per_s": round(generated / seconds, 1), "load_s": round(load_s, 1),
            "dtype": dtype, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def _identical_responses(baseline: Path, quantized: Path) -> dict[str, float]:
    """Per benchmark, the share of (item, sample) responses that are the same text in both generation files
    (meaningful with greedy decoding; a finer signal than accuracy when both models are weak)."""
    if not (baseline.is_file() and quantized.is_file()):
        return {}

    def read(path: Path) -> dict:
        rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        return {(r["benchmark"], r["id"], r["sample"]): r["response"] for r in rows}

    a, b = read(baseline), read(quantized)
    shared = a.keys() & b.keys()
    out: dict[str, list[int]] = {}
    for key in shared:
        out.setdefault(key[0], []).append(int(a[key] == b[key]))
    return {name: sum(v) / len(v) for name, v in out.items()}


def compare(baseline_dir: str | Path, quantized_dir: str | Path, *, baseline_results: Optional[str | Path] = None,
            quantized_results: Optional[str | Path] = None, throughput: Optional[dict] = None) -> dict:
    """The comparison as a dict (see :func:`format_comparison` for the table)."""
    out: dict = {
        "baseline": {"dir": str(baseline_dir), "quantization": _quant_label(baseline_dir),
                     "weight_bytes": _weight_bytes(baseline_dir)},
        "quantized": {"dir": str(quantized_dir), "quantization": _quant_label(quantized_dir),
                      "weight_bytes": _weight_bytes(quantized_dir)},
    }
    report_file = Path(quantized_dir) / "quant_report.json"
    if report_file.is_file():
        out["quantized"]["logit_check"] = json.loads(report_file.read_text()).get("logit_check")
    if baseline_results and quantized_results:
        base = json.loads(Path(baseline_results).read_text())["benchmarks"]
        quant = json.loads(Path(quantized_results).read_text())["benchmarks"]
        missing = sorted(set(base) ^ set(quant))
        if missing:
            raise ValueError(f"the two evaluations cover different benchmarks ({missing}): run both with one config")
        same = _identical_responses(Path(baseline_results).with_name("generations.jsonl"),
                                    Path(quantized_results).with_name("generations.jsonl"))
        out["benchmarks"] = {
            name: {"items": base[name]["items"], "baseline_accuracy": base[name]["accuracy"],
                   "quantized_accuracy": quant[name]["accuracy"],
                   "delta": quant[name]["accuracy"] - base[name]["accuracy"],
                   "baseline_mean_tokens": base[name]["mean_response_tokens"],
                   "quantized_mean_tokens": quant[name]["mean_response_tokens"],
                   "identical_responses": same.get(name)}
            for name in base
        }
    if throughput:
        out["throughput"] = throughput
    return out


def format_comparison(result: dict) -> str:
    """Markdown: the accuracy table per benchmark, sizes on disk and (if measured) throughput."""
    b, q = result["baseline"], result["quantized"]
    lines = [f"baseline: `{b['dir']}` ({b['quantization']}), quantised: `{q['dir']}` ({q['quantization']})", ""]
    if "benchmarks" in result:
        lines += ["| benchmark | items | baseline | quantised | delta | identical responses |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, s in result["benchmarks"].items():
            same = "" if s.get("identical_responses") is None else f"{100 * s['identical_responses']:.0f}%"
            lines.append(f"| {name} | {s['items']} | {100 * s['baseline_accuracy']:.1f}% | "
                         f"{100 * s['quantized_accuracy']:.1f}% | {100 * s['delta']:+.1f} pt | {same} |")
        lines.append("")
    ratio = q["weight_bytes"] / b["weight_bytes"] if b["weight_bytes"] else float("nan")
    lines.append(f"weights on disk: {b['weight_bytes'] / 2**20:.1f} MiB -> {q['weight_bytes'] / 2**20:.1f} MiB "
                 f"({ratio:.2f}x)")
    if q.get("logit_check"):
        c = q["logit_check"]
        lines.append(f"logit check (fake-quant vs source): max |dlogit| {c['max_abs']:.4g}, rel. RMS {c['rel_rms']:.4g}, "
                     f"mean KL {c['mean_kl']:.3g}, top-1 agreement {100 * c['top1_agreement']:.1f}% ({c['tokens']} tokens)")
    for side, t in (result.get("throughput") or {}).items():
        lines.append(f"vLLM throughput ({side}): {t['tokens_per_s']} generated tokens/s ({t['prompts']} prompts x "
                     f"{t['generated_tokens'] // max(1, t['prompts'])} tokens, {t['dtype']}, {t['device']})")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-dir", required=True, help="the unquantised HF directory")
    parser.add_argument("--quantized-dir", required=True, help="tools/quantize.py's output")
    parser.add_argument("--baseline-results", help="results.json of the baseline's evaluation")
    parser.add_argument("--quantized-results", help="results.json of the quantised model's evaluation (same config)")
    parser.add_argument("--throughput-prompts", metavar="FILE",
                        help="measure vLLM generation throughput of both directories on this prompt file")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", help="vLLM dtype for both (default: bfloat16)")
    parser.add_argument("--out", help="also write the comparison as JSON here")
    args = parser.parse_args(argv)
    throughput = None
    if args.throughput_prompts:
        throughput = {side: measure_throughput(d, args.throughput_prompts, max_new_tokens=args.max_new_tokens,
                                               num_prompts=args.num_prompts, dtype=args.dtype,
                                               max_model_len=args.max_model_len)
                      for side, d in (("baseline", args.baseline_dir), ("quantized", args.quantized_dir))}
    result = compare(args.baseline_dir, args.quantized_dir, baseline_results=args.baseline_results,
                     quantized_results=args.quantized_results, throughput=throughput)
    print(format_comparison(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
