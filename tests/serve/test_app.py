"""The HTTP API in process (FastAPI's TestClient) on the bundled tiny model: replies are the base model's samples
until a user's adapter learns, turns are committed before they are returned, follow-ups are recognized only in
the same user's histories, and hostile input is refused with one OpenAI-shaped 4xx while the service keeps
serving."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from sdpo_fast.demo import single_thread  # noqa: E402
from sdpo_fast.model.generation import chat_prompt_ids  # noqa: E402
from sdpo_fast.serve.app import create_app  # noqa: E402

from helpers import sampling_logprobs  # noqa: E402
from serving import MODEL, X, greedy_reply, make_service, reference_reply  # noqa: E402


@pytest.fixture
def served(tmp_path):
    with single_thread():
        service = make_service(tmp_path / "state")
        keys = {name: service.store.add_user(name) for name in ("alice", "bob")}
        with TestClient(create_app(service)) as client:
            yield service, client, keys


def chat(client, key, messages, **body):
    return client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": MODEL, "messages": messages, **body})


def test_a_reply_is_the_base_models_sample_and_committed_before_it_returns(served):
    service, client, keys = served
    response = chat(client, keys["alice"], X, user="bob")  # the body's user cannot pick the account
    assert response.status_code == 200
    body = response.json()
    text, ids = reference_reply(X, 0)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    prompt_tokens = len(chat_prompt_ids(service.tokenizer, [X])[0])
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                             "total_tokens": prompt_tokens + len(ids)}
    stored = service.store.find_reply("alice", X, text)
    assert stored is not None and tuple(stored.token_ids) == ids
    assert service.store.counts("bob")["replies"] == 0
    capped = chat(client, keys["alice"], X, max_tokens=3).json()
    assert capped["usage"]["completion_tokens"] <= 3 and capped["choices"][0]["finish_reason"] == "length"
    assert capped["choices"][0]["message"]["content"] == reference_reply(X, 1, max_new_tokens=3)[0]


def test_temperature_zero_is_a_plain_greedy_decode(served):
    service, client, keys = served
    expected = greedy_reply(X, service.config.max_new_tokens)
    for _ in range(2):  # greedy: the same reply whatever the seed of the user's n-th reply
        text = chat(client, keys["alice"], X, temperature=0).json()["choices"][0]["message"]["content"]
        assert tuple(service.store.find_reply("alice", X, text).token_ids) == expected
    sampled = chat(client, keys["bob"], X, temperature=1.3, top_p=0.9).json()["choices"][0]["message"]["content"]
    assert service.store.find_reply("bob", X, sampled) is not None


def test_with_importance_clipping_a_reply_records_the_distribution_it_was_sampled_from(tmp_path):
    """The stored behavior log-probs are those of softmax(logits / temperature) cut to the top_p nucleus, from a
    plain forward; greedy has no distribution, so temperature 0 is refused."""
    with single_thread():
        service = make_service(tmp_path / "state", config={"importance_clip": 2.0})
        key = service.store.add_user("alice")
        with TestClient(create_app(service)) as client:
            refused = chat(client, key, X, temperature=0)
            assert refused.status_code == 400 and refused.json()["error"]["param"] == "temperature"
            text = chat(client, key, X, temperature=0.7, top_p=0.8).json()["choices"][0]["message"]["content"]
    stored = service.store.find_reply("alice", X, text)
    prompt = chat_prompt_ids(service.tokenizer, [X])[0]
    expected = sampling_logprobs(service.adapters.base, prompt, stored.token_ids, 0.7, 0.8)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(torch.tensor(stored.logprobs, dtype=torch.float64), expected, rtol=0, atol=2e-5)
    whole = sampling_logprobs(service.adapters.base, prompt, stored.token_ids, 0.7)
    assert (expected - whole > 1e-3).any()  # the nucleus left tokens out


def test_a_followup_makes_an_interaction_only_for_the_user_who_got_the_reply(served):
    service, client, keys = served
    reply = chat(client, keys["alice"], X).json()["choices"][0]["message"]["content"]
    history = X + [{"role": "assistant", "content": reply}, {"role": "user", "content": "No emojis, please."}]
    replayed = chat(client, keys["bob"], history)  # bob replays alice's history
    assert replayed.status_code == 400 and replayed.json()["error"]["param"] == "messages[1]"
    assert chat(client, keys["alice"], history).status_code == 200
    (item,) = service.store.pending("alice", 10)
    assert (item.prompt, item.reply, item.followup) == (X, reply, "No emojis, please.")
    assert tuple(item.token_ids) == reference_reply(X, 0)[1]  # y's sampled ids, kept for the update
    assert service.store.pending("bob", 10) == []
    me = {name: client.get("/v1/me", headers={"Authorization": f"Bearer {key}"}).json()
          for name, key in keys.items()}
    assert me == {"alice": {"user": "alice", "interactions": 1, "learned": 0, "adapter_version": 0},
                  "bob": {"user": "bob", "interactions": 0, "learned": 0, "adapter_version": 0}}


def test_streamed_reply_is_the_committed_one(served):
    service, client, keys = served
    with client.stream("POST", "/v1/chat/completions", headers={"Authorization": f"Bearer {keys['bob']}"},
                       json={"model": MODEL, "messages": X, "stream": True,
                             "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reference_reply(X, 0)[0] and service.store.find_reply("bob", X, text) is not None
    assert chunks[-1]["usage"]["completion_tokens"] == len(reference_reply(X, 0)[1])
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]][-1] == "stop"


def _deep(depth: int) -> bytes:
    return b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"


HOSTILE = [
    (b"{not json", 400, None),
    (b"\xff\xfe", 400, None),
    (_deep(100_000), 400, None),
    (json.dumps({"model": MODEL, "messages": X * 2000, "padding": "x" * (1 << 20)}).encode(), 413, None),
    (json.dumps([1, 2]).encode(), 400, None),
    (json.dumps({"messages": X}).encode(), 400, "model"),
    (json.dumps({"model": "gpt-4o", "messages": X}).encode(), 404, "model"),
    (json.dumps({"model": MODEL, "messages": []}).encode(), 400, "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}).encode(), 400,
     "messages[0].role"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(), 400,
     "messages[0].content"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a\x00b"}]}).encode(), 400,
     "messages[0].content"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a\x1bb"}]}).encode(), 400,
     "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content"),
    (json.dumps({"model": MODEL, "messages": X + [{"role": "assistant", "content": "hi"}]}).encode(), 400,
     "messages"),
    (json.dumps({"model": MODEL, "messages": [X[0], {"role": "assistant", "content": "I never said this."},
                                              {"role": "user", "content": "ok"}]}).encode(), 400, "messages[1]"),
    (json.dumps({"model": MODEL, "messages": X, "max_tokens": 0}).encode(), 400, "max_tokens"),
    (json.dumps({"model": MODEL, "messages": X, "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": X, "temperature": True}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": X, "temperature": 1e-4}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": X, "temperature": 2.5}).encode(), 400, "temperature"),
    (json.dumps({"model": MODEL, "messages": X, "top_p": 0}).encode(), 400, "top_p"),
    (json.dumps({"model": MODEL, "messages": X, "top_p": 1.5}).encode(), 400, "top_p"),
    (json.dumps({"model": MODEL, "messages": X, "top_p": "all"}).encode(), 400, "top_p"),
    (json.dumps({"model": MODEL, "messages": X, "n": 3}).encode(), 400, "n"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 600}]}).encode(), 400,
     "messages"),
]


def test_hostile_input_is_one_4xx_and_the_service_keeps_serving(served):
    service, client, keys = served
    headers = {"Authorization": f"Bearer {keys['alice']}", "Content-Type": "application/json"}
    for i, (body, status, param) in enumerate(HOSTILE):
        response = client.post("/v1/chat/completions", content=body, headers=headers)
        assert response.status_code == status, i
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, i
        assert isinstance(error["message"], str) and "\n" not in error["message"] and error["message"], i
    assert service.store.counts("alice")["replies"] == 0
    assert chat(client, keys["alice"], X).status_code == 200


def test_unknown_keys_and_rate_limit(tmp_path):
    with single_thread():
        service = make_service(tmp_path / "state", rate_limit=2)
        key = service.store.add_user("alice")
        with TestClient(create_app(service)) as client:
            assert client.get("/healthz").json() == {"status": "ok"}
            for headers in ({}, {"Authorization": "Bearer sk-sdpo-nope"}, {"Authorization": key},
                            {"Authorization": f"Basic {key}"}):
                for method, path in (("GET", "/v1/models"), ("GET", "/v1/me"), ("POST", "/v1/chat/completions")):
                    response = client.request(method, path, headers=headers, json={"model": MODEL, "messages": X})
                    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
            auth = {"Authorization": f"Bearer {key}"}
            assert client.get("/v1/models", headers=auth).json()["data"][0]["id"] == MODEL
            assert [chat(client, key, X).status_code for _ in range(3)] == [200, 200, 429]
            assert chat(client, key, X).json()["error"]["code"] == "rate_limit_exceeded"
            assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").json()
            assert client.get("/").headers["content-type"].startswith("text/html")


def test_a_failed_reply_is_a_500_that_quotes_nothing_and_stores_nothing(served, monkeypatch):
    service, client, keys = served
    lines = []
    monkeypatch.setattr(service, "log", lines.append)
    record = service.store.record_turn

    def fail(*args, **kwargs):
        raise ValueError(f"cannot store {args[1]}")

    monkeypatch.setattr(service.store, "record_turn", fail)
    response = chat(client, keys["alice"], X)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error"
    assert "volcanoes" not in response.text and lines == ["serve: a reply failed (ValueError)"]
    assert service.store.counts("alice")["replies"] == 0
    monkeypatch.setattr(service.store, "record_turn", record)
    assert chat(client, keys["alice"], X).status_code == 200
