"""The Qwen2-VL chat template as code: rendered text equal to the Jinja template through transformers,
token ids equal to tokenising the whole string, exact loss-mask boundaries, image blocks, validation."""

import numpy as np
import pytest

from megatron_ovr.data import load_tokenizer, qwen_tokenizer_dir, render_conversation, tokenize_conversation

# Qwen2-VL's template (its tokenizer_config.json, without the video and "Picture n:" options): one
# <|image_pad|> per image, which the HF processor expands to the image's token count.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
)

IMAGE_PAD, IM_END = 151655, 151645

CASES = {
    "single_turn": ([{"role": "user", "content": "What is 2 + 3?"},
                     {"role": "assistant",
                      "content": "<think>\n2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}."}], ()),
    "own_system": ([{"role": "system", "content": "Reason step by step."},
                    {"role": "user", "content": "Hi!"},
                    {"role": "assistant", "content": "Hello. How can I help?"}], ()),
    "multi_turn": ([{"role": "user", "content": "Name a prime."},
                    {"role": "assistant", "content": "7"},
                    {"role": "user", "content": "  Another one, please?\n"},
                    {"role": "assistant", "content": " 11, and also 13.  "},
                    {"role": "user", "content": "Thanks"}], ()),
    "split_text": ([{"role": "user", "content": [{"type": "text", "text": "\n\nmulti"},
                                                 {"type": "text", "text": "part question"}]},
                    {"role": "assistant", "content": "ok"}], ()),
    "unicode": ([{"role": "user", "content": "Übersetze: 数学は楽しい 🙂"},
                 {"role": "assistant", "content": "Mathematik macht Spaß."}], ()),
    "images": ([{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                             {"type": "text", "text": "and"},
                                             {"type": "image", "image": "b.png"},
                                             {"type": "text", "text": " which is larger?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "The first."}]}], (3, 2)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(qwen_tokenizer_dir())


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


def assistant_texts(messages):
    return ["".join(p["text"] for p in m["content"]) if isinstance(m["content"], list) else m["content"]
            for m in messages if m["role"] == "assistant"]


def masked_runs(sample):
    """Token ids of each maximal run of loss-mask True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], sample.loss_mask.astype(int), [0]])))
    return [sample.token_ids[a:b] for a, b in zip(edges[::2], edges[1::2])]


def test_render_literal():
    messages, _ = CASES["single_turn"]
    assert render_conversation(messages) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n2 + 3 = 5.\n</think>\n\nThe answer is \\boxed{5}.<|im_end|>\n"
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_render_equals_the_jinja_template(hf_tokenizer, case):
    messages, counts = CASES[case]
    hf_text = hf_tokenizer.apply_chat_template(messages, chat_template=QWEN2_VL_TEMPLATE, tokenize=False)
    for n in counts:  # what the HF processor does with each image's single placeholder
        hf_text = hf_text.replace("<|vision_start|><|image_pad|><|vision_end|>",
                                  "<|vision_start|>" + "<|IMG|>" * n + "<|vision_end|>", 1)
    assert render_conversation(messages, counts) == hf_text.replace("<|IMG|>", "<|image_pad|>")


@pytest.mark.parametrize("case", sorted(CASES))
def test_ids_equal_tokenising_the_whole_string(tokenizer, hf_tokenizer, case):
    messages, counts = CASES[case]
    sample = tokenize_conversation(messages, tokenizer, counts)
    text = render_conversation(messages, counts)
    assert sample.token_ids.dtype == np.int32 and sample.loss_mask.dtype == bool
    assert sample.token_ids.tolist() == tokenizer.encode(text)
    assert sample.token_ids.tolist() == hf_tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_mask_is_exactly_the_assistant_contents(tokenizer, case):
    messages, counts = CASES[case]
    sample = tokenize_conversation(messages, tokenizer, counts)
    runs = masked_runs(sample)
    assert [tokenizer.decode(run) for run in runs] == [text + "<|im_end|>" for text in assistant_texts(messages)]
    assert all(run[-1] == IM_END for run in runs)
    # Outside the runs: the header ends in "\n" just before, and the "\n" just after is not trained.
    starts = np.flatnonzero(np.diff(sample.loss_mask.astype(int)) == 1) + 1
    assert [tokenizer.decode(sample.token_ids[s - 3 : s]) for s in starts] == ["<|im_start|>assistant\n"] * len(runs)
    ends = np.flatnonzero(np.diff(sample.loss_mask.astype(int)) == -1) + 1
    assert all(tokenizer.decode(sample.token_ids[e : e + 1]) == "\n" for e in ends)


def test_content_starting_with_a_newline_keeps_the_inference_split(tokenizer):
    """The one documented difference from whole-string tokenisation: the prompt's trailing "\\n" and a
    leading "\\n\\n" of the content stay separate tokens, as at inference (prompt, then generated text)."""
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "\n\nA"}]
    sample = tokenize_conversation(messages, tokenizer)
    whole = tokenizer.encode(render_conversation(messages))
    assert sample.token_ids.tolist() != whole
    prompt = render_conversation(messages).split("\n\nA<|im_end|>")[0]
    assert prompt.endswith("<|im_start|>assistant\n")
    expected = tokenizer.encode(prompt) + tokenizer.encode("\n\nA") + [IM_END] + tokenizer.encode("\n")
    assert sample.token_ids.tolist() == expected
    assert [tokenizer.decode(run) for run in masked_runs(sample)] == ["\n\nA<|im_end|>"]


def test_image_blocks(tokenizer):
    messages, counts = CASES["images"]
    sample = tokenize_conversation(messages, tokenizer, counts)
    ids = sample.token_ids.tolist()
    assert sample.num_images == 2
    first = ids.index(151652)
    assert ids[first : first + 5] == [151652, IMAGE_PAD, IMAGE_PAD, IMAGE_PAD, 151653]
    second = ids.index(151652, first + 1)
    assert ids[second : second + 4] == [151652, IMAGE_PAD, IMAGE_PAD, 151653]
    assert ids.count(IMAGE_PAD) == 5
    assert not sample.loss_mask[sample.token_ids == IMAGE_PAD].any()


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


IMAGE = [{"type": "image"}]


@pytest.mark.parametrize("messages, counts, error", [
    ([], (), "empty conversation"),
    ("hello", (), "must be a list"),
    ([{"role": "bot", "content": "x"}, assistant("y")], (), r"messages\[0\]: unknown role 'bot'"),
    ([user("x")], (), "no assistant turn"),
    ([user(3), assistant("y")], (), r"messages\[0\]: content must be"),
    ([user("x"), {"role": "system", "content": "s"}, assistant("y")], (), "system message may only come first"),
    ([user("x"), assistant(IMAGE)], (1,), "only allowed in user messages"),
    ([user(IMAGE), assistant("y")], (), "image count mismatch"),
    ([user("x"), assistant("y")], (4,), "image count mismatch"),
    ([user(IMAGE), assistant("y")], (0,), "positive integers"),
    ([user("see <|image_pad|>"), assistant("y")], (), "literal <|image_pad|>"),
])
def test_invalid_conversations(tokenizer, messages, counts, error):
    with pytest.raises(ValueError, match=error):
        tokenize_conversation(messages, tokenizer, counts)
