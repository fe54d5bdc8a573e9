"""The HTTP service: an OpenAI-compatible chat API over one base model with one LoRA adapter per user, learning
each user's preferences from their follow-ups (see store.py for what is kept, learner.py for the updates).

Routes: POST /v1/chat/completions (OpenAI schema; stream=true sends server-sent events), GET /v1/models,
GET /v1/me ({"user", "interactions", "learned", "adapter_version"}), GET /healthz, GET / (the chat page).
`Authorization: Bearer KEY` decides the user (the body's `user` field is ignored). Errors use OpenAI's shape
{"error": {"message", "type", "param", "code"}}: 400 malformed body, 401 unknown key, 404 unknown model or
route, 413 body over the limit, 429 over the per-user rate.

A history may only contain assistant messages this server gave the same user after exactly the messages before
them; when it ends with such a reply and a new user message, that message is the follow-up u of the interaction
(x = the reply's prompt, y = the reply). The reply is returned only after its turn (and interaction) is
committed. A request's `temperature` (absent: the configured one; 0: greedy) and `top_p` (nucleus, default 1)
are the reply's sampling, and its `max_tokens` caps the reply at the configured max_new_tokens. With importance
clipping each reply's behavior log-probs are those of the distribution it was sampled from (that temperature, that
nucleus), so the update's importance weights stay exact; a greedy reply has no such distribution, so temperature 0
is refused (400) while importance clipping is on. What a reply teaches does not depend on how it was sampled.
"""

import collections
import contextlib
import copy
import json
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass

from ..loss.validation import MIN_TEMPERATURE
from ..model.generation import chat_prompt_ids, sample_batch
from ..online.adapters import UserAdapters
from ..online.config import OnlineConfig
from ..utils.checks import is_finite_number
from .learner import Learner
from .page import PAGE_HEADERS, page_html
from .store import Store, StoredReply

