"""Synthetic reasoning data: deterministic, valid conversations, correct arithmetic in the R1 format, short."""

import re

import pytest

from megatron_ovr.data import (
    ConversationReader,
    generate_conversations,
    load_tokenizer,
    qwen_tokenizer_dir,
    tokenize_conversation,
    validate_messages,
    write_synthetic_jsonl,
)

REPLY = re.compile(r"<think>\n((?:.+\n)+)</think>\n\nThe answer is \\boxed\{(-?\d+)\}\.")
STEP = re.compile(r"(?:First, |Then, )?(\d+) ([-+*]) (\d+) = (-?\d+)\.")
EXPRESSION = re.compile(r"(?:What is |Compute |Calculate )(.+?)(?:\?| step by step\.|\.)$")


def test_deterministic_and_seeded():
    assert generate_conversations(50, seed=3) == generate_conversations(50, seed=3)
    assert generate_conversations(50, seed=3) != generate_conversations(50, seed=4)
    assert generate_conversations(80, seed=3)[:50] == generate_conversations(50, seed=3)


def test_answers_and_traces_are_correct():
    conversations = generate_conversations(300, seed=0)
    kinds = set()
    for conversation in conversations:
        validate_messages(conversation["messages"])
        question, reply = (m["content"] for m in conversation["messages"])
        expression = EXPRESSION.fullmatch(question).group(1)
        match = REPLY.fullmatch(reply)
        assert match, reply
        steps = match.group(1).splitlines()
        for step in steps:
            a, op, b, result = STEP.fullmatch(step).groups()
            assert int(result) == eval(f"{a} {op} {b}")
        assert int(match.group(2)) == eval(expression) == int(STEP.fullmatch(steps[-1]).group(4))
        kinds.add((len(steps), expression[0] == "(", "-" in expression))
    assert kinds == {(1, False, False), (1, False, True), (2, True, False)}


def test_short_enough_for_a_tiny_model():
    tokenizer = load_tokenizer(qwen_tokenizer_dir())
    lengths = [tokenize_conversation(c["messages"], tokenizer).token_ids.size for c in generate_conversations(200, 1)]
    assert max(lengths) <= 96


def test_jsonl_writer_round_trip(tmp_path):
    path = write_synthetic_jsonl(tmp_path / "syn.jsonl", 20, seed=5)
    reader = ConversationReader([path], strict=True)
    assert [{"messages": c.messages} for c in reader] == generate_conversations(20, seed=5)


def test_negative_count():
    with pytest.raises(ValueError, match="n=-1"):
        generate_conversations(-1, seed=0)


COUNTING = re.compile(r"(?:There are|A picture shows) (\d+) .*")


def test_counting_share_and_system_prompt():
    from megatron_ovr.data.prompts import SYSTEM_PROMPT

    plain = generate_conversations(200, seed=2)
    mixed = generate_conversations(200, seed=2, system_prompt=SYSTEM_PROMPT, counting_share=0.3)
    assert all(c["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT} for c in mixed)
    counting = [c for c in mixed if "How many" in c["messages"][1]["content"]]
    assert 40 <= len(counting) <= 80  # 30% of 200, give or take the draw
    for conversation in counting:
        validate_messages(conversation["messages"])
        match = REPLY.fullmatch(conversation["messages"][2]["content"])
        a, op, b, result = STEP.fullmatch(match.group(1).strip()).groups()
        assert int(result) == eval(f"{a} {op} {b}") == int(match.group(2)) and 1 <= int(result) <= 8
    assert not any("How many" in c["messages"][0]["content"] for c in plain)  # share 0: arithmetic only
    with pytest.raises(ValueError, match="counting_share=1.5"):
        generate_conversations(3, seed=0, counting_share=1.5)
