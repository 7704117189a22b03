"""Tokenises chat conversations into the indexed SFT format (Stage 1: the linguistic cold start).

    python tools/preprocess_sft.py --input data/a.jsonl data/b.parquet --tokenizer /models/Qwen2.5-VL-7B-Instruct \\
        --output data/sft/train --workers 8
    python tools/preprocess_sft.py --synthetic 2000 --seed 0 --tokenizer DIR --output outputs/sft/synthetic
    python tools/preprocess_sft.py --input data/a.jsonl --tokenizer my_lm.model --output data/sft/train  # SentencePiece
    python tools/preprocess_sft.py --input data/visual.jsonl --tokenizer DIR --processor DIR --output data/sft/vis

Each input is JSONL (one {"messages": [...], "images": [path, ...]} per line) or Parquet (a `messages` and an
optional `images` column). Conversations are rendered with the Qwen2-VL chat template, loss-masked to the
assistant turns, and tokenised in a pool of workers (output order = input order, so runs are reproducible).
Malformed samples are skipped and reported as file:line: reason (or, with --strict, stop the run); an image
that cannot be read makes its sample malformed.

Images (multimodal SFT; the cold start itself is language-only): paths are relative to the data file's
folder (or --image-root). --processor names a model directory whose preprocessor_config.json is the image
processor to use (the one the rollout engine and evaluation use, e.g. the Qwen2.5-VL model directory): each
image is resized and patched by it, its <|image_pad|> run gets the image's merged-token count, and the
patches are stored with the tokens. Writes PREFIX.bin, PREFIX.mask, PREFIX.idx.npy and PREFIX.idx.json, plus
PREFIX.pixels and PREFIX.vision.npz when there are images.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from tqdm import tqdm

from megatron_ovr.data.chat import tokenize_conversation
from megatron_ovr.data.indexed import SFTSample, write_indexed
from megatron_ovr.data.sources import Conversation, ConversationReader, MalformedSample
from megatron_ovr.data.synthetic import generate_conversations
from megatron_ovr.data.tokenizer import Tokenizer, load_tokenizer

SHOWN_REASONS = 5


class _Worker:
    """A tokenising process's state: the tokenizer and, for data with images, the image processor."""

    tokenizer: Optional[Tokenizer] = None
    images = None  # megatron_ovr.rollout.model_dir.ImageProcessor
    image_root: Optional[Path] = None


def _init_worker(tokenizer_spec: str, processor_dir: Optional[str], image_root: Optional[str]) -> None:
    _Worker.tokenizer = load_tokenizer(tokenizer_spec)
    _Worker.images = None
    if processor_dir is not None:
        from megatron_ovr.rollout.model_dir import ImageProcessor

        _Worker.images = ImageProcessor(processor_dir)
    _Worker.image_root = None if image_root is None else Path(image_root)


def _open_images(conversation: Conversation) -> list:
    from PIL import Image

    root = _Worker.image_root or Path(conversation.source).parent
    opened = []
    for path in conversation.images:
        path = Path(path) if Path(path).is_absolute() else root / path
        with Image.open(path) as image:  # OSError (missing, unreadable) is the caller's to report
            opened.append(image.convert("RGB"))
    return opened


def _tokenize(record: Union[Conversation, MalformedSample]) -> Union[SFTSample, MalformedSample]:
    # Malformed records travel through the pool too, so that they are counted in input order.
    if isinstance(record, MalformedSample):
        return record
    conversation = record
    pixels = grids = None
    if conversation.images:
        if _Worker.images is None:
            raise ValueError(f"{conversation.source}:{conversation.line} has {len(conversation.images)} image(s): "
                             f"pass --processor DIR (a model directory with preprocessor_config.json) to "
                             f"preprocess multimodal data")
        try:
            pixel_tensor, grid_tensor = _Worker.images(_open_images(conversation))
        except OSError as err:
            return MalformedSample(conversation.source, conversation.line, f"image not readable: {err}")
        pixels, grids = pixel_tensor.numpy(), grid_tensor.numpy()
    try:
        merge = 1 if grids is None else _Worker.images.processor.merge_size
        counts = [] if grids is None else [int(g.prod()) // merge**2 for g in grids]
        tokenized = tokenize_conversation(conversation.messages, _Worker.tokenizer, counts)
    except ValueError as err:
        return MalformedSample(conversation.source, conversation.line, str(err))
    return SFTSample(tokenized.token_ids, tokenized.loss_mask, pixels, grids)


def _synthetic(n: int, seed: int) -> Iterator[Conversation]:
    for line, sample in enumerate(generate_conversations(n, seed), start=1):
        yield Conversation(messages=sample["messages"], images=(), source=f"synthetic(seed={seed})", line=line)


def _tokenized(records: Iterable, args: argparse.Namespace) -> Iterator:
    init_args = (args.tokenizer, args.processor, args.image_root)
    if args.workers == 1:
        _init_worker(*init_args)
        yield from map(_tokenize, records)
        return
    # imap keeps the input order, so the output does not depend on --workers.
    with multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=init_args) as pool:
        yield from pool.imap(_tokenize, records, chunksize=64 if args.processor is None else 8)