MAX_BODY_BYTES = 1 << 20
RATE_LIMIT = 1200
"""Default chat completions per user per minute."""
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_PIECES = re.compile(r"\s*\S+|\s+")


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat completion request; temperature None: the configured one."""

    messages: list[dict]
    max_tokens: int | None
    stream: bool
    include_usage: bool
    temperature: float | None = None
    top_p: float = 1.0


@dataclass(frozen=True)
class Turn:
    """A committed turn: the reply text, why it ended, and the token counts."""

    id: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    created: int


class Service:
    """What the routes share: the store, the replying adapters (read-only, on `model`), the learner (on its own
    copy of the model), the generation lock and the per-user rate window.

    model: a transformers causal LM (not peft-wrapped); config: an OnlineConfig with lora_r >= 1.
    learn: False serves without learning (interactions are still stored).
    """

    def __init__(self, state_dir, model, tokenizer, config: OnlineConfig, *, model_name: str,
                 generator=None, max_body_bytes: int = MAX_BODY_BYTES, rate_limit: int = RATE_LIMIT,
                 max_loaded_users: int = 16, learn: bool = True, log=None):
        self.store = Store(state_dir)
        self.config, self.tokenizer, self.model_name = config, tokenizer, model_name
        self.max_body_bytes, self.rate_limit = max_body_bytes, rate_limit
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.context = getattr(model.config, "max_position_embeddings", None)
        self.files_lock, self.generate_lock, self.rate_lock = threading.Lock(), threading.Lock(), threading.Lock()
        self.learner = None
        if learn:  # its own copy of the base weights, so that replies never wait for an update
            self.learner = Learner(self.store, UserAdapters(copy.deepcopy(model), tokenizer, self.store.adapters_dir,
                                                            config, max_loaded_users=max_loaded_users),
                                   self.files_lock, log=self.log)
        self.adapters = UserAdapters(model, tokenizer, self.store.adapters_dir, config,
                                     max_loaded_users=max_loaded_users, generator=generator, read_only=True)
        self.loaded_versions: dict[str, int] = {}
        self.generated: dict[str, int] = {}
        self.recent: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def start(self) -> None:
        """Record what an interrupted update left, then learn in the background."""
        if self.learner is not None:
            self.learner.reconcile()
            self.learner.start()

    def stop(self) -> None:
        """Finish the running update (it is saved and recorded), then stop learning."""
        if self.learner is not None:
            self.learner.stop()

    # requests

    def authenticate(self, authorization: str | None) -> str:
        scheme, _, key = (authorization or "").partition(" ")
        user = self.store.authenticate(key.strip()) if scheme.lower() == "bearer" and key.strip() else None
        if user is None:
            raise ApiError(401, "missing or unknown API key (send Authorization: Bearer KEY; keys come from "
                                "`sdpo-fast serve add-user`)", "invalid_api_key")
        return user

    def check_rate(self, user: str) -> None:
        if not self.rate_limit:
            return
        now = time.monotonic()
        with self.rate_lock:
            window = self.recent[user]
            while window and window[0] <= now - 60.0:
                window.popleft()
            if len(window) >= self.rate_limit:
                raise ApiError(429, f"rate limit reached: at most {self.rate_limit} chat completions per minute "
                                    "per user; retry later", "rate_limit_exceeded")
            window.append(now)

    def parse(self, raw: bytes) -> ChatRequest:
        """The checked request in `raw` (JSON); ApiError 400/404 naming the first problem."""
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "the body is not valid UTF-8 JSON") from None
        except RecursionError:
            raise ApiError(400, "the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' is required: a string (see GET /v1/models)", param="model")
        if model != self.model_name:
            shown = model[:64] if not _CONTROL.search(model) else "(with control characters)"
            raise ApiError(404, f"the model {shown!r} does not exist; this server serves {self.model_name!r}",
                           "model_not_found", "model")
        messages = _messages(body.get("messages"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)
                                       or max_tokens < 1):
            raise ApiError(400, "'max_tokens' must be an integer >= 1", param="max_tokens")
        temperature = body.get("temperature")
        if temperature is not None and (not is_finite_number(temperature)
                                        or not (temperature == 0 or MIN_TEMPERATURE <= temperature <= 2)):
            raise ApiError(400, f"'temperature' must be 0 (greedy) or a number in [{MIN_TEMPERATURE}, 2]",
                           param="temperature")
        if temperature == 0 and self.config.importance_clip is not None:
            raise ApiError(400, "'temperature' 0 (greedy) is refused: this server's updates use importance "
                                "clipping (--importance-clip), which needs replies sampled from a distribution; "
                                "send a temperature > 0 or omit it", param="temperature")
        top_p = 1 if body.get("top_p") is None else body["top_p"]
        if not is_finite_number(top_p) or not 0 < top_p <= 1:
            raise ApiError(400, "'top_p' must be a number in (0, 1]", param="top_p")
        if top_p < 1 and self.config.importance_clip is not None and self.adapters.generator is not None \
                and not getattr(self.adapters.generator, "top_p_logprobs", False):
            raise ApiError(400, "'top_p' < 1 is refused: this vLLM records no log-probs of the nucleus it samples "
                                "from (importance clipping needs them; vLLM 0.10.2 or later does); send top_p 1",
                           param="top_p")
        if body.get("n", 1) != 1:
            raise ApiError(400, "'n' must be 1: one reply per request", param="n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, "'stream' must be true or false", param="stream")
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return ChatRequest(messages, max_tokens, stream, include_usage,
                           None if temperature is None else float(temperature), float(top_p))

    def previous_reply(self, user: str, messages: list[dict]) -> StoredReply | None:
        """The stored reply the last message follows up, else None; ApiError 400 when an assistant message is
        not a reply this server gave `user` after exactly the messages before it."""
        found = None
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            found = self.store.find_reply(user, messages[:i], m["content"])
            if found is None:
                raise ApiError(400, f"messages[{i}] is not a reply this server gave you after the messages before "
                                    "it; send the history as you received it", param=f"messages[{i}]")
        last = messages[-2] if len(messages) >= 2 else None
        return found if last is not None and last["role"] == "assistant" and last["content"] else None

    def complete(self, user: str, request: ChatRequest) -> Turn:
        """Sample the user's reply, commit the turn (and the interaction it completes), return it."""
        previous = self.previous_reply(user, request.messages)
        prompt = chat_prompt_ids(self.tokenizer, [request.messages])[0]
        new = min(request.max_tokens or self.config.max_new_tokens, self.config.max_new_tokens)
        if self.context is not None and len(prompt) + new > self.context:
            raise ApiError(400, f"the conversation is too long: {len(prompt)} prompt tokens + {new} new tokens "
                                f"exceed the model's context of {self.context}; start a new conversation",
                           "context_length_exceeded", "messages")
        with self.generate_lock:
            version = self.store.adapter_version(user)
            policy = self._policy(user, version)
            count = self.generated.setdefault(user, self.store.reply_count(user))
            seed = self.config.seed * 1_000_003 + count
            self.generated[user] = count + 1
            sampling = dict(temperature=self.config.temperature if request.temperature is None
                            else request.temperature, top_p=request.top_p, max_new_tokens=new)
            if policy.generator is not None:
                sample = policy.generator.sample(policy, [request.messages], seed, **sampling)[0]
            else:
                with policy.active():
                    sample = sample_batch(policy.model, self.tokenizer, [request.messages], seed=seed,
                                          stop_token_ids=policy.stop_token_ids, logprobs=policy.wants_logprobs,
                                          **sampling)[0]
        self.store.record_turn(user, request.messages, sample.text, list(sample.token_ids),
                               None if sample.logprobs is None else list(sample.logprobs), version,
                               previous=previous)
        if previous is not None and self.learner is not None:
            self.learner.wake.set()
        stopped = bool(sample.token_ids) and sample.token_ids[-1] in policy.stop_token_ids
        return Turn("chatcmpl-" + secrets.token_hex(12), sample.text, "stop" if stopped else "length", len(prompt),
                    len(sample.token_ids), int(time.time()))

    def _policy(self, user: str, version: int):
        """The user's replying policy at adapter `version` (reloaded from disk when the learner saved a newer one)."""
        if self.loaded_versions.get(user) != version:
            with self.files_lock:
                self.adapters.unload(user)
                self.adapters.policy(user)
            self.loaded_versions[user] = version
        return self.adapters.policy(user)

    def me(self, user: str) -> dict:
        counts = self.store.counts(user)
        return {"user": user, "interactions": counts["interactions"], "learned": counts["learned"],
                "adapter_version": counts["adapter_version"]}


