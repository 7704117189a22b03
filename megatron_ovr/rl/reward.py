"""Rule rewards: 1.0 iff the response's last ``\\boxed{}`` answer is correct (DESIGN.md §4), pluggable by name.

``build_reward(name)`` returns a :class:`RewardFunction` from ``REWARDS``:

- ``"math_verify"`` (:class:`MathVerifyReward`, the recipe's): mathematical equivalence per HuggingFace
  math-verify, 0.0 for a truncated response (the Open-Reasoner-Zero rule). math-verify/sympy can run for
  ever on adversarial answers (``9^{9^{9^{9}}}``) and its own ``signal.alarm`` limit works only in a main
  thread, so every comparison runs in one long-lived worker process (``_reward_worker.py``) under a
  per-answer wall-clock limit enforced by killing and restarting that worker.
- ``"exact_match"`` (:class:`ExactMatchReward`): the boxed answer equals the reference as a string.

Unlike math-verify itself, a :class:`MathVerifyReward` may be called from any thread (the PPO driver runs
under torchrun with helper threads): calls share its worker under a lock.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
import time
import weakref
from abc import ABC, abstractmethod
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

logger = logging.getLogger(__name__)

__all__ = [
    "REWARDS", "ExactMatchReward", "MathVerifyReward", "RewardFunction", "build_reward", "extract_last_boxed",
]

_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, stripped; None if there is none.

    Braces nest (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``) and escaped braces ``\\{ \\}`` do not count,
    so sets survive. ``\\boxed 5`` (a space, then one token) gives the token up to whitespace or ``$``. When the
    last box is unbalanced (typically a response cut off mid-answer) the result is None, not an earlier box:
    an answer the model did not finish is no answer.
    """
    commands = list(_BOX_COMMAND.finditer(text))
    if not commands:
        return None
    start = commands[-1].end()
    if text.startswith("{", start):
        return _braced_content(text, start)
    token = re.match(r"\s+([^\s$]+)", text[start:])
    return token.group(1) if token else None


def _braced_content(text: str, open_brace: int) -> str | None:
    depth = 0
    position = open_brace
    while position < len(text):
        char = text[position]
        if char == "\\":
            position += 2  # an escaped character, \{ and \} included, never opens or closes a group
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_brace + 1:position].strip()
        position += 1
    return None


_Reward = TypeVar("_Reward", bound="RewardFunction")


class RewardFunction(ABC):
    """Scores responses against reference answers; the PPO driver and the evaluation harness use only this.
    Single calls go through ``score_batch``; a ``with`` block closes the reward."""

    def __call__(self, response: str, reference: str, *, truncated: bool = False) -> float:
        return self.score_batch([response], [reference], [truncated])[0]

    @abstractmethod
    def score_batch(
        self,
        responses: Sequence[str],
        references: Sequence[str],
        truncated: Sequence[bool],
        choices: Sequence[Sequence[str] | None] | None = None,
    ) -> list[float]:
        """One score per response; the way to score a rollout (implementations amortise their overheads).
        ``choices[i]`` (optional) are the options of a multiple-choice question whose reference is a letter."""

    def close(self) -> None:
        """Release whatever the reward holds (worker processes); idempotent."""

    def __enter__(self: _Reward) -> _Reward:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _check_batch(
    responses: Sequence[str], references: Sequence[str], truncated: Sequence[bool], choices: Sequence[Any] | None = None
) -> None:
    columns = {"references": references, "truncation flags": truncated, "choice lists": choices}
    if any(column is not None and len(column) != len(responses) for column in columns.values()):
        counts = ", ".join(f"{len(column)} {name}" for name, column in columns.items() if column is not None)
        raise ValueError(f"score_batch needs one of each per response, got {len(responses)} responses, {counts}")


