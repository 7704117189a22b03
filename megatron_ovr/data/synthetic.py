r"""Deterministic synthetic R1-style reasoning conversations for the tiny demo and tests.

Contract
--------
``generate_conversations(n, seed)`` returns ``n`` conversations ``{"messages": [user, assistant]}``; the same
``(n, seed)`` always gives the same list, and a longer list extends a shorter one with the same seed. Each
is a small arithmetic word problem (one step, ``a + b`` / ``a - b``, or two steps, ``(a + b) * c``) answered
in the cold-start format::

    <think>
    First, 3 + 4 = 7.
    Then, 7 * 5 = 35.
    </think>

    The answer is \boxed{35}.

``system_prompt`` (keyword, default ``None``) puts a system message first in every conversation; with the
recipe's :data:`megatron_ovr.data.prompts.SYSTEM_PROMPT` the cold start trains exactly the prompt that PPO
rollouts and evaluation use (``build_prompt``), so the cold-started model answers them in this format. Without
it the chat template's default system message applies.

``counting_share`` (keyword, default 0) makes that share of the problems counting word problems with small
numbers, answered the same way (``2 + 1 = 3.``), e.g. "There are 2 red squares on the left and 1 on the right.
How many red squares are there?" (answers 1-8). They are still language only; they give the cold-started
model the habit of answering a "How many ...?" question with a small count, which is what lets PPO on the
drawn counting images (answers 1-4) find rewarded samples from its first iterations. With the defaults the
conversations are exactly the arithmetic ones above (the same random stream).

``random_arithmetic_problem(rng)`` draws one arithmetic problem (the RL text prompts of
:mod:`.synthetic_visual` use it).

The traces are short and templated and the numbers small, so a tiny model learns the format (and much of
the arithmetic) within a few hundred steps: the SFT loss falls visibly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .sources import write_jsonl

__all__ = [
    "ArithmeticProblem", "generate_conversations", "random_arithmetic_problem", "random_counting_problem",
    "write_synthetic_jsonl",
]

_QUESTIONS = ("What is {expr}?", "Compute {expr}.", "Calculate {expr} step by step.")


def _one_step(rng: random.Random) -> tuple[str, list[str], int]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    if rng.random() < 0.5:
        return f"{a} + {b}", [f"{a} + {b} = {a + b}."], a + b
    a, b = max(a, b), min(a, b)  # keep results non-negative
    return f"{a} - {b}", [f"{a} - {b} = {a - b}."], a - b


def _two_steps(rng: random.Random) -> tuple[str, list[str], int]:
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(2, 5)
    total = a + b
    return f"({a} + {b}) * {c}", [f"First, {a} + {b} = {total}.", f"Then, {total} * {c} = {total * c}."], total * c


@dataclass(frozen=True)
class ArithmeticProblem:
    """One word problem: ``expression`` identifies it (the wording of ``question`` varies), ``steps`` are the
    reasoning trace's lines and ``answer`` the result."""

    expression: str
    question: str
    steps: tuple[str, ...]
    answer: int


def random_arithmetic_problem(rng: random.Random) -> ArithmeticProblem:
    """One problem drawn from ``rng``: the SFT conversations' and the RL text prompts' shared distribution."""
    expr, steps, answer = (_one_step if rng.random() < 0.5 else _two_steps)(rng)
    return ArithmeticProblem(expr, rng.choice(_QUESTIONS).format(expr=expr), tuple(steps), answer)


_COUNTED = ("red squares", "blue squares", "green squares", "red circles")
_COUNTING_QUESTIONS = (
    ("There are {a} {things} on the left and {b} on the right. How many {things} are there?", "+"),
    ("A picture shows {a} {things}, then {b} more are drawn. How many {things} are in the picture?", "+"),
    ("There are {a} {things} and {b} of them are erased. How many {things} are left?", "-"),
)


def random_counting_problem(rng: random.Random) -> ArithmeticProblem:
    """A counting word problem: small numbers added (``1-4 + 1-4``) or taken away (a count of 2-9 minus a
    smaller one), so every answer is 1-8."""
    template, op = rng.choice(_COUNTING_QUESTIONS)
    things = rng.choice(_COUNTED)
    if op == "+":
        a, b = rng.randint(1, 4), rng.randint(1, 4)
        answer = a + b
    else:
        a = rng.randint(2, 9)
        b = rng.randint(1, a - 1)
        answer = a - b
    expr = f"{a} {op} {b}"
    return ArithmeticProblem(expr, template.format(a=a, b=b, things=things), (f"{expr} = {answer}.",), answer)


def _conversation(rng: random.Random, system_prompt: str | None, counting_share: float) -> dict:
    # No draw for the choice at share 0: the default stream stays the arithmetic-only one.
    counting = counting_share > 0 and rng.random() < counting_share
    problem = (random_counting_problem if counting else random_arithmetic_problem)(rng)
    trace = "\n".join(problem.steps)
    reply = f"<think>\n{trace}\n</think>\n\nThe answer is \\boxed{{{problem.answer}}}."
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return {"messages": [*system, {"role": "user", "content": problem.question},
                         {"role": "assistant", "content": reply}]}


def generate_conversations(n: int, seed: int, *, system_prompt: str | None = None,
                           counting_share: float = 0.0) -> list[dict]:
    """``n`` synthetic reasoning conversations, deterministic in ``seed``; ``system_prompt`` opens each one
    and ``counting_share`` of them are counting word problems (see module docstring)."""
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    if not 0.0 <= counting_share <= 1.0:
        raise ValueError(f"counting_share={counting_share}: must be in [0, 1]")
    rng = random.Random(seed)
    return [_conversation(rng, system_prompt, counting_share) for _ in range(n)]


def write_synthetic_jsonl(path: str | Path, n: int, seed: int, *, system_prompt: str | None = None,
                          counting_share: float = 0.0) -> Path:
    """Writes ``generate_conversations(n, seed, ...)`` as JSONL (one ``{"messages": ...}`` per line)."""
    return write_jsonl(generate_conversations(n, seed, system_prompt=system_prompt, counting_share=counting_share),
                       path)