def _messages(value) -> list[dict]:
    """OpenAI chat messages as [{"role", "content"}] (text content parts joined); ApiError 400 otherwise."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content'", param=where)
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where}.role must be 'system', 'user' or 'assistant'", param=f"{where}.role")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"{where}.content parts must all be text parts", param=f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", param=f"{where}.content")
        if _CONTROL.search(content):
            raise ApiError(400, f"{where}.content contains control characters", param=f"{where}.content")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be a user message", param="messages")
    return out


def _completion(turn: Turn, model: str) -> dict:
    return {"id": turn.id, "object": "chat.completion", "created": turn.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": turn.text},
                         "finish_reason": turn.finish_reason, "logprobs": None}],
            "usage": _usage(turn)}


def _usage(turn: Turn) -> dict:
    return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
            "total_tokens": turn.prompt_tokens + turn.completion_tokens}


def _events(turn: Turn, model: str, include_usage: bool):
    """The server-sent events of a streamed reply: role, text pieces, finish reason, [usage], [DONE]."""
    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": turn.id, "object": "chat.completion.chunk", "created": turn.created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    for piece in _PIECES.findall(turn.text):
        yield chunk({"content": piece})
    yield chunk({}, turn.finish_reason)
    if include_usage:
        body = {"id": turn.id, "object": "chat.completion.chunk", "created": turn.created, "model": model,
                "choices": [], "usage": _usage(turn)}
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


def create_app(service: Service):
    """The FastAPI app serving `service`; its lifespan starts and stops the learner."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="sdpo-fast serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return error(ApiError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(ApiError(400, "malformed request"))

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        too_large = ApiError(413, f"the body is larger than the limit of {service.max_body_bytes} bytes",
                             "request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > service.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > service.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        user = await run_in_threadpool(service.authenticate, request.headers.get("authorization"))
        service.check_rate(user)
        parsed = service.parse(await read_body(request))
        try:
            turn = await run_in_threadpool(service.complete, user, parsed)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged by type only: its message may quote the conversation
            service.log(f"serve: a reply failed ({type(exc).__name__})")
            raise ApiError(500, "internal server error: the reply failed and was not stored",
                           "internal_error") from None
        if parsed.stream:
            return StreamingResponse(_events(turn, service.model_name, parsed.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return _completion(turn, service.model_name)

    @app.get("/v1/models")
    async def models(request: Request):
        await run_in_threadpool(service.authenticate, request.headers.get("authorization"))
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "sdpo-fast"}]}

    @app.get("/v1/me")
    async def me(request: Request):
        user = await run_in_threadpool(service.authenticate, request.headers.get("authorization"))
        return await run_in_threadpool(service.me, user)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html(), headers=PAGE_HEADERS)

    return app
