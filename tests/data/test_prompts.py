import collections

import pytest

from sdpo_fast.data import (
    DEFAULT_HINDSIGHT_TEMPLATE,
    Interaction,
    SkipInteraction,
    encode_interaction,
    encode_interactions,
)
from sdpo_fast.data.prompts import AUTHORS_CODE_HINDSIGHT_TEMPLATE
from sdpo_fast.testing import tiny_tokenizer

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TABLE1 = "The following is a future user message. Use this to guide your answer to the user prompt:"


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def chatml(messages, empty_think=True):
    """Qwen3-like prompt text written by hand (independent of the Jinja template)."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if empty_think else "")


def llama3(messages):
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages
    )
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def with_hindsight(messages, followup):
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    out = [dict(m) for m in messages]
    out[last]["content"] += "\n\n<hindsight context> " + TABLE1 + " " + followup
    return out


HISTORY = [
    SYSTEM,
    {"role": "user", "content": "Write an email to my manager."},
    {"role": "assistant", "content": "Hey boss, can I take Friday off?"},
    {"role": "user", "content": "Now make it shorter."},
]
ITEM = Interaction(HISTORY, "Friday off? Thanks!", "Make it more formal and remove the emojis.")


def test_default_template_follows_paper_table1():
    assert "{followup}" in DEFAULT_HINDSIGHT_TEMPLATE
    assert TABLE1 in DEFAULT_HINDSIGHT_TEMPLATE
    assert "{followup}" in AUTHORS_CODE_HINDSIGHT_TEMPLATE


@pytest.mark.parametrize("kind,render", [("qwen3", chatml), ("plain", llama3)])
def test_student_and_teacher_ids_match_hand_rendered_prompts(kind, render):
    tok = tiny_tokenizer(kind)
    eot = tok.convert_tokens_to_ids("<|im_end|>" if kind == "qwen3" else "<|eot_id|>")
    enc = encode_interaction(tok, ITEM)
    completion = ids(tok, ITEM.completion) + [eot]
    assert enc.completion_ids == completion
    assert enc.student_input_ids == ids(tok, render(HISTORY)) + completion
    assert enc.teacher_input_ids == ids(tok, render(with_hindsight(HISTORY, ITEM.followup))) + completion
    assert enc.student_input_ids[enc.student_prompt_len:] == enc.teacher_input_ids[enc.teacher_prompt_len:]


def test_plain_template_has_exactly_one_bos_and_eot_is_not_eos():
    tok = tiny_tokenizer("plain")
    enc = encode_interaction(tok, ITEM)
    assert enc.student_input_ids.count(tok.bos_token_id) == 1
    assert enc.student_input_ids[0] == tok.bos_token_id
    assert enc.completion_ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>") != tok.eos_token_id


@pytest.mark.parametrize("kind", ["qwen3", "plain"])
def test_shared_prefix_len_is_longest_common_prefix(kind):
    tok = tiny_tokenizer(kind)
    enc = encode_interaction(tok, ITEM)
    s = enc.student_input_ids[: enc.student_prompt_len]
    t = enc.teacher_input_ids[: enc.teacher_prompt_len]
    n = enc.shared_prefix_len
    assert s[:n] == t[:n] and s[n] != t[n]
    # Everything before the last user message's content is shared.
    head = (chatml if kind == "qwen3" else llama3)(HISTORY).split("Now make it shorter.")[0]
    assert n >= len(ids(tok, head)) - 1


def test_enable_thinking_defaults_to_false_and_can_be_overridden():
    tok = tiny_tokenizer("qwen3")
    off = encode_interaction(tok, ITEM)
    on = encode_interaction(tok, ITEM, chat_template_kwargs={"enable_thinking": True})
    completion = off.completion_ids
    assert off.student_input_ids == ids(tok, chatml(HISTORY, empty_think=True)) + completion
    assert on.student_input_ids == ids(tok, chatml(HISTORY, empty_think=False)) + completion


def test_custom_hindsight_template_substitutes_followup_literally():
    tok = tiny_tokenizer("qwen3")
    template = "\nJSON {\"x\": 1} then: {followup}"
    enc = encode_interaction(tok, ITEM, hindsight_template=template)
    teacher = [dict(m) for m in HISTORY]
    teacher[-1]["content"] += "\nJSON {\"x\": 1} then: " + ITEM.followup
    assert enc.teacher_input_ids[: enc.teacher_prompt_len] == ids(tok, chatml(teacher))


def test_hindsight_goes_to_last_user_message_even_if_history_ends_with_assistant():
    tok = tiny_tokenizer("qwen3")
    history = HISTORY + [{"role": "assistant", "content": "Sure."}]
    enc = encode_interaction(tok, Interaction(history, "Done.", "Thanks"))
    assert enc.teacher_input_ids[: enc.teacher_prompt_len] == ids(tok, chatml(with_hindsight(history, "Thanks")))


@pytest.mark.parametrize("bad", ["no slot here", "{follow_up}", 3])
def test_hindsight_template_without_slot_is_rejected(bad):
    with pytest.raises(ValueError, match="hindsight_template"):
        encode_interaction(tiny_tokenizer("qwen3"), ITEM, hindsight_template=bad)


def test_end_of_turn_token_options():
    tok = tiny_tokenizer("qwen3")
    text = ids(tok, ITEM.completion)
    assert encode_interaction(tok, ITEM, end_of_turn_token=None).completion_ids == text
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    assert encode_interaction(tok, ITEM, end_of_turn_token="<|endoftext|>").completion_ids == text + [endoftext]
    assert encode_interaction(tok, ITEM, end_of_turn_token=7).completion_ids == text + [7]
    with pytest.raises(ValueError, match="end_of_turn_token"):
        encode_interaction(tok, ITEM, end_of_turn_token="<|not_a_token|>")
    with pytest.raises(ValueError, match="end_of_turn_token"):
        encode_interaction(tok, ITEM, end_of_turn_token=len(tok))


def test_completion_truncation_keeps_eot_only_when_whole_reply_fits():
    tok = tiny_tokenizer("qwen3")
    text = ids(tok, ITEM.completion)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    n = len(text)
    assert encode_interaction(tok, ITEM, max_completion_tokens=n + 1).completion_ids == text + [eot]
    assert encode_interaction(tok, ITEM, max_completion_tokens=n).completion_ids == text
    cut = encode_interaction(tok, ITEM, max_completion_tokens=3)
    assert cut.completion_ids == text[:3]
    assert cut.student_input_ids[-3:] == cut.teacher_input_ids[-3:] == text[:3]


def test_given_completion_ids_are_used_as_they_are():
    from sdpo_fast.data import InteractionEncoder

    tok = tiny_tokenizer("qwen3")
    encoder = InteractionEncoder(tok, max_completion_tokens=4)
    chars = [tok.convert_tokens_to_ids(c) for c in "Friday"]  # one id per letter: not how the text tokenizes
    assert chars != ids(tok, "Friday")[:6]
    e = encoder.encode(ITEM, completion_ids=chars)
    assert e.completion_ids == chars[:4]
    assert e.student_input_ids == encoder.encode(ITEM).student_input_ids[:e.student_prompt_len] + chars[:4]
    assert e.teacher_input_ids[-4:] == chars[:4]
    for bad in ([len(tok)], [-1], ["a"], [True], 7):
        with pytest.raises(ValueError, match="completion_ids"):
            encoder.encode(ITEM, completion_ids=bad)


LONG_HISTORY = [
    SYSTEM,
    {"role": "user", "content": "First question about the weather in Zurich today?"},
    {"role": "assistant", "content": "It is sunny."},
    {"role": "user", "content": "Second question: and tomorrow?"},
    {"role": "assistant", "content": "Rain."},
    {"role": "user", "content": "Third: write a poem about it."},
]


def test_history_drops_oldest_turns_keeping_system_and_user_start():
    tok = tiny_tokenizer("qwen3")
    item = Interaction(LONG_HISTORY, "Rain falls on the lake.", "Make it rhyme.")
    kept = [SYSTEM] + LONG_HISTORY[3:]
    teacher_len = len(ids(tok, chatml(with_hindsight(kept, item.followup))))
    enc = encode_interaction(tok, item, max_prompt_tokens=teacher_len)
    assert enc.student_input_ids[: enc.student_prompt_len] == ids(tok, chatml(kept))
    assert enc.teacher_prompt_len == teacher_len
    # One token less: only the last user turn (after the system message) remains.
    last_only = [SYSTEM, LONG_HISTORY[-1]]
    enc = encode_interaction(tok, item, max_prompt_tokens=teacher_len - 1)
    assert enc.student_input_ids[: enc.student_prompt_len] == ids(tok, chatml(last_only))
    # The student prompt alone would fit; the teacher prompt decides.
    full_student = len(ids(tok, chatml(LONG_HISTORY)))
    enc = encode_interaction(tok, item, max_prompt_tokens=full_student)
    assert enc.student_prompt_len < full_student
    minimal = len(ids(tok, chatml(with_hindsight(last_only, item.followup))))
    with pytest.raises(SkipInteraction) as info:
        encode_interaction(tok, item, max_prompt_tokens=minimal - 1)
    assert info.value.reason == "prompt_too_long"


def test_empty_parts_are_skipped():
    tok = tiny_tokenizer("qwen3")
    for item, reason in [
        (Interaction(HISTORY, "  \n", "ok"), "empty_completion"),
        (Interaction(HISTORY, "Hi", "\t"), "empty_followup"),
        (Interaction([SYSTEM], "Hi", "ok"), "no_user_message_in_history"),
        (Interaction([], "Hi", "ok"), "no_user_message_in_history"),
    ]:
        with pytest.raises(SkipInteraction) as info:
            encode_interaction(tok, item)
        assert info.value.reason == reason


def test_encode_interactions_counts_skips():
    tok = tiny_tokenizer("qwen3")
    limit = len(ids(tok, chatml(with_hindsight(HISTORY, ITEM.followup))))
    too_long = Interaction([{"role": "user", "content": "word " * limit}], "ok", "x")
    items = [ITEM, Interaction(HISTORY, " ", "x"), too_long, ITEM]
    encoded, skipped = encode_interactions(tok, iter(items), max_prompt_tokens=limit)
    assert skipped == collections.Counter({"empty_completion": 1, "prompt_too_long": 1})
    assert encoded == [encode_interaction(tok, ITEM, max_prompt_tokens=limit)] * 2
    assert encoded[0].teacher_prompt_len == limit
    with pytest.raises(TypeError, match="max_prompt"):
        encode_interactions(tok, items, max_prompt=5)


def test_tokenizer_without_chat_template_gets_clear_error():
    tok = tiny_tokenizer("none")
    with pytest.raises(ValueError, match=r"chat_template"):
        encode_interaction(tok, ITEM)
    template = tiny_tokenizer("qwen3").chat_template
    enc = encode_interaction(tok, ITEM, chat_template=template, end_of_turn_token=None)
    assert enc.student_input_ids == ids(tok, chatml(HISTORY)) + ids(tok, ITEM.completion)


@pytest.mark.parametrize("name", ["max_prompt_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_limits_are_rejected(name, value):
    with pytest.raises(ValueError, match=name):
        encode_interaction(tiny_tokenizer("qwen3"), ITEM, **{name: value})
