"""Online SDPO evaluation pieces: judges, win rate and bootstrap SE, personas, simulated-user endpoints."""
from __future__ import annotations

import http.server
import json
import math
import threading
import time

import pytest

from sdpo_fast.online.judge import LOSS, TIE, WIN, LLMJudge, RuleJudge, bootstrap_se, judge_pair, summarize, \
    win_rate
from sdpo_fast.online.personas import Persona, get_persona, load_personas, parse_personas
from sdpo_fast.online.users import EndpointError, LLMUser, OpenAIChat, RuleUser, SATISFIED_REPLY

CONCISE = Persona("c", "Likes short answers.", ("concise",))
SHORT, LONG = "Boil it for eight minutes.", " ".join(["word"] * 60)


class Scripted:
    """A judge answering from a list, recording the order it was shown."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def prefer(self, persona, prompt, a, b):
        self.seen.append((a, b))
        return self.answers.pop(0)


@pytest.mark.parametrize("answers, outcome", [
    (["A", "B"], WIN), (["B", "A"], LOSS), (["A", "A"], TIE), (["B", "B"], TIE), (["tie", "B"], TIE),
    (["tie", "tie"], TIE)])
def test_both_orders_and_disagreement_is_a_tie(answers, outcome):
    judge = Scripted(answers)
    assert judge_pair(judge, CONCISE, "q", "trained", "base") == outcome
    assert judge.seen == [("trained", "base"), ("base", "trained")]


def test_rule_judge_prefers_the_rule_satisfying_reply():
    assert judge_pair(RuleJudge(), CONCISE, "q", SHORT, LONG) == WIN
    assert judge_pair(RuleJudge(), CONCISE, "q", LONG, SHORT) == LOSS
    assert judge_pair(RuleJudge(), CONCISE, "q", SHORT, SHORT) == TIE
    with pytest.raises(ValueError, match="no rules"):
        RuleJudge().prefer(Persona("x", "text"), "q", SHORT, LONG)


def test_win_rate_excludes_ties_and_bootstrap_matches_binomial():
    assert win_rate([WIN, WIN, LOSS, TIE, TIE]) == pytest.approx(2 / 3)
    assert math.isnan(win_rate([TIE, TIE]))
    assert math.isnan(bootstrap_se([WIN, TIE]))
    outcomes = [WIN] * 70 + [LOSS] * 30
    assert bootstrap_se(outcomes, n_boot=4000) == pytest.approx(math.sqrt(0.7 * 0.3 / 100), rel=0.08)
    s = summarize(outcomes + [TIE] * 10)
    assert (s.wins, s.losses, s.ties, s.win_rate) == (70, 30, 10, 0.7)
    with pytest.raises(ValueError, match="outcomes"):
        summarize(["won"])


def test_rule_user_names_the_broken_rule():
    user = RuleUser(get_persona("concise-casual-beginner"))
    assert user.reply([], LONG) == "Too long. Keep it short and simple."
    assert user.reply([], SHORT) == SATISFIED_REPLY
    assert RuleUser(get_persona("no-emojis")).reply([], "Hi \U0001F642") == "Please stop using emojis."
    twenty, twenty_one = " ".join(["word"] * 20), " ".join(["word"] * 21)
    brief, fuller = RuleUser(get_persona("brief")), RuleUser(get_persona("fuller"))
    assert (brief.reply([], twenty), brief.reply([], twenty_one)) == (SATISFIED_REPLY, "Too long, make it shorter.")
    assert (fuller.reply([], twenty), fuller.reply([], twenty_one)) == ("Can you give more detail?", SATISFIED_REPLY)


def test_bundled_personas_have_the_five_profiles():
    personas = load_personas()
    for name in ("no-emojis", "no-sycophancy", "direct-plain", "concise-casual-beginner",
                 "detailed-professional-expert"):
        assert personas[name].description and personas[name].rules
        assert personas[personas[name].opposite].opposite == name


@pytest.mark.parametrize("data, field", [
    ({"people": []}, "'personas'"),
    ({"personas": ["x"]}, r"personas\[0\] must be a mapping"),
    ({"personas": [{"name": "a"}]}, r"personas\[0\]\.description"),
    ({"personas": [{"name": "a b", "description": "d"}]}, r"personas\[0\]\.name"),
    ({"personas": [{"name": "a", "description": "d", "rules": "concise"}]}, r"personas\[0\]\.rules"),
    ({"personas": [{"name": "a", "description": "d", "rules": ["shouty"]}]}, "unknown rule 'shouty'"),
    ({"personas": [{"name": "a", "description": "d", "opposite": "b"}]}, r"personas\[0\]\.opposite 'b'"),
    ({"personas": [{"name": "a", "description": "d", "tone": "x"}]}, r"personas\[0\] has unknown fields \['tone'\]"),
    ({"personas": [{"name": "a", "description": "d"}, {"name": "a", "description": "e"}]}, "defined twice"),
])
def test_bad_persona_yaml_names_the_field(data, field):
    with pytest.raises(ValueError, match=field):
        parse_personas(data, "mine.yaml")


def test_persona_file_errors(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("personas:\n  - name: terse\n    description: Short answers only.\n    rules: [concise]\n")
    assert load_personas(path)["terse"].rules == ("concise",)
    path.write_text("personas: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_personas(path)
    with pytest.raises(FileNotFoundError):
        load_personas(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="persona 'nobody' not found"):
        get_persona("nobody")


class _Server:
    """A fake OpenAI-compatible server on 127.0.0.1: `plan` lists per-request behaviours."""

    def __init__(self, plan):
        self.plan, self.requests = list(plan), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                action = outer.plan.pop(0) if outer.plan else "ok"
                if action == "sleep":
                    time.sleep(0.5)
                    action = "ok"
                if isinstance(action, int):
                    self.send_response(action)
                    self.end_headers()
                    return
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": action
                                                               if action != "ok" else "Fine, but shorter."}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload.encode())

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    s = _Server(request.param)
    yield s
    s.close()


@pytest.mark.parametrize("server", [[500, 503, "ok"]], indirect=True)
def test_openai_user_retries_server_errors(server, monkeypatch):
    monkeypatch.setenv("MY_KEY", "secret")
    chat = OpenAIChat(server.url, "judge-model", api_key_env="MY_KEY", retries=2, backoff=0, timeout=5)
    user = LLMUser(get_persona("concise-casual-beginner"), chat)
    assert user.reply([{"role": "user", "content": "hi"}], "A long reply") == "Fine, but shorter."
    assert len(server.requests) == 3
    path, auth, body = server.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer secret" and body["model"] == "judge-model"
    assert "beginner" in body["messages"][0]["content"] and "A long reply" in body["messages"][1]["content"]


@pytest.mark.parametrize("server", [[500, 500, 500]], indirect=True)
def test_openai_gives_up_after_retries(server):
    chat = OpenAIChat(server.url, "m", api_key_env=None, retries=2, backoff=0, timeout=5)
    with pytest.raises(EndpointError, match="failed after 3 attempts .*HTTP 500"):
        chat.complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 3


@pytest.mark.parametrize("server", [["sleep", "sleep"]], indirect=True)
def test_openai_timeout_is_retried_then_reported(server):
    chat = OpenAIChat(server.url, "m", api_key_env=None, retries=1, backoff=0, timeout=0.2)
    with pytest.raises(EndpointError, match="failed after 2 attempts"):
        chat.complete([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("server", [[401]], indirect=True)
def test_openai_client_errors_are_not_retried(server):
    chat = OpenAIChat(server.url, "m", api_key_env=None, retries=3, backoff=0)
    with pytest.raises(EndpointError, match="HTTP 401 .not retried"):
        chat.complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1


@pytest.mark.parametrize("server", [["Reply B fits better. B", "A"]], indirect=True)
def test_llm_judge_over_the_endpoint(server):
    judge = LLMJudge(OpenAIChat(server.url, "m", api_key_env=None, retries=0))
    assert judge_pair(judge, CONCISE, "q", SHORT, LONG) == LOSS


def test_unreachable_endpoint_and_bad_arguments():
    chat = OpenAIChat("http://127.0.0.1:9/v1", "m", api_key_env=None, retries=1, backoff=0, timeout=1)
    with pytest.raises(EndpointError, match="127.0.0.1:9"):
        chat.complete([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="base_url"):
        OpenAIChat("localhost:8000", "m")
    with pytest.raises(ValueError, match="retries"):
        OpenAIChat("http://x", "m", retries=-1)
    with pytest.raises(ValueError, match="timeout"):
        OpenAIChat("http://x", "m", timeout=0)


def test_local_hf_chat_backend_is_deterministic():
    from sdpo_fast.online.users import HFChat
    from sdpo_fast.testing import tiny_causal_lm, tiny_tokenizer

    chat = [{"role": "system", "content": "profile"}, {"role": "user", "content": "How was the reply?"}]
    first = HFChat(tiny_causal_lm(initializer_range=0.2), tiny_tokenizer(), max_new_tokens=6).complete(chat)
    again = HFChat(tiny_causal_lm(initializer_range=0.2), tiny_tokenizer(), max_new_tokens=6).complete(chat)
    assert isinstance(first, str) and first == again