class ExactMatchReward(RewardFunction):
    """1.0 iff the last boxed answer equals the reference up to whitespace and ``$`` delimiters.

    A baseline that needs no worker; it also keeps the registry honest about being pluggable. A
    multiple-choice reference is its letter, so ``choices`` change nothing here.
    """

    def score_batch(
        self,
        responses: Sequence[str],
        references: Sequence[str],
        truncated: Sequence[bool],
        choices: Sequence[Sequence[str] | None] | None = None,
    ) -> list[float]:
        _check_batch(responses, references, truncated, choices)
        scores = []
        for response, reference, cut in zip(responses, references, truncated):
            answer = None if cut else extract_last_boxed(response)
            scores.append(float(answer is not None and _squash(answer) == _squash(reference)))
        return scores


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text.strip().strip("$"))


_WORKER_SCRIPT = Path(__file__).with_name("_reward_worker.py")
_WORKER_START_TIMEOUT_S = 120.0  # import + warm-up of sympy on a loaded machine; not part of any answer's limit
_LETTER_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_LEADING_LETTER = re.compile(r"\(?([A-Z])(?:\)|\.|:|\s|$)")


class _VerifyWorker:
    """One ``_reward_worker.py`` process and its pipes. Killed (SIGKILL) rather than asked to stop when it
    must die mid-computation; ``weakref.finalize`` kills it even if nobody calls ``close``."""

    def __init__(self) -> None:
        started_by_main_thread = threading.current_thread() is threading.main_thread()
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, str(_WORKER_SCRIPT), str(child_read), str(child_write), str(int(started_by_main_thread))],
            pass_fds=(child_read, child_write), stdin=subprocess.DEVNULL,
        )
        os.close(child_read)
        os.close(child_write)
        self.requests = Connection(parent_write, readable=False)
        self.replies = Connection(parent_read, writable=False)
        self.ready = False
        self._finalizer = weakref.finalize(self, _kill, self.process, self.requests, self.replies)

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.replies.poll(_WORKER_START_TIMEOUT_S):
            raise RuntimeError(f"the math-verify worker did not start within {_WORKER_START_TIMEOUT_S:.0f} s")
        try:
            message = self.replies.recv()
        except EOFError:
            raise RuntimeError(
                f"the math-verify worker exited while starting (exit code {self.process.wait()}); see its stderr"
            ) from None
        if message != "ready":
            raise RuntimeError(f"the math-verify worker sent {message!r} instead of 'ready'")
        self.ready = True

    def kill(self) -> None:
        self._finalizer()


def _kill(process: subprocess.Popen, *connections: Connection) -> None:
    for connection in connections:
        connection.close()
    process.kill()
    process.wait()


