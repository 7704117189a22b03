"""Tokenises chat conversations into the indexed SFT format (Stage 1: the linguistic cold start).

    python tools/preprocess_sft.py --input data/a.jsonl data/b.parquet --tokenizer /models/Qwen2.5-VL-7B-Instruct \\
        --output data/sft/train --workers 8
    python tools/preprocess_sft.py --synthetic 2000 --seed 0 --tokenizer DIR --output outputs/sft/synthetic
    python tools/preprocess_sft.py --input data/a.jsonl --tokenizer my_lm.model --output data/sft/train  # SentencePiece

Each input is JSONL (one {"messages": [...]} per line) or Parquet (a `messages` column). Conversations are
rendered with the Qwen2-VL chat template, loss-masked to the assistant turns, and tokenised in a pool of
workers (output order = input order, so runs are reproducible). Malformed samples are skipped and
reported as file:line: reason (or, with --strict, stop the run). Samples with images are skipped too:
this stage is language-only. Writes PREFIX.bin, PREFIX.mask, PREFIX.idx.npy and PREFIX.idx.json.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import multiprocessing
import sys
from typing import Iterable, Iterator, Optional, Union

from tqdm import tqdm

from megatron_ovr.data.chat import TokenizedSample, tokenize_conversation
from megatron_ovr.data.indexed import write_indexed
from megatron_ovr.data.sources import Conversation, ConversationReader, MalformedSample
from megatron_ovr.data.synthetic import generate_conversations
from megatron_ovr.data.tokenizer import Tokenizer, load_tokenizer

SHOWN_REASONS = 5

_worker_tokenizer: Optional[Tokenizer] = None


def _init_worker(tokenizer_spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_spec)


def _tokenize(record: Union[Conversation, MalformedSample]) -> Union[TokenizedSample, MalformedSample]:
    # Malformed records travel through the pool too, so that they are counted in input order.
    if isinstance(record, MalformedSample):
        return record
    conversation = record
    if conversation.images:
        return MalformedSample(conversation.source, conversation.line,
                               f"has {len(conversation.images)} image(s): Stage-1 SFT preprocessing is text-only")
    try:
        return tokenize_conversation(conversation.messages, _worker_tokenizer)
    except ValueError as err:
        return MalformedSample(conversation.source, conversation.line, str(err))


def _synthetic(n: int, seed: int) -> Iterator[Conversation]:
    for line, sample in enumerate(generate_conversations(n, seed), start=1):
        yield Conversation(messages=sample["messages"], images=(), source=f"synthetic(seed={seed})", line=line)


def _tokenized(records: Iterable, tokenizer_spec: str, workers: int) -> Iterator:
    if workers == 1:
        _init_worker(tokenizer_spec)
        yield from map(_tokenize, records)
        return
    # imap keeps the input order, so the output does not depend on --workers.
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec,)) as pool:
        yield from pool.imap(_tokenize, records, chunksize=64)


def preprocess(args: argparse.Namespace) -> dict:
    """Runs the tool; returns the written header plus the skipped samples (``"malformed"``)."""
    tokenizer = load_tokenizer(args.tokenizer)
    reader = ConversationReader(args.input or [], strict=args.strict)
    records = _synthetic(args.synthetic, args.seed) if args.synthetic is not None else reader.records()
    if args.max_samples is not None:
        records = itertools.islice(records, args.max_samples)
    total = min((n for n in (args.synthetic, args.max_samples) if n is not None), default=None)
    lengths: list[int] = []

    def good_samples() -> Iterator[TokenizedSample]:
        results = tqdm(_tokenized(records, args.tokenizer, args.workers), desc="tokenising", unit=" samples",
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
    lines = [
        f"wrote {output}.{{bin,mask,idx.npy,idx.json}}",
        f"samples: {samples}  tokens: {tokens} (loss on {loss}, {100 * loss / max(tokens, 1):.1f}%)  "
        f"mean length: {tokens / max(samples, 1):.1f}  max length: {result['max_length']}",
        f"skipped: {len(result['malformed'])}",
    ]
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