def preprocess(args: argparse.Namespace) -> dict:
    """Runs the tool; returns the written header plus the skipped samples (``"malformed"``)."""
    tokenizer = load_tokenizer(args.tokenizer)
    reader = ConversationReader(args.input or [], strict=args.strict)
    records = _synthetic(args.synthetic, args.seed) if args.synthetic is not None else reader.records()
    if args.max_samples is not None:
        records = itertools.islice(records, args.max_samples)
    total = min((n for n in (args.synthetic, args.max_samples) if n is not None), default=None)
    lengths: list[int] = []

    def good_samples() -> Iterator[SFTSample]:
        results = tqdm(_tokenized(records, args), desc="tokenising", unit=" samples",
                       total=total, mininterval=1.0, file=sys.stderr)
        for result in results:
            if isinstance(result, MalformedSample):
                reader.skip(result)
            else:
                lengths.append(result.token_ids.size)
                yield result

    header = write_indexed(args.output, good_samples(), vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id)
    return {**header, "max_length": max(lengths, default=0), "malformed": reader.malformed}


def _summary(output: str, result: dict) -> str:
    samples, tokens, loss = result["num_samples"], result["num_tokens"], result["num_loss_tokens"]
    images = result.get("num_images", 0)
    lines = [
        f"wrote {output}.{{bin,mask,idx.npy,idx.json{',pixels,vision.npz' if images else ''}}}",
        f"samples: {samples}  tokens: {tokens} (loss on {loss}, {100 * loss / max(tokens, 1):.1f}%)  "
        f"mean length: {tokens / max(samples, 1):.1f}  max length: {result['max_length']}",
        f"skipped: {len(result['malformed'])}",
    ]
    if images:
        lines.insert(2, f"images: {images} ({result['num_patches']} patches, "
                        f"{result['num_patches'] * result['patch_dim'] * 4 / 2**20:.1f} MiB of pixels)")
    lines += [f"  {sample}" for sample in result["malformed"][:SHOWN_REASONS]]
    if len(result["malformed"]) > SHOWN_REASONS:
        lines.append(f"  ... and {len(result['malformed']) - SHOWN_REASONS} more")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="FILE", help=".jsonl or .parquet files, read in order")
    source.add_argument("--synthetic", type=int, metavar="N",
                        help="generate N synthetic arithmetic reasoning conversations instead (for the demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --synthetic (default: 0)")
    parser.add_argument("--tokenizer", required=True, metavar="SPEC",
                        help="HF tokenizer directory (tokenizer.json; Qwen) or a SentencePiece .model file with the "
                             "chat template's special tokens as user-defined symbols (megatron_ovr/data/tokenizer.py)")
    parser.add_argument("--processor", metavar="DIR",
                        help="model directory with preprocessor_config.json: the image processor for samples with "
                             "images (required when there are any)")
    parser.add_argument("--image-root", metavar="DIR",
                        help="folder that relative image paths start from (default: each data file's folder)")
    parser.add_argument("--output", required=True, metavar="PREFIX", help="output prefix, e.g. data/sft/train")
    parser.add_argument("--workers", type=int, default=1, help="tokenising processes (default: 1)")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed sample instead of skipping")
    parser.add_argument("--max-samples", type=int, metavar="N", help="read at most N input samples (lines / rows)")
    args = parser.parse_args(argv)
    for name in ("workers", "max_samples", "synthetic"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "workers" else 0):
            parser.error(f"--{name.replace('_', '-')}={value} is out of range")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = preprocess(args)
    except (ValueError, FileNotFoundError, ImportError) as err:  # bad input; --strict stops here at file:line
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(_summary(args.output, result))
    if result["num_samples"] == 0:
        print("error: no valid samples were written", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
