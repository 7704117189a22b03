"""The tiny default's closing summary: what each stage of the recipe did, in one Markdown file and one PNG.

    python tools/summarize_demo.py --out outputs/summary --sft-metrics outputs/sft_tiny/metrics.jsonl \\
        --ppo-metrics outputs/ppo_tiny/metrics.jsonl --eval sft=outputs/eval_sft --eval ppo=outputs/eval_ppo \\
        --behaviors outputs/eval_ppo/behaviors --timings outputs/timings.tsv

Reads what the stages wrote and nothing else (every input is optional; a missing one is reported as not run):
  --sft-metrics   the SFT trainer's metrics.jsonl (``loss`` per logged step)
  --ppo-metrics   the PPO driver's metrics.jsonl (``reward/mean``, ``response_length/mean``,
                  ``truncation_rate``, ``time/*`` per iteration)
  --eval NAME=DIR an evaluation's output directory (results.json, generations.jsonl); repeatable, e.g. the
                  cold-start and the PPO model. Accuracy is also split by task kind, read from item ids of the
                  form ``<split>-<kind>-<n>`` (tools/make_synthetic_data.py writes them)
  --behaviors     tools/analyze_behaviors.py's output directory (behaviors.json)
  --timings       ``stage<TAB>seconds`` lines (examples/tiny_default.sh writes them)

Writes OUT/summary.md (tables: time per stage, SFT loss first/last, PPO reward and response length per
iteration with a smoothed trend, accuracy per benchmark and task kind, behaviour emergence rates and BTR) and
OUT/summary.png (SFT loss per step; PPO reward, with its moving average, and response length per iteration;
accuracy per task kind for each evaluated model), and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

SMOOTHING_WINDOW = 3
"""Iterations in the PPO reward's trailing moving average (the trend line and its first/last values)."""
MODALITY_REWARDS = ("reward/image", "reward/text")
"""The PPO driver's mean reward of the prompts with an image and of the text-only ones (when present)."""
_KIND = re.compile(r"^[a-z]+-([a-z_]+)-\d+$")


def read_jsonl(path: Optional[Path]) -> list[dict]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moving_average(values: Sequence[float], window: int = SMOOTHING_WINDOW) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


