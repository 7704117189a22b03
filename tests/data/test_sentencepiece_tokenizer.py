"""The SentencePiece path of the tokenizer seam: a tiny model trained here on the fly (with the chat
template's special tokens as user-defined symbols) tokenises conversations without stray dummy-prefix
spaces, and tools/preprocess_sft.py writes SFT data with it; a model without the symbols is refused with a
message naming them."""

import io

import numpy as np
import pytest

from megatron_ovr.data import IndexedDataset, generate_conversations, render_conversation, tokenize_conversation
from megatron_ovr.data.tokenizer import CHAT_SPECIAL_TOKENS, SentencePieceTokenizer, load_tokenizer
from tools.preprocess_sft import main as preprocess_main

spm = pytest.importorskip("sentencepiece", reason="pip install 'megatron-ovr[sentencepiece]'")
VOCAB = 512


def train_model(path, symbols, **options):
    text = [render_conversation(c["messages"]) for c in generate_conversations(200, seed=1)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=model, vocab_size=VOCAB, model_type="bpe", hard_vocab_limit=False,
        user_defined_symbols=list(symbols), minloglevel=2, **options,
    )
    path.write_bytes(model.getvalue())
    return path


# Llama-style settings: identity normaliser (newlines survive), byte fallback (no unknown characters).
LLAMA_STYLE = dict(normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return train_model(tmp_path_factory.mktemp("spm") / "chat.model", CHAT_SPECIAL_TOKENS + ("<|endoftext|>",),
                       **LLAMA_STYLE)


@pytest.fixture(scope="module")
def tokenizer(model_file):
    return load_tokenizer(model_file)


def test_spec_selects_sentencepiece_and_special_ids(tokenizer):
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.kind == "sentencepiece"
    assert 0 < tokenizer.vocab_size <= VOCAB
    assert tokenizer.eos_id == tokenizer.token_id("<|im_end|>")
    assert tokenizer.pad_id == tokenizer.token_id("<|endoftext|>")
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|image_pad|><|image_pad|>")
    assert ids[0] == tokenizer.token_id("<|im_start|>")
    assert ids.count(tokenizer.token_id("<|image_pad|>")) == 2
    with pytest.raises(KeyError, match="not a single token"):
        tokenizer.token_id("<|no_such_token|>")


@pytest.mark.parametrize("text", ["plain text", "<|im_start|>assistant\nx = 1 + 2<|im_end|>\n", "Grüße 数学 🙂\n\n  "])
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_chat_template_pieces_add_no_spaces(tokenizer):
    """No dummy-prefix space at the start of each piece: the ids decode to exactly the rendered template,
    and the loss mask covers each assistant content, tokenised on its own, and its <|im_end|>."""
    for conversation in generate_conversations(20, seed=5):
        messages = conversation["messages"]
        sample = tokenize_conversation(messages, tokenizer)
        assert tokenizer.decode(sample.token_ids) == render_conversation(messages)
        turns = [tokenizer.encode(m["content"]) + [tokenizer.eos_id] for m in messages if m["role"] == "assistant"]
        assert sample.token_ids[sample.loss_mask].tolist() == [i for turn in turns for i in turn]


def test_preprocess_sft_with_a_sentencepiece_model(tmp_path, model_file, tokenizer, capsys):
    prefix = tmp_path / "spm_sft"
    assert preprocess_main(["--synthetic", "50", "--seed", "2", "--tokenizer", str(model_file),
                            "--output", str(prefix)]) == 0
    assert "samples: 50" in capsys.readouterr().out
    dataset = IndexedDataset(prefix)
    assert (dataset.vocab_size, dataset.pad_id) == (tokenizer.vocab_size, tokenizer.pad_id)
    for i, conversation in enumerate(generate_conversations(50, seed=2)):
        expected = tokenize_conversation(conversation["messages"], tokenizer)
        np.testing.assert_array_equal(dataset[i][0], expected.token_ids)
        np.testing.assert_array_equal(dataset[i][1], expected.loss_mask)


def test_model_without_the_chat_symbols_is_refused(tmp_path, capsys):
    model = train_model(tmp_path / "plain.model", ["<|im_start|>"], **LLAMA_STYLE)
    with pytest.raises(ValueError, match=r"<\|im_end\|>, <\|vision_start\|>, <\|vision_end\|>, <\|image_pad\|>"):
        load_tokenizer(model)
    assert preprocess_main(["--synthetic", "5", "--tokenizer", str(model), "--output", str(tmp_path / "x")]) == 1
    assert "user-defined symbols" in capsys.readouterr().err


def test_pad_defaults_to_the_model_pad_piece(tmp_path):
    model = train_model(tmp_path / "pad.model", CHAT_SPECIAL_TOKENS, pad_id=3, unk_id=0, bos_id=1, eos_id=2,
                        **LLAMA_STYLE)
    tok = load_tokenizer(model)
    assert tok.pad_id == 3 and tok.eos_id == tok.token_id("<|im_end|>")
    no_pad = train_model(tmp_path / "nopad.model", CHAT_SPECIAL_TOKENS, **LLAMA_STYLE)
    with pytest.raises(ValueError, match="no pad piece"):
        load_tokenizer(no_pad)
    explicit = load_tokenizer(no_pad, pad_token="<|im_end|>")
    assert explicit.pad_id == explicit.eos_id == explicit.token_id("<|im_end|>")


def test_a_spec_that_is_neither_kind(tmp_path):
    (tmp_path / "vocab.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match="HF tokenizer directory .* or a SentencePiece"):
        load_tokenizer(tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError, match="no such SentencePiece model"):
        load_tokenizer(tmp_path / "missing.model")
