"""SFT data (Stage 1, the linguistic cold start): chat template and loss masks, conversation sources,
synthetic reasoning data, the memory-mapped tokenised format, packing and the resumable loader.

Flow: sources (JSONL / Parquet) -> ``tokenize_conversation`` -> ``write_indexed`` (``tools/preprocess_sft.py``)
-> ``IndexedDataset`` (or a ``BlendedDataset`` of several) -> ``SFTDataLoader`` -> model inputs.
"""

from .chat import TokenizedSample, render_conversation, tokenize_conversation, validate_messages
from .indexed import IndexedDataset, SFTSample, write_indexed
from .loader import BlendedDataset, SFTDataLoader
from .packing import collate, plan_packed_rows, plan_unpacked_rows
from .sources import Conversation, ConversationReader, MalformedSample, read_records, write_jsonl
from .synthetic import generate_conversations, write_synthetic_jsonl
from .tokenizer import Tokenizer, load_tokenizer, qwen_tokenizer_dir

__all__ = [
    "BlendedDataset",
    "Conversation",
    "ConversationReader",
    "IndexedDataset",
    "MalformedSample",
    "SFTDataLoader",
    "SFTSample",
    "TokenizedSample",
    "Tokenizer",
    "collate",
    "generate_conversations",
    "load_tokenizer",
    "plan_packed_rows",
    "plan_unpacked_rows",
    "qwen_tokenizer_dir",
    "read_records",
    "render_conversation",
    "tokenize_conversation",
    "validate_messages",
    "write_indexed",
    "write_jsonl",
    "write_synthetic_jsonl",
]
