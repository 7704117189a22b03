r"""The recipe's question prompt, in ONE place: PPO rollouts and evaluation both call :func:`build_prompt`.

Contract
--------
``build_prompt(question, num_images, choices)`` returns the chat-formatted prompt text the rollout engine
takes: the Qwen2-VL template (rendered by :func:`megatron_ovr.data.chat.render_conversation`, so it is the
SFT template byte for byte) with :data:`SYSTEM_PROMPT`, then a user turn holding one
``<|vision_start|><|image_pad|><|vision_end|>`` per image (a single ``<|image_pad|>``: the engine's processor
expands it to the image's token count) followed by the question, and ending in the assistant header
``<|im_start|>assistant\n``.

``choices`` selects the answer format:

- ``None``: free-form; the final answer goes in ``\boxed{}``.
- a non-empty sequence: multiple choice; the options are listed as ``(A) ...``, ``(B) ...`` and the model is
  asked to box the option letter.
- an empty sequence: multiple choice whose options are already in the question text or in the image (as in
  MathVerse); only the instruction to box the letter is added.
"""

from __future__ import annotations

import string
from typing import Sequence

from .chat import IM_END, render_conversation

__all__ = ["OPTION_LETTERS", "SYSTEM_PROMPT", "build_prompt", "format_choices", "question_messages"]

SYSTEM_PROMPT = (
    "You are a helpful assistant. The user asks a question and you solve it. First think through the "
    "reasoning process step by step inside <think> </think> tags, then give the final answer enclosed in "
    "\\boxed{}."
)
OPTION_LETTERS = string.ascii_uppercase
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the letter of the correct option, e.g. \\boxed{A}."


def format_choices(choices: Sequence[str]) -> str:
    """``(A) first\n(B) second ...``: how options are shown to the model."""
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"{len(choices)} choices: at most {len(OPTION_LETTERS)} options can be lettered")
    return "\n".join(f"({letter}) {choice}" for letter, choice in zip(OPTION_LETTERS, choices))


def _user_text(question: str, choices: Sequence[str] | None) -> str:
    if choices is None:
        return question
    if len(choices) == 0:
        return f"{question}\n\n{MULTIPLE_CHOICE_INSTRUCTION}"
    return f"{question}\n\nChoices:\n{format_choices(choices)}\n\n{MULTIPLE_CHOICE_INSTRUCTION}"


def question_messages(question: str, num_images: int, choices: Sequence[str] | None = None) -> list[dict]:
    """The system and user messages of one question (images first): what :func:`build_prompt` renders, and
    the start of an SFT conversation that trains on the same prompt."""
    if num_images < 0:
        raise ValueError(f"num_images={num_images}: must be >= 0")
    content = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": _user_text(question, choices)})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def build_prompt(question: str, num_images: int, choices: Sequence[str] | None = None) -> str:
    """The chat-formatted prompt for one question, ending in the assistant header (see module docstring)."""
    # The template only renders whole conversations (it validates an assistant turn exists): render one
    # with an empty reply and cut that reply's closing tag, leaving the open assistant header.
    closing = f"{IM_END}\n"
    rendered = render_conversation(
        [*question_messages(question, num_images, choices), {"role": "assistant", "content": ""}],
        image_token_counts=[1] * num_images,
    )
    return rendered[: -len(closing)]
