"""The math-verify worker process behind ``reward.MathVerifyReward``; run as a script, never imported.

It is started as ``python _reward_worker.py READ_FD WRITE_FD DIE_WITH_PARENT`` (a fresh interpreter, not a
fork and not a ``multiprocessing`` spawn: the latter would re-import the caller's ``__main__``, i.e. the
torchrun training script with torch and megatron). It imports math_verify and the standard library only.

Protocol over two ``multiprocessing.connection.Connection`` pipes: once warmed up it sends ``"ready"``;
then for each received list of ``(gold, prediction)`` string pairs it sends one bool per pair, as soon as
that pair is decided, so the parent can time every pair on its own. It exits when the read pipe closes.

math_verify's own time limit (``signal.alarm``) is turned off here: the parent enforces the limit by killing
this process, which also stops a computation stuck in C, where a Python signal handler would never run.
"""

from __future__ import annotations

import ctypes
import logging
import re
import signal
import sys
from functools import lru_cache
from multiprocessing.connection import Connection

from math_verify import parse, verify

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, so an orphan cannot spin on a hard answer forever.

    Linux sends it when the parent THREAD that started the worker exits, so the parent asks for it only
    from its main thread; a worker started elsewhere still ends at the closed pipe once idle.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the closed pipe still ends an idle worker
        pass


_MATH_DELIMITER = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")  # an unescaped $, \boxed, \( or \[


def _latex(text: str) -> str:
    """Give math_verify's LaTeX extractor a delimiter to anchor on unless the text already has one
    (an escaped dollar sign, ``\\$5``, is an amount, not a delimiter)."""
    return text if _MATH_DELIMITER.search(text) else f"${text}$"


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> list:
    # Cached: a reference is scored against all of its prompt's samples (16 per prompt in the recipe).
    return parse(_latex(gold), parsing_timeout=None)


def equivalent(gold: str, prediction: str) -> bool:
    """Whether ``prediction`` (a boxed answer's content) is mathematically equivalent to ``gold``."""
    try:
        parsed_prediction = parse(f"\\boxed{{{prediction}}}", parsing_timeout=None)
        return bool(verify(_parse_gold(gold), parsed_prediction, timeout_seconds=None))
    except Exception:  # an answer that breaks the parser or sympy is simply not a correct answer
        return False


def serve(requests: Connection, replies: Connection) -> None:
    equivalent("1", "1")  # pay math_verify's lazy imports and regex compilation before the clock starts
    replies.send("ready")
    while True:
        try:
            pairs = requests.recv()
        except EOFError:
            return
        for gold, prediction in pairs:
            replies.send(equivalent(gold, prediction))


def main() -> None:
    read_fd, write_fd, die_with_parent = (int(arg) for arg in sys.argv[1:4])
    if die_with_parent:
        _die_with_parent()
    # The parent alone decides when this worker ends (closed pipe, kill): a Ctrl-C or a preemption SIGTERM
    # sent to the whole process group must not kill it while the trainer finishes scoring and saves.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Every pair runs without math_verify's alarm (see the module docstring); its "timeout is disabled"
    # warning is therefore expected and only noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    serve(Connection(read_fd, writable=False), Connection(write_fd, readable=False))


if __name__ == "__main__":
    main()
