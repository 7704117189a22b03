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

``random_arithmetic_problem(rng)`` draws one problem of the same distribution (the RL text prompts of
:mod:`.synthetic_visual` use it).

The traces are short and templated and the numbers small, so a tiny model learns the format (and much of
the arithmetic) within a few hundred steps: the SFT loss falls visibly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .sources import write_jsonl

__all__ = ["ArithmeticProblem", "generate_conversations", "random_arithmetic_problem", "write_synthetic_jsonl"]

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


def _conversation(rng: random.Random) -> dict:
    problem = random_arithmetic_problem(rng)
    trace = "\n".join(problem.steps)
    reply = f"<think>\n{trace}\n</think>\n\nThe answer is \\boxed{{{problem.answer}}}."
    return {"messages": [{"role": "user", "content": problem.question}, {"role": "assistant", "content": reply}]}


def generate_conversations(n: int, seed: int) -> list[dict]:
    """``n`` synthetic reasoning conversations, deterministic in ``seed`` (see module docstring)."""
    if n < 0:
        raise ValueError(f"n={n}: must be >= 0")
    rng = random.Random(seed)
    return [_conversation(rng) for _ in range(n)]


def write_synthetic_jsonl(path: str | Path, n: int, seed: int) -> Path:
    """Writes ``generate_conversations(n, seed)`` as JSONL (one ``{"messages": ...}`` per line)."""
    return write_jsonl(generate_conversations(n, seed), path)