def slope(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index (per iteration); nan below two points."""
    n = len(values)
    if n < 2:
        return math.nan
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    return (sum((i - x_mean) * (v - y_mean) for i, v in enumerate(values))
            / sum((i - x_mean) ** 2 for i in range(n)))


def accuracy_by_kind(generations: Sequence[dict]) -> dict[str, tuple[int, float]]:
    """``kind -> (samples, accuracy)`` over a generations.jsonl, plus ``all``; ids without a kind count in
    ``all`` only."""
    scores: dict[str, list[float]] = defaultdict(list)
    for g in generations:
        match = _KIND.match(str(g.get("id", "")))
        if match:
            scores[match.group(1)].append(float(g["score"]))
        scores["all"].append(float(g["score"]))
    return {kind: (len(s), sum(s) / len(s)) for kind, s in sorted(scores.items(), key=lambda kv: kv[0] == "all")}


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _section_times(timings: list[tuple[str, float]]) -> list[str]:
    if not timings:
        return []
    rows = ["## Time per stage", "", "| stage | wall time |", "|---|---:|"]
    rows += [f"| {name} | {_fmt_time(seconds)} |" for name, seconds in timings]
    rows += [f"| **total** | **{_fmt_time(sum(s for _, s in timings))}** |", ""]
    return rows


def _section_sft(sft: list[dict]) -> list[str]:
    rows = ["## Stage 1: language-only cold-start SFT", ""]
    if not sft:
        return rows + ["not run", ""]
    first, last = sft[0], sft[-1]
    rows += ["| logged steps | loss (first) | loss (last) | tokens/s (mean) |", "|---|---:|---:|---:|",
             f"| {first['step']}..{last['step']} | {first['loss']:.3f} (step {first['step']}) | "
             f"{last['loss']:.3f} (step {last['step']}) | "
             f"{sum(m.get('tokens_per_s', 0.0) for m in sft) / len(sft):.0f} |", ""]
    return rows


def _section_ppo(ppo: list[dict]) -> list[str]:
    rows = ["## Stage 2: multimodal PPO", ""]
    if not ppo:
        return rows + ["not run", ""]
    reward = [m["reward/mean"] for m in ppo]
    length = [m["response_length/mean"] for m in ppo]
    smooth = moving_average(reward)
    per_iteration = [m.get("time/iteration_s", math.nan) for m in ppo]
    rows += [
        f"| iterations | reward (first -> last) | reward, {SMOOTHING_WINDOW}-iteration mean (first -> last) | "
        "reward trend | response length (first -> last) | truncated (first -> last) | s / iteration |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {len(ppo)} | {reward[0]:.3f} -> {reward[-1]:.3f} | {smooth[min(SMOOTHING_WINDOW, len(smooth)) - 1]:.3f} "
        f"-> {smooth[-1]:.3f} | {slope(reward):+.4f} / iteration | {length[0]:.1f} -> {length[-1]:.1f} | "
        f"{_pct(ppo[0].get('truncation_rate', math.nan))} -> {_pct(ppo[-1].get('truncation_rate', math.nan))} | "
        f"{sum(per_iteration) / len(per_iteration):.1f} |",
        "",
        "| iteration | reward | reward (moving mean) | reward, image prompts | reward, text prompts | "
        "response length | truncated | entropy | time (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, s in zip(ppo, smooth):
        by_modality = " | ".join(f"{m[key]:.3f}" if key in m else "" for key in MODALITY_REWARDS)
        rows.append(f"| {m['step']} | {m['reward/mean']:.3f} | {s:.3f} | {by_modality} | "
                    f"{m['response_length/mean']:.1f} | {_pct(m.get('truncation_rate', math.nan))} | "
                    f"{m.get('entropy', math.nan):.3f} | {m.get('time/iteration_s', math.nan):.1f} |")
    phases = sorted(k for k in ppo[0] if k.startswith("time/") and k != "time/iteration_s")
    if phases:
        split = ", ".join(f"{k[5:-2]} {sum(m.get(k, 0.0) for m in ppo) / len(ppo):.1f} s" for k in phases)
        rows += ["", f"Mean time per iteration by phase: {split}."]
    return rows + [""]


def _section_eval(evals: list[tuple[str, Path]]) -> tuple[list[str], dict[str, dict[str, tuple[int, float]]]]:
    rows = ["## Evaluation (greedy, held-out split)", ""]
    if not evals:
        return rows + ["not run", ""], {}
    by_kind: dict[str, dict[str, tuple[int, float]]] = {}
    rows += ["| model | benchmark | items | accuracy | truncated | mean tokens |", "|---|---|---:|---:|---:|---:|"]
    for name, directory in evals:
        results_path = directory / "results.json"
        if not results_path.is_file():
            rows.append(f"| {name} | not run | | | | |")
            continue
        for bench, score in json.loads(results_path.read_text())["benchmarks"].items():
            rows.append(f"| {name} | {bench} | {score['items']} | {_pct(score['accuracy'])} | "
                        f"{_pct(score['truncated_rate'])} | {score['mean_response_tokens']:.0f} |")
        by_kind[name] = accuracy_by_kind(read_jsonl(directory / "generations.jsonl"))
    kinds = [k for k in dict.fromkeys(k for table in by_kind.values() for k in table)]
    if kinds:
        rows += ["", "Accuracy by task kind:", "", "| model | " + " | ".join(kinds) + " |",
                 "|---|" + "---:|" * len(kinds)]
        for name, table in by_kind.items():
            cells = [f"{_pct(table[k][1])} (n={table[k][0]})" if k in table else "" for k in kinds]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows + [""], by_kind


def _section_behaviors(directory: Optional[Path]) -> list[str]:
    rows = ["## Cognitive behaviours (offline rule judge)", ""]
    path = directory / "behaviors.json" if directory else None
    if path is None or not path.is_file():
        return rows + ["not run", ""]
    report = json.loads(path.read_text())
    btr = lambda value: "n/a" if value is None else f"{value:.2f}"  # noqa: E731
    rows += [f"{report.get('responses', '?')} responses of {report.get('generations', '?')}, "
             f"judge `{report.get('judge_model', '?')}`.", "",
             "| visual behaviour | emergence rate | linguistic behaviour | emergence rate | BTR |",
             "|---|---:|---|---:|---:|"]
    for pair in report["pairs"]:
        rows.append(f"| {pair['visual']} | {_pct(pair['visual_rate'])} | {pair['linguistic']} | "
                    f"{_pct(pair['linguistic_rate'])} | {btr(pair['btr'])} |")
    return rows + ["", f"Overall BTR (mean visual rate / mean linguistic rate): {btr(report['overall_btr'])}.", ""]


def plot(path: Path, sft: list[dict], ppo: list[dict], by_kind: dict[str, dict[str, tuple[int, float]]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 3 + bool(by_kind)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.6))
    ax = axes[0]
    ax.plot([m["step"] for m in sft], [m["loss"] for m in sft], marker=".")
    ax.set(title="Cold-start SFT", xlabel="step", ylabel="loss (per assistant token)")
    ax = axes[1]
    iterations = [m["step"] for m in ppo]
    reward = [m["reward/mean"] for m in ppo]
    ax.plot(iterations, reward, marker=".", alpha=0.5, label="per iteration")
    ax.plot(iterations, moving_average(reward), linewidth=2, label=f"{SMOOTHING_WINDOW}-iteration mean")
    # One line per modality when both were trained on (with one, its line is the mean's).
    both = all(any(key in m for m in ppo) for key in MODALITY_REWARDS)
    for key in MODALITY_REWARDS if both else ():
        points = [(m["step"], m[key]) for m in ppo if key in m]
        if points:
            ax.plot([i for i, _ in points], moving_average([r for _, r in points]), linewidth=1, linestyle="--",
                    label=f"{key.split('/')[1]} prompts ({SMOOTHING_WINDOW}-iteration mean)")
    ax.set(title="PPO reward", xlabel="iteration", ylabel="mean reward (accuracy of samples)")
    if ppo:
        ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(iterations, [m["response_length/mean"] for m in ppo], marker=".")
    ax.set(title="PPO response length", xlabel="iteration", ylabel="mean response tokens")
    if by_kind:
        ax = axes[3]
        kinds = [k for k in dict.fromkeys(k for table in by_kind.values() for k in table)]
        width = 0.8 / len(by_kind)
        for j, (name, table) in enumerate(by_kind.items()):
            ax.bar([i + j * width for i in range(len(kinds))], [100 * table.get(k, (0, 0.0))[1] for k in kinds],
                   width, label=name)
        ax.set_xticks([i + width * (len(by_kind) - 1) / 2 for i in range(len(kinds))], kinds)
        ax.set(title="Held-out accuracy", ylabel="accuracy (%)")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _named_dir(text: str) -> tuple[str, Path]:
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=DIR, e.g. ppo=outputs/eval_ppo")
    return name, Path(directory)


def read_timings(path: Optional[Path]) -> list[tuple[str, float]]:
    if path is None or not path.is_file():
        return []
    return [(name, float(seconds)) for name, seconds in
            (line.rsplit("\t", 1) for line in path.read_text().splitlines() if line.strip())]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for summary.md and summary.png")
    parser.add_argument("--sft-metrics", type=Path, help="the SFT run's metrics.jsonl")
    parser.add_argument("--ppo-metrics", type=Path, help="the PPO run's metrics.jsonl")
    parser.add_argument("--eval", type=_named_dir, action="append", default=[], metavar="NAME=DIR",
                        help="an evaluation output directory, named (repeatable)")
    parser.add_argument("--behaviors", type=Path, help="tools/analyze_behaviors.py's output directory")
    parser.add_argument("--timings", type=Path, help="stage<TAB>seconds lines")
    parser.add_argument("--title", default="megatron-ovr tiny default: the OVR recipe end to end on CPU")
    args = parser.parse_args(argv)

    sft, ppo = read_jsonl(args.sft_metrics), read_jsonl(args.ppo_metrics)
    eval_rows, by_kind = _section_eval(args.eval)
    figure = plot(args.out / "summary.png", sft, ppo, by_kind)
    lines = [f"# {args.title}", "", *_section_times(read_timings(args.timings)), *_section_sft(sft),
             *_section_ppo(ppo), *eval_rows, *_section_behaviors(args.behaviors), f"![curves]({figure.name})", ""]
    text = "\n".join(lines)
    (args.out / "summary.md").write_text(text)
    print(text)
    print(f"wrote {args.out / 'summary.md'} and {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
