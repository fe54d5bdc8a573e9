import collections

import pytest

from sdpo_fast.data import Interaction, extract_interactions


def msg(role, content):
    return {"role": role, "content": content}


def convo(*pairs):
    return [msg(r, c) for r, c in pairs]


def test_one_interaction_per_assistant_followed_by_user():
    messages = convo(("user", "u0"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a3"), ("user", "u4"), ("assistant", "a5"))
    out = extract_interactions(messages)
    assert [(i.completion, i.followup) for i in out] == [("a1", "u2"), ("a3", "u4")]
    assert out[0].history == convo(("user", "u0"))
    assert out[1].history == convo(("user", "u0"), ("assistant", "a1"), ("user", "u2"))
    assert [i.meta["assistant_index"] for i in out] == [1, 3]


def test_history_is_last_max_history_messages_trimmed_to_start_with_user():
    messages = convo(*[("user" if k % 2 == 0 else "assistant", f"m{k}") for k in range(12)])
    # assistant m9 followed by user m10: the 5 messages before m9 are m4..m8, starting with user m4.
    (last,) = [i for i in extract_interactions(messages) if i.completion == "m9"]
    assert [m["content"] for m in last.history] == ["m4", "m5", "m6", "m7", "m8"]
    # max_history=4 -> m5..m8, trimmed at the front to start with a user message -> m6..m8.
    (last,) = [i for i in extract_interactions(messages, max_history=4) if i.completion == "m9"]
    assert [m["content"] for m in last.history] == ["m6", "m7", "m8"]


def test_leading_system_message_is_kept_and_not_counted():
    messages = [msg("system", "sys")] + convo(*[("user" if k % 2 == 0 else "assistant", f"m{k}") for k in range(8)])
    (last,) = [i for i in extract_interactions(messages, max_history=3) if i.completion == "m5"]
    assert last.history == [msg("system", "sys"), msg("user", "m2"), msg("assistant", "m3"), msg("user", "m4")]
    assert all(i.history[0] == msg("system", "sys") for i in extract_interactions(messages, max_history=1))


def test_system_message_in_the_middle_is_an_ordinary_message():
    messages = convo(("user", "u0"), ("assistant", "a1"), ("system", "s2"), ("user", "u3"), ("assistant", "a4"), ("user", "u5"))
    out = extract_interactions(messages)
    assert out[-1].history == convo(("user", "u0"), ("assistant", "a1"), ("system", "s2"), ("user", "u3"))


def test_empty_parts_are_skipped_and_counted():
    messages = convo(("user", "u0"), ("assistant", " \n"), ("user", "u2"), ("assistant", "a3"), ("user", "\t"),
                     ("assistant", "a5"), ("user", "u6"))
    skipped = collections.Counter()
    out = extract_interactions(messages, skipped=skipped)
    assert [i.completion for i in out] == ["a5"]
    assert skipped == {"empty_completion": 1, "empty_followup": 1}


def test_history_without_user_message_is_skipped():
    messages = convo(("assistant", "Hello! How can I help?"), ("user", "u1"), ("assistant", "a2"), ("user", "u3"))
    skipped = collections.Counter()
    out = extract_interactions(messages, skipped=skipped)
    assert [i.completion for i in out] == ["a2"]
    assert skipped == {"no_user_message_in_history": 1}


def test_consecutive_assistant_messages():
    messages = convo(("user", "u0"), ("assistant", "a1"), ("assistant", "a2"), ("user", "u3"))
    (only,) = extract_interactions(messages)
    assert only.completion == "a2" and only.history == convo(("user", "u0"), ("assistant", "a1"))


def test_histories_are_independent_copies():
    messages = convo(("user", "u0"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a3"), ("user", "u4"))
    out = extract_interactions(messages, meta={"id": "x"})
    out[0].history[0]["content"] = "changed"
    out[0].meta["id"] = "changed"
    assert messages[0]["content"] == "u0" and out[1].history[0]["content"] == "u0" and out[1].meta["id"] == "x"


def test_interaction_is_keyword_constructible_with_empty_meta():
    a = Interaction(history=[msg("user", "q")], completion="y", followup="u")
    assert a.meta == {} and a.meta is not Interaction(history=[], completion="", followup="").meta


@pytest.mark.parametrize(
    "messages,error",
    [
        ("not a list", TypeError),
        ([["user", "hi"]], TypeError),
        ([{"role": "human", "content": "hi"}], ValueError),
        ([{"role": "user", "content": None}], TypeError),
    ],
)
def test_bad_messages_raise(messages, error):
    with pytest.raises(error, match="messages"):
        extract_interactions(messages)


@pytest.mark.parametrize("value", [0, -2, 2.0, True])
def test_bad_max_history_raises(value):
    with pytest.raises(ValueError, match="max_history"):
        extract_interactions([], max_history=value)