class MathVerifyReward(RewardFunction):
    """The OVR/ORZ correctness reward: 1.0 iff the last boxed answer is mathematically equivalent to the
    reference per math-verify, 0.0 if the response was truncated or has no (balanced) boxed answer.

    Args:
        timeout_s: wall-clock limit per answer. A comparison that runs longer scores 0.0, is logged, and its
            worker is killed and restarted (the restart's start-up is not charged to the next answer).

    The worker starts in the constructor (its imports overlap the caller's set-up) and is reused by every
    call; ``close()`` or a ``with`` block ends it.
    """

    def __init__(self, timeout_s: float = 5.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"MathVerifyReward: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.timeouts = 0  # answers that ran out of time or crashed the worker, for the driver's metrics
        self._lock = threading.Lock()
        self._worker: _VerifyWorker | None = _VerifyWorker()

    def score_batch(
        self,
        responses: Sequence[str],
        references: Sequence[str],
        truncated: Sequence[bool],
        choices: Sequence[Sequence[str] | None] | None = None,
    ) -> list[float]:
        """One score per response. ``choices[i]``, when given and not None, makes response ``i`` a
        multiple-choice question (see :meth:`score_response`)."""
        _check_batch(responses, references, truncated, choices)
        scores = [0.0] * len(responses)
        pending: list[tuple[int, str, str]] = []  # (response index, gold, prediction) left to math-verify
        for index, (response, reference, cut) in enumerate(zip(responses, references, truncated)):
            answer = None if cut else extract_last_boxed(response)
            if answer is None:
                continue
            options = choices[index] if choices is not None else None
            letter = _choice_letter(reference, options)
            if letter is None:
                pending.append((index, reference, answer))
                continue
            answer_letter = _choice_letter(answer, options, leading=True)
            if answer_letter is not None:
                scores[index] = float(answer_letter == letter)
            else:
                pending.append((index, options[ord(letter) - ord("A")], answer))
        for (index, _, _), is_equivalent in zip(pending, self._verify([(gold, answer) for _, gold, answer in pending])):
            scores[index] = float(is_equivalent)
        return scores

    def score_response(
        self, response: str, reference: str, *, choices: Sequence[str] | None = None, truncated: bool = False
    ) -> float:
        """Score one response; with ``choices`` and a letter reference (``"B"``), a multiple-choice question.

        The boxed answer then counts as correct if it names that letter (``B``, ``(B)``, ``B.``, ``B) text``,
        ``\\text{B}``) or, when it names no letter, if it is equivalent to the text of that choice. A reference
        that is not a letter of the given choices is scored as a plain answer.
        """
        return self.score_batch([response], [reference], [truncated], [choices])[0]

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.kill()
                self._worker = None

    def _verify(self, pairs: list[tuple[str, str]]) -> list[bool]:
        """Equivalence of each (gold, prediction) pair, every pair under its own ``timeout_s``."""
        results: list[bool] = []
        with self._lock:
            while len(results) < len(pairs):
                worker = self._running_worker()
                worker.requests.send(pairs[len(results):])
                results.extend(self._collect(worker, pairs[len(results):]))
        return results

    def _running_worker(self) -> _VerifyWorker:
        if self._worker is None:
            raise RuntimeError("MathVerifyReward is closed")
        self._worker.wait_ready()
        return self._worker

    def _collect(self, worker: _VerifyWorker, pairs: list[tuple[str, str]]) -> list[bool]:
        """Replies for ``pairs`` in order, up to and including the first one that times out (scored False;
        the worker is then replaced and the caller resends the rest)."""
        results: list[bool] = []
        for gold, answer in pairs:
            started = time.monotonic()
            if worker.replies.poll(self.timeout_s):
                try:
                    results.append(bool(worker.replies.recv()))
                    continue
                except EOFError:
                    failure = f"the math-verify worker died (exit code {worker.process.poll()})"
            else:
                failure = f"math-verify ran out of its {self.timeout_s:g} s limit"
            self.timeouts += 1
            logger.warning(
                "%s after %.1f s on answer %s (reference %s); scored 0.0, restarting the worker",
                failure, time.monotonic() - started, _preview(answer), _preview(gold),
            )
            worker.kill()
            self._worker = _VerifyWorker()
            results.append(False)
            return results
        return results


def _choice_letter(text: str, choices: Sequence[str] | None, *, leading: bool = False) -> str | None:
    """The upper-case letter ``text`` names among ``choices`` (``B``, ``(B)``, ``\\text{B}``; with ``leading``
    also ``B.``, ``B) text``, ``B: text``), or None when there are no choices or it names none of them."""
    if not choices:
        return None
    text = _LETTER_WRAPPERS.sub(r"\1", text).strip()
    match = _LEADING_LETTER.match(text) if leading else re.fullmatch(r"\(?([A-Z])\)?", text)
    if match is None:
        return None
    letter = match.group(1)
    return letter if ord(letter) - ord("A") < len(choices) else None


def _preview(text: str, limit: int = 80) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}...({len(text)} chars)"


REWARDS: dict[str, Callable[..., RewardFunction]] = {
    "math_verify": MathVerifyReward,
    "exact_match": ExactMatchReward,
}


def build_reward(name: str = "math_verify", **kwargs: Any) -> RewardFunction:
    """The reward registered as ``name`` in ``REWARDS``, built with ``kwargs``."""
    try:
        factory = REWARDS[name]
    except KeyError:
        raise ValueError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}") from None
    return factory(**kwargs)
