"""Simulated users: rule-based (tests, CPU demo) or an LLM given a persona (local Hugging Face model or an
OpenAI-compatible chat endpoint). A user reads the conversation and the assistant's reply and writes the
next user message u."""
from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Protocol

from ..utils.checks import check_int, check_number
from .personas import RULES, Persona

USER_INSTRUCTIONS = (
    "You are role-playing a user chatting with an AI assistant. Your profile:\n{profile}\n\n"
    "You will see your request and the assistant's reply. Write your next message to the assistant: react "
    "only to how well the reply fits your profile and preferences, in one or two short sentences, in the "
    "first person. Do not answer the request yourself and do not mention that you have a profile."
)
SATISFIED_REPLY = "Thanks, that works for me."


class EndpointError(RuntimeError):
    """A chat endpoint failed after all retries (or with a non-retryable status)."""


class ChatBackend(Protocol):
    def complete(self, messages: list[dict]) -> str:
        """The assistant text answering the chat `messages` ([{role, content}])."""


class OpenAIChat:
    """An OpenAI-compatible `/chat/completions` endpoint via urllib.

    base_url: e.g. "https://api.openai.com/v1"; api_key_env: the environment variable holding the key (unset
    or empty: no Authorization header, for local servers). Connection errors, timeouts, 429 and 5xx are
    retried `retries` times with exponential backoff; other HTTP errors raise EndpointError at once.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout: float = 60.0, retries: int = 3, backoff: float = 1.0, temperature: float = 0.0,
                 max_tokens: int = 256):
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not isinstance(model, str) or not model:
            raise ValueError(f"model must be a non-empty string, got {model!r}")
        check_int("retries", retries, 0)
        check_number("timeout", timeout, positive=True)
        check_number("backoff", backoff)
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, float(timeout), retries, float(backoff)
        self.temperature, self.max_tokens = temperature, max_tokens
        self._key = os.environ.get(api_key_env, "") if api_key_env else ""

    def complete(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
                if exc.code != 429 and exc.code < 500:
                    raise EndpointError(f"{self.url} answered {last} (not retried)") from None
                continue
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as exc:
                last = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
                continue
            except ValueError:
                raise EndpointError(f"{self.url} did not return JSON") from None
            try:
                return payload["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise EndpointError(f"{self.url} returned no choices[0].message.content") from None
        raise EndpointError(f"{self.url} failed after {self.retries + 1} attempts (last: {last})")


class HFChat:
    """A local Hugging Face causal LM with a chat template as a chat backend (greedy unless temperature > 0)."""

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.seed, self.calls = max_new_tokens, temperature, seed, 0

    def complete(self, messages: list[dict]) -> str:
        from ..model.generation import generate

        self.calls += 1
        return generate(self.model, self.tokenizer, messages, max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature, seed=self.seed * 1_000_003 + self.calls)


class User(Protocol):
    def reply(self, messages: list[dict], response: str) -> str:
        """The next user message after the assistant's `response` to the conversation `messages`."""


class RuleUser:
    """A user whose hidden preference is the persona's rules: it names the first rule the reply breaks, else
    says it is satisfied."""

    def __init__(self, persona: Persona, satisfied: str = SATISFIED_REPLY):
        if not persona.rules:
            raise ValueError(f"persona {persona.name!r} has no rules; a rule-based user needs at least one")
        self.persona, self.rules, self.satisfied = persona, [RULES[r] for r in persona.rules], satisfied

    def reply(self, messages: list[dict], response: str) -> str:
        broken = next((r for r in self.rules if not r.check(response)), None)
        return broken.complaint if broken else self.satisfied


def _transcript(messages: list[dict], response: str) -> str:
    turns = [f"{m['role'].upper()}: {m['content']}" for m in messages if m["role"] != "system"]
    return "\n\n".join(turns + [f"ASSISTANT: {response}"])


class LLMUser:
    """An LLM playing `persona` (its description in the system prompt) through a `ChatBackend`."""

    def __init__(self, persona: Persona, backend: ChatBackend):
        self.persona, self.backend = persona, backend

    def reply(self, messages: list[dict], response: str) -> str:
        chat = [{"role": "system", "content": USER_INSTRUCTIONS.format(profile=self.persona.description)},
                {"role": "user", "content": "Conversation so far:\n\n" + _transcript(messages, response)
                 + "\n\nWrite your next message to the assistant."}]
        text = self.backend.complete(chat).strip()
        if not text:
            raise EndpointError(f"the simulated user ({type(self.backend).__name__}) returned an empty message")
        return text

