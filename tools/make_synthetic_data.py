"""Writes the tiny demo's synthetic data: the SFT conversations and the PPO train / held-out eval prompts.

    python tools/make_synthetic_data.py --out outputs/tiny/data [--seed 0] [--sft 2000] \\
        [--train-visual 480 --train-text 160] [--eval-visual 96 --eval-text 32] [--image-size 112x84]

Writes into OUT:
  sft.jsonl                 language-only R1-style reasoning conversations ({"messages": ...}) for the
                            cold start, to tokenise with tools/preprocess_sft.py --input OUT/sft.jsonl
  rl_train/prompts.jsonl    PPO prompts in the benchmark layout (id, question, answer, choices, images),
  rl_train/images/          with the PNGs they name
  rl_eval/prompts.jsonl     held-out questions for tools/evaluate.py: no item is also in rl_train
  rl_eval/images/
  sft_visual/conversations.jsonl, sft_visual/images/   (only with --sft-visual N) multimodal SFT
                            conversations over drawn images, for tools/preprocess_sft.py --processor

Visual questions count red squares (answers 1-4), read one digit (0-9) or pick the taller of two bars
(A/B) (--visual-kinds picks among them); text questions are the SFT data's arithmetic or, with --text-kind
counting, its counting word problems (megatron_ovr/data/synthetic_visual.py). The demo (make demo) runs

    python tools/make_synthetic_data.py --out OUT --sft-system-prompt --sft-counting-share 0.3 \
        --visual-kinds count --text-kind counting ...

so the cold start trains the recipe's prompt and the habit of answering "How many ...?" with a small count.
The same arguments always write the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megatron_ovr.data.prompts import SYSTEM_PROMPT
from megatron_ovr.data.synthetic import write_synthetic_jsonl
from megatron_ovr.data.synthetic_visual import (
    DEFAULT_IMAGE_SIZE, TEXT_KINDS, VISUAL_KINDS, write_rl_prompts, write_visual_sft,
)

SFT_FILE = "sft.jsonl"
SPLIT_FOLDERS = {"train": "rl_train", "eval": "rl_eval"}


def make_synthetic_data(out: str | Path, *, seed: int, sft: int, train_visual: int, train_text: int,
                        eval_visual: int, eval_text: int, sft_visual: int = 0, sft_counting_share: float = 0.0,
                        sft_system_prompt: bool = False, visual_kinds: tuple[str, ...] = VISUAL_KINDS,
                        text_kind: str = "arithmetic", image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE,
                        progress: bool = False) -> dict[str, Path]:
    """Writes every file (see the module docstring); returns the paths of the JSONL files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"sft": write_synthetic_jsonl(out / SFT_FILE, sft, seed, counting_share=sft_counting_share,
                                            system_prompt=SYSTEM_PROMPT if sft_system_prompt else None)}
    for split, n_visual, n_text in (("train", train_visual, train_text), ("eval", eval_visual, eval_text)):
        written[split] = write_rl_prompts(out / SPLIT_FOLDERS[split], n_visual, n_text, seed, split=split,
                                          image_size=image_size, visual_kinds=visual_kinds, text_kind=text_kind,
                                          progress=progress)
    if sft_visual:
        written["sft_visual"] = write_visual_sft(out / "sft_visual", sft_visual, seed, image_size=image_size,
                                                 progress=progress)
    return written


def _image_size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 112x84") from None


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(kind.strip() for kind in text.split(",") if kind.strip())


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every generator (default: 0)")
    parser.add_argument("--sft", type=_count, default=2000, metavar="N", help="SFT conversations (default: 2000)")
    parser.add_argument("--sft-counting-share", type=float, default=0.0, metavar="F",
                        help="share of the SFT conversations that are counting word problems (default: 0)")
    parser.add_argument("--sft-system-prompt", action="store_true",
                        help="open every SFT conversation with the recipe's system prompt (the one PPO and "
                             "evaluation prompt with) instead of the chat template's default")
    parser.add_argument("--visual-kinds", type=_kinds, default=VISUAL_KINDS, metavar="K[,K]",
                        help=f"visual question kinds, taking turns (default: {','.join(VISUAL_KINDS)})")
    parser.add_argument("--text-kind", choices=TEXT_KINDS, default="arithmetic",
                        help="text-only PPO / evaluation questions (default: arithmetic)")
    parser.add_argument("--sft-visual", type=_count, default=0, metavar="N",
                        help="multimodal SFT conversations over drawn images (default: 0, none)")
    parser.add_argument("--train-visual", type=_count, default=480, metavar="N",
                        help="PPO prompts with an image (default: 480)")
    parser.add_argument("--train-text", type=_count, default=160, metavar="N",
                        help="text-only PPO prompts (default: 160)")
    parser.add_argument("--eval-visual", type=_count, default=96, metavar="N",
                        help="held-out evaluation questions with an image (default: 96)")
    parser.add_argument("--eval-text", type=_count, default=32, metavar="N",
                        help="held-out text-only evaluation questions (default: 32)")
    parser.add_argument("--image-size", type=_image_size, default=DEFAULT_IMAGE_SIZE, metavar="WxH",
                        help="image size in pixels (default: 112x84, 12 image tokens at max_pixels=112*112)")
    args = parser.parse_args(argv)
    try:
        written = make_synthetic_data(args.out, seed=args.seed, sft=args.sft, train_visual=args.train_visual,
                                      train_text=args.train_text, eval_visual=args.eval_visual,
                                      eval_text=args.eval_text, sft_visual=args.sft_visual,
                                      sft_counting_share=args.sft_counting_share,
                                      sft_system_prompt=args.sft_system_prompt, visual_kinds=args.visual_kinds,
                                      text_kind=args.text_kind, image_size=args.image_size, progress=True)
    except ValueError as err:  # an image size too small for the tasks, an unknown kind, a share outside [0, 1]
        parser.error(str(err))
    for name, path in written.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
