"""Rule rewards (megatron_ovr.rl.reward): boxed-answer extraction, math-verify equivalence (every pair in the
tables was checked against math-verify 0.9.0), the ORZ truncation rule, multiple choice, and a time limit
that holds on answers sympy cannot finish. One shared math-verify worker for the whole module."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_ovr.rl.reward import (
    REWARDS, ExactMatchReward, MathVerifyReward, build_reward, extract_last_boxed,
)

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3.0
HANGS = "9^{9^{9^{9}}}"  # sympy evaluates the integer power: never finishes without a time limit


@pytest.fixture(scope="module")
def reward():
    with MathVerifyReward(timeout_s=TIMEOUT_S) as shared:
        yield shared


def boxed(answer: str) -> str:
    return f"Some reasoning first.\n\nThe answer is $\\boxed{{{answer}}}$."


# ------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),           # nested braces
        ("\\boxed{ \\{1, 2\\} }", "\\{1, 2\\}"),                           # escaped braces do not count
        ("first \\boxed{1}, then \\boxed{2}", "2"),                         # the last box wins
        ("\\fbox{7}", "7"),
        ("\\boxed 5", "5"),
        ("$\\boxed 5$.", "5"),                                              # a bare token stops at $
        ("\\boxed{x = \\boxed{3}}", "3"),                                   # the innermost box starts last
        ("no answer here", None),
        ("\\boxed{1} and then \\boxed{\\frac{1}{2}", None),                 # an unfinished last box is no answer
        ("\\boxed", None),
        ("\\boxedanswer{3}", None),                                          # another command, not a box
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


# ---------------------------------------------------------------------------------------- equivalence
EQUIVALENT = [  # (reference, boxed answer)
    ("\\frac{1}{2}", "0.5"),
    ("0.5", "\\frac12"),
    ("3/4", "\\dfrac{3}{4}"),
    ("$\\frac{3}{4}$", "0.75"),                 # a reference already in $...$
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("3", "x=3"),
    ("x=3", "3"),
    ("\\{1,2\\}", "\\{2,1\\}"),                 # sets
    ("\\{1, 2\\}", "2, 1"),                     # a bare list counts as a set
    ("(1, 2)", "(1,2)"),                        # open interval
    ("(-\\infty, 2]", "(-\\infty,2]"),
    ("x^2+2x+1", "(x+1)^2"),
    ("1000", "1,000"),
    ("10", "10.0"),
    ("1/3", "0.333333"),                        # floats compare rounded to 6 places
    ("50\\%", "0.5"),
    ("50\\%", "50"),                            # a percentage reference also accepts the bare number
    ("90^\\circ", "90"),                        # degrees are dropped, not converted
    ("5", "5\\text{ cm}"),                      # units are stripped
    ("\\$5", "5"),                              # an escaped dollar is an amount, not a math delimiter
    ("3+2i", "2i+3"),
    ("\\binom{5}{2}", "10"),
    ("\\frac{1}{2}", "\\sin(\\pi/6)"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("\\text{B}", "B"),
]

NOT_EQUIVALENT = [
    ("2", "3"),
    ("2", "-2"),
    ("3", "3.0001"),
    ("1/3", "0.333"),
    ("(1,2)", "[1,2]"),                         # open vs closed interval
    ("1,2", "1"),
    ("\\pi", "3.14159"),
    ("\\frac{\\pi}{2}", "90^\\circ"),           # math-verify does not convert degrees to radians
    ("\\frac{1}{2}", "\\sin 30^\\circ"),        # ... so this is sin(30 rad)
    ("1000", "1\\,000"),                        # a thin-space thousands separator is not understood
    ("5", "\\text{5 apples}"),
]


@pytest.mark.parametrize("reference, answer", EQUIVALENT)
def test_equivalent_answers_score_one(reward, reference, answer):
    assert reward(boxed(answer), reference) == 1.0


@pytest.mark.parametrize("reference, answer", NOT_EQUIVALENT)
def test_different_answers_score_zero(reward, reference, answer):
    assert reward(boxed(answer), reference) == 0.0


def test_score_batch_applies_every_rule(reward):
    responses = [boxed("\\frac{1}{2}"), boxed("\\frac{1}{2}"), "the answer is 1/2", "\\boxed{7} no, \\boxed{8}",
                 "\\boxed{8} no, \\boxed{7}", "\\boxed{\\frac{1}{2"]
    references = ["0.5", "0.5", "0.5", "7", "7", "1/2"]
    truncated = [False, True, False, False, False, False]
    # correct; correct but truncated (ORZ); no box; last box wrong; last box right; unfinished box
    assert reward.score_batch(responses, references, truncated) == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_score_batch_rejects_mismatched_lengths(reward):
    with pytest.raises(ValueError, match="2 responses, 1 references"):
        reward.score_batch(["a", "b"], ["a"], [False, False])


def test_reward_works_from_another_thread(reward):
    # math-verify's own signal-based limit raises there; the worker process does not care.
    scores = []
    thread = threading.Thread(target=lambda: scores.append(reward(boxed("2\\sqrt{2}"), "\\sqrt{8}")))
    thread.start()
    thread.join()
    assert scores == [1.0]


# ---------------------------------------------------------------------------------------------- timeout
def test_time_limit_holds_and_the_reward_stays_usable(reward, caplog):
    timeouts_before = reward.timeouts
    responses = [boxed("1"), boxed(HANGS), boxed("3"), boxed("5")]
    with caplog.at_level(logging.WARNING, logger="megatron_ovr.rl.reward"):
        started = time.monotonic()
        scores = reward.score_batch(responses, ["1", "5", "3", "4"], [False] * 4)
        elapsed = time.monotonic() - started

    # The answers after the hanging one are still scored, by a fresh worker.
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert elapsed < TIMEOUT_S + 5.0
    assert reward.timeouts == timeouts_before + 1
    assert [record.message for record in caplog.records if HANGS in record.message]
    assert reward(boxed("0.5"), "\\frac{1}{2}") == 1.0


def test_worker_dies_with_its_parent():
    # A trainer killed with -9 must not leave a worker spinning on an adversarial answer.
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "from megatron_ovr.rl.reward import MathVerifyReward\n"
         "reward = MathVerifyReward()\n"
         "reward(r'\\boxed{1}', '1')\n"  # the worker is up and serving
         "print(reward._worker.process.pid, flush=True)\n"
         "reward.score_batch([r'\\boxed{%s}'], ['5'], [False])\n" % HANGS],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    worker_pid = int(parent.stdout.readline())
    time.sleep(0.5)  # let it get stuck in the hanging answer
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10.0
    while _process_alive(worker_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _process_alive(worker_pid)


def _process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie nobody reaped (PID 1 of a container may not) counts as dead."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_worker_does_not_import_torch(reward):
    reward(boxed("1"), "1")
    maps = Path(f"/proc/{reward._worker.process.pid}/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc")
    assert "libtorch" not in maps.read_text()


# ------------------------------------------------------------------------------------- multiple choice
CHOICES = ["5", "\\frac{3}{4}", "12", "none of these"]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("B) \\frac{3}{4}", 1.0), ("\\text{B}", 1.0), ("\\text{(B) 3/4}", 1.0),
        ("0.75", 1.0),                          # the text of choice B, up to equivalence
        ("A", 0.0), ("(C)", 0.0), ("5", 0.0),   # another letter, another choice's text
        ("E", 0.0),                             # not one of the four letters: compared as math, and wrong
    ],
)
def test_multiple_choice(reward, answer, expected):
    assert reward.score_response(boxed(answer), "B", choices=CHOICES) == expected


def test_multiple_choice_rules_apply_only_with_choices_and_a_letter_reference(reward):
    assert reward.score_response(boxed("0.75"), "B") == 0.0  # no choices: nothing says B is 3/4
    assert reward.score_response(boxed("12"), "12", choices=CHOICES) == 1.0  # a non-letter reference
    assert reward.score_response(boxed("B"), "B", choices=CHOICES, truncated=True) == 0.0


# ------------------------------------------------------------------------------------------- registry
def test_registry_builds_by_name_and_lists_options_for_an_unknown_one():
    assert set(REWARDS) == {"math_verify", "exact_match"}
    with pytest.raises(ValueError, match=r"unknown reward 'nope'; choose one of \['exact_match', 'math_verify'\]"):
        build_reward("nope")
    with build_reward(timeout_s=1.5) as default_reward:
        assert isinstance(default_reward, MathVerifyReward) and default_reward.timeout_s == 1.5


def test_exact_match_reward():
    with build_reward("exact_match") as exact:
        assert isinstance(exact, ExactMatchReward)
        assert exact(boxed("x + 1"), "$x+1$") == 1.0
        assert exact(boxed("1 + x"), "x+1") == 0.0  # no math: that is math_verify's job
        assert exact(boxed("x+1"), "x+1", truncated=True) == 0.0
        assert exact.score_batch(["\\boxed{3}", "3"], ["3", "3"], [False, False]) == [1.0, 0.0]


def test_close_stops_the_worker_and_a_closed_reward_refuses_work():
    own = MathVerifyReward()
    process = own._worker.process
    own.close()
    own.close()  # idempotent
    assert process.poll() is not None
    with pytest.raises(RuntimeError, match="closed"):
        own(boxed("1"), "1")
