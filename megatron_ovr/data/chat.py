r"""The Qwen2-VL chat template, written as code, and the SFT loss mask.

Contract
--------
A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": ...}`` whose
content is a string or a list of parts ``{"type": "text", "text": str}`` / ``{"type": "image", ...}``
(images only in user messages). It renders as Qwen2-VL's template::

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n   (only when the first message is not a system one)
    <|im_start|>{role}\n{content}<|im_end|>\n                      (every message, in order)

with each image as ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>``; the caller gives n per
image (its merged-token count ``t*h*w/4`` from the image grid).

:func:`tokenize_conversation` returns token ids and a loss mask that is True exactly on the tokens of every
assistant message's content and its closing ``<|im_end|>`` — not on the ``<|im_start|>assistant\n`` header,
not on the ``\n`` after ``<|im_end|>``.

The text is tokenised in pieces split where the mask changes, so the mask boundaries are exact. Every such
boundary but one sits next to a special token, where the tokenizer splits anyway; hence the ids equal
``tokenizer.encode(render_conversation(...))``, with one exception: an assistant content that starts with
whitespace containing a newline (``"\n..."``), which the whole string would merge with the header's ``\n``
into one token. The pieces are kept there because they are what the model sees at inference: a prompt
ending in ``<|im_start|>assistant\n``, then the generated content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_SYSTEM_MESSAGE",
    "ROLES",
    "TokenizedSample",
    "count_images",
    "render_conversation",
    "tokenize_conversation",
    "validate_messages",
]

ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM_MESSAGE = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


@dataclass(frozen=True)
class TokenizedSample:
    """One tokenised conversation.

    Attributes:
        token_ids: ``[n]`` int32.
        loss_mask: ``[n]`` bool, True on assistant content tokens and their ``<|im_end|>``.
        num_images: images in the conversation (each one ``<|vision_start|>...<|vision_end|>`` block).
    """

    token_ids: np.ndarray
    loss_mask: np.ndarray
    num_images: int


def _parts(content) -> list[dict]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _validate_part(where: str, part, role: str) -> None:
    if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
        raise ValueError(f"{where}: a content part must be a dict with type 'text' or 'image', got {part!r:.80}")
    if part["type"] == "text" and not isinstance(part.get("text"), str):
        raise ValueError(f"{where}: a text part needs a string 'text', got {type(part.get('text')).__name__}")
    if part["type"] == "image" and role != "user":
        raise ValueError(f"{where}: images are only allowed in user messages, found one in a {role} message")


def validate_messages(messages) -> None:
    """Raises ``ValueError`` (the reason names the message) unless ``messages`` is a valid conversation."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of message dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("empty conversation: messages is an empty list")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: a message must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if role == "system" and i > 0:
            raise ValueError(f"{where}: a system message may only come first")
        content = message.get("content")
        if not isinstance(content, (str, list)):
            raise ValueError(
                f"{where}: content must be a string or a list of parts, got {type(content).__name__}"
            )
        for j, part in enumerate(_parts(content)):
            _validate_part(f"{where}.content[{j}]", part, role)
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant turn: there is nothing to train on")


def count_images(messages: list[dict]) -> int:
    """Number of image parts in a (valid) conversation."""
    return sum(part["type"] == "image" for message in messages for part in _parts(message["content"]))


def _segments(messages: list[dict], image_token_counts: Sequence[int]) -> Iterator[tuple[str, bool]]:
    """The rendered conversation as (text, trainable) pieces, in order."""
    counts = iter(image_token_counts)
    if messages[0]["role"] != "system":
        yield f"{IM_START}system\n{DEFAULT_SYSTEM_MESSAGE}{IM_END}\n", False
    for message in messages:
        trainable = message["role"] == "assistant"
        yield f"{IM_START}{message['role']}\n", False
        for part in _parts(message["content"]):
            if part["type"] == "text":
                yield part["text"], trainable
            else:
                yield VISION_START + IMAGE_PAD * next(counts) + VISION_END, False
        yield IM_END, trainable
        yield "\n", False


def _check_image_token_counts(messages: list[dict], image_token_counts: Sequence[int]) -> None:
    num_images = count_images(messages)
    if len(image_token_counts) != num_images:
        raise ValueError(
            f"image count mismatch: the messages hold {num_images} image(s) but {len(image_token_counts)} "
            f"image token count(s) were given"
        )
    if any(not isinstance(n, (int, np.integer)) or n < 1 for n in image_token_counts):
        raise ValueError(f"image token counts must be positive integers, got {list(image_token_counts)}")


def render_conversation(messages: list[dict], image_token_counts: Sequence[int] = ()) -> str:
    """The conversation as the template's text (image blocks expanded to their token counts)."""
    validate_messages(messages)
    _check_image_token_counts(messages, image_token_counts)
    return "".join(text for text, _ in _segments(messages, image_token_counts))


def _merged_pieces(segments: Iterator[tuple[str, bool]]) -> list[tuple[str, bool]]:
    # Adjacent pieces with the same flag are tokenised together so that only mask changes split the text.
    pieces: list[tuple[str, bool]] = []
    for text, trainable in segments:
        if pieces and pieces[-1][1] == trainable:
            pieces[-1] = (pieces[-1][0] + text, trainable)
        else:
            pieces.append((text, trainable))
    return pieces


def tokenize_conversation(
    messages: list[dict], tokenizer: Tokenizer, image_token_counts: Sequence[int] = ()
) -> TokenizedSample:
    """Tokenises a conversation with the Qwen2-VL template and its SFT loss mask (see module docstring).

    Args:
        messages: the conversation (validated; ``ValueError`` names the problem).
        tokenizer: anything with ``encode(text) -> list[int]`` and ``token_id(str) -> int``.
        image_token_counts: one positive count per image part, in order of appearance.
    """
    validate_messages(messages)
    _check_image_token_counts(messages, image_token_counts)
    ids: list[int] = []
    mask: list[bool] = []
    for text, trainable in _merged_pieces(_segments(messages, image_token_counts)):
        piece = tokenizer.encode(text)
        ids.extend(piece)
        mask.extend([trainable] * len(piece))
    token_ids = np.asarray(ids, dtype=np.int32)
    # A literal "<|image_pad|>" typed in the text would become an image slot with no image behind it.
    found = int(np.count_nonzero(token_ids == tokenizer.token_id(IMAGE_PAD)))
    if found != sum(image_token_counts):
        raise ValueError(
            f"the conversation tokenises to {found} {IMAGE_PAD} tokens but its images need "
            f"{sum(image_token_counts)}: the text contains literal {IMAGE_PAD}"
        )
    loss_mask = np.asarray(mask, dtype=bool)
    return TokenizedSample(token_ids=token_ids, loss_mask=loss_mask, num_images=len(image_token_counts))
