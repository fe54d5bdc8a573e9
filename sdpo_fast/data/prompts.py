"""Student and teacher token ids for one interaction (paper, Table 1).

student = chat_template(history, generation prompt) + completion ids
teacher = chat_template(history with the hindsight block appended to its last user message,
          generation prompt) + the same completion ids
"""
from __future__ import annotations

import collections
from typing import Iterable

from ..model.generation import default_template_kwargs
from ..model.inputs import EncodedInteraction
from ..utils.checks import check_choice, check_int, is_finite_number
from .interactions import Interaction

DEFAULT_HINDSIGHT_TEMPLATE = (
    "\n\n<hindsight context> The following is a future user message. "
    "Use this to guide your answer to the user prompt: {followup}"
)
"""Paper Table 1 wording, appended to the content of the last user message; `{followup}` is the
next user message."""

AUTHORS_CODE_HINDSIGHT_TEMPLATE = (
    "\n\n=== HINDSIGHT CONTEXT ===\n"
    "[The following is a future user message. Use this to guide your answer to the user prompt.]\n"
    "{followup}"
)
"""An earlier wording left commented out in the authors' offline trainer."""

AUTHORS_OFFLINE_HINDSIGHT_TEMPLATE = (
    "\n\n[HINDSIGHT CONTEXT]\n"
    "The following is a user response to your previous, insufficient attempt. "
    "Improve your response to the user prompt.\n"
    "Future User Message: {followup}"
)
"""The authors' offline trainer (OfflineSDPOCollator): appended to the history's last message, with the
follow-up stripped."""

HINDSIGHT_TEMPLATES = {"table1": DEFAULT_HINDSIGHT_TEMPLATE, "authors-offline": AUTHORS_OFFLINE_HINDSIGHT_TEMPLATE}
"""Names accepted for `hindsight_template`."""

PROMPT_TRUNCATIONS = ("drop-turns", "left")

_FOLLOWUP_SLOT = "{followup}"
_SENTINEL = "\u2063sdpo-end-of-turn-probe\u2063"


class SkipInteraction(Exception):
    """An interaction that cannot be encoded; `reason` is a short fixed string used as a count key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def encode_interaction(
    tokenizer,
    interaction: Interaction,
    *,
    hindsight_template: str = DEFAULT_HINDSIGHT_TEMPLATE,
    max_prompt_tokens: int = 2048,
    max_completion_tokens: int = 2048,
    end_of_turn_token: str | int | None = "auto",
    chat_template_kwargs: dict | None = None,
    chat_template: str | None = None,
    prompt_truncation: str = "drop-turns",
) -> EncodedInteraction:
    """Encode one interaction; raises SkipInteraction when it cannot fit or is empty.

    hindsight_template: text with a `{followup}` slot (substituted literally; other braces stay as
      they are), appended to the content of the history's last user message for the teacher; or a name in
      HINDSIGHT_TEMPLATES: "table1" (the default wording), "authors-offline" (the authors' offline trainer:
      follow-up stripped, block appended to the history's last message whatever its role).
    end_of_turn_token: appended to the completion ids so student and teacher targets end the turn;
      "auto" = the first special token the chat template puts after an assistant message (else
      eos), a token string or id, or None to append nothing.
    Limits: the completion ids (end-of-turn included) are cut at the end to max_completion_tokens; a
      cut completion has no end-of-turn since the reply did not end there. The oldest history
      messages are dropped (a leading system message is kept, the history still starts with a user
      message) until both prompts fit max_prompt_tokens; if even the last user turn does not fit the
      interaction is skipped ("prompt_too_long"). prompt_truncation="left" instead cuts each prompt's ids
      from the left to max_prompt_tokens (the authors' trainer; the cut may remove the chat template's start).
    chat_template_kwargs: passed to apply_chat_template; enable_thinking defaults to False for
      templates that use it (Qwen3). chat_template: overrides tokenizer.chat_template.
    """
    return InteractionEncoder(
        tokenizer, hindsight_template, max_prompt_tokens, max_completion_tokens,
        end_of_turn_token, chat_template_kwargs, chat_template, prompt_truncation,
    ).encode(interaction)


def encode_interactions(
    tokenizer, interactions: Iterable[Interaction], **options
) -> tuple[list[EncodedInteraction], collections.Counter]:
    """encode_interaction over `interactions` (same keyword options); returns the encoded ones and
    the counts of skipped ones by reason."""
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise TypeError(f"encode_interactions got unknown options {unknown}; allowed: {sorted(_OPTIONS)}")
    encoder = InteractionEncoder(tokenizer, **options)
    encoded, skipped = [], collections.Counter()
    for interaction in interactions:
        try:
            encoded.append(encoder.encode(interaction))
        except SkipInteraction as skip:
            skipped[skip.reason] += 1
    return encoded, skipped


_OPTIONS = frozenset(
    {"hindsight_template", "max_prompt_tokens", "max_completion_tokens", "end_of_turn_token",
     "chat_template_kwargs", "chat_template", "prompt_truncation"}
)


def checked_logprobs(values, n: int) -> list[float]:
    """`values` as a list of n log-probabilities (finite floats <= 0); ValueError naming completion_logprobs."""
    if not isinstance(values, (list, tuple)) or len(values) != n or not all(
            is_finite_number(x) and x <= 0 for x in values):
        raise ValueError(f"completion_logprobs must be {n} finite log-probabilities <= 0 (one per completion id)")
    return [float(x) for x in values]


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def same_text(decoded: str, content: str) -> bool:
    """Whether token ids decoded (special tokens skipped) give the message's content, up to surrounding
    whitespace."""
    return decoded.strip() == content.strip()


class InteractionEncoder:
    """encode_interaction's options checked once (end-of-turn id resolved); `.encode(interaction)`
    returns an EncodedInteraction or raises SkipInteraction. Same keyword options as encode_interaction."""

    def __init__(
        self,
        tokenizer,
        hindsight_template: str = DEFAULT_HINDSIGHT_TEMPLATE,
        max_prompt_tokens: int = 2048,
        max_completion_tokens: int = 2048,
        end_of_turn_token: str | int | None = "auto",
        chat_template_kwargs: dict | None = None,
        chat_template: str | None = None,
        prompt_truncation: str = "drop-turns",
    ):
        self.authors_offline = hindsight_template == "authors-offline"
        if isinstance(hindsight_template, str):
            hindsight_template = HINDSIGHT_TEMPLATES.get(hindsight_template, hindsight_template)
        if not isinstance(hindsight_template, str) or _FOLLOWUP_SLOT not in hindsight_template:
            raise ValueError(f"hindsight_template must be one of {sorted(HINDSIGHT_TEMPLATES)} or a str containing "
                             f"{_FOLLOWUP_SLOT!r}")
        check_choice("prompt_truncation", prompt_truncation, PROMPT_TRUNCATIONS)
        self.prompt_truncation = prompt_truncation
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
            raise TypeError(f"chat_template_kwargs must be a dict or None, got {type(chat_template_kwargs).__name__}")
        template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                "the tokenizer has no chat template: pass chat_template='<jinja template>' (or set "
                "tokenizer.chat_template = ...) or use a tokenizer whose tokenizer_config.json has one "
                "(instruct/chat checkpoints usually do)"
            )
        self.tokenizer = tokenizer
        self.hindsight_template = hindsight_template
        check_int("max_prompt_tokens", max_prompt_tokens, 1)
        check_int("max_completion_tokens", max_completion_tokens, 1)
        self.max_prompt_tokens, self.max_completion_tokens = max_prompt_tokens, max_completion_tokens
        self.template_kwargs = dict(chat_template_kwargs or {})
        if chat_template is not None:
            self.template_kwargs["chat_template"] = chat_template
        for key, value in default_template_kwargs(template).items():
            self.template_kwargs.setdefault(key, value)
        self.end_of_turn_id = self._resolve_end_of_turn(end_of_turn_token)

    def encode(self, interaction: Interaction, completion_ids: list[int] | tuple[int, ...] | None = None,
               completion_logprobs: list[float] | tuple[float, ...] | None = None) -> EncodedInteraction:
        """completion_ids: the completion's own token ids when known (an online policy's sampled ids, its stop
        token included), used as they are (cut to max_completion_tokens) instead of re-tokenizing the text;
        default: the interaction's completion_ids (from the data) if any. completion_logprobs: the sampler's
        log-prob of each of those ids (same length, finite, <= 0; cut with them), kept as the encoded
        interaction's behavior_logprobs; default: the interaction's completion_logprobs when its ids are used.
        Bad explicit arguments raise ValueError; bad ids from the data skip the interaction
        ("token_ids_out_of_vocab", "logprobs_length_mismatch", and "token_ids_text_mismatch" for ids that do not
        decode to the message's content: the text the teacher's hindsight and the follow-up were about)."""
        if not interaction.completion.strip():
            raise SkipInteraction("empty_completion")
        if not interaction.followup.strip():
            raise SkipInteraction("empty_followup")
        if completion_ids is None and completion_logprobs is not None:
            raise ValueError("completion_logprobs needs the completion_ids they belong to")
        logprobs = None
        if completion_ids is not None:
            completion_ids = self._checked_ids(completion_ids)
            if completion_logprobs is not None:
                logprobs = checked_logprobs(completion_logprobs, len(completion_ids))
        elif interaction.completion_ids is not None:
            completion_ids = list(interaction.completion_ids)
            if not all(isinstance(i, int) and 0 <= i < len(self.tokenizer) for i in completion_ids):
                raise SkipInteraction("token_ids_out_of_vocab")
            if not same_text(self.tokenizer.decode(completion_ids, skip_special_tokens=True), interaction.completion):
                raise SkipInteraction("token_ids_text_mismatch")
            if interaction.completion_logprobs is not None:
                if len(interaction.completion_logprobs) != len(completion_ids):
                    raise SkipInteraction("logprobs_length_mismatch")
                logprobs = list(interaction.completion_logprobs)
        if completion_ids is None:
            completion_ids = self._completion_ids(interaction.completion)
        else:
            completion_ids = completion_ids[: self.max_completion_tokens]
            logprobs = None if logprobs is None else logprobs[: self.max_completion_tokens]
        if not completion_ids:
            raise SkipInteraction("empty_completion")
        student, teacher = self._prompt_ids(interaction)
        return EncodedInteraction(
            student_input_ids=student + completion_ids,
            teacher_input_ids=teacher + completion_ids,
            completion_ids=completion_ids,
            shared_prefix_len=common_prefix_len(student, teacher),
            behavior_logprobs=logprobs,
        )

    def _completion_ids(self, completion: str) -> list[int]:
        ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
        if self.end_of_turn_id is None:
            return ids[: self.max_completion_tokens]
        if len(ids) + 1 <= self.max_completion_tokens:
            return ids + [self.end_of_turn_id]
        return ids[: self.max_completion_tokens]

    def _checked_ids(self, ids) -> list[int]:
        vocab_size = len(self.tokenizer)
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
            raise ValueError(f"completion_ids must be a list of token ids in [0, {vocab_size})")
        return list(ids)

    def _prompt_ids(self, interaction: Interaction) -> tuple[list[int], list[int]]:
        history = interaction.history
        last_user = max((i for i, m in enumerate(history) if m["role"] == "user"), default=None)
        if last_user is None:
            raise SkipInteraction("no_user_message_in_history")
        followup = interaction.followup.strip() if self.authors_offline else interaction.followup
        block = self.hindsight_template.replace(_FOLLOWUP_SLOT, followup)
        at = len(history) - 1 if self.authors_offline else last_user
        teacher_history = list(history)
        teacher_history[at] = {**history[at], "content": history[at]["content"] + block}
        if self.prompt_truncation == "left":
            cut = self.max_prompt_tokens
            return self._render(history)[-cut:], self._render(teacher_history)[-cut:]
        start = 1 if history[0]["role"] == "system" else 0
        # Candidate first kept messages: user turns, oldest first, up to the last user turn.
        for first in [i for i in range(start, last_user + 1) if history[i]["role"] == "user"]:
            student = self._render(history[:start] + history[first:])
            if len(student) > self.max_prompt_tokens:
                continue
            teacher = self._render(teacher_history[:start] + teacher_history[first:])
            if len(teacher) <= self.max_prompt_tokens:
                return student, teacher
        raise SkipInteraction("prompt_too_long")

    def _render(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _resolve_end_of_turn(self, token) -> int | None:
        if token is None:
            return None
        vocab_size = len(self.tokenizer)
        if isinstance(token, int) and not isinstance(token, bool):
            if not 0 <= token < vocab_size:
                raise ValueError(f"end_of_turn_token id {token} is outside the vocabulary [0, {vocab_size})")
            return token
        if not isinstance(token, str):
            raise TypeError(f"end_of_turn_token must be 'auto', a token string, an id or None, got {type(token).__name__}")
        if token != "auto":
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == self.tokenizer.unk_token_id or self.tokenizer.convert_ids_to_tokens(token_id) != token:
                raise ValueError(f"end_of_turn_token {token!r} is not a single token of this tokenizer")
            return token_id
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
        text = self.tokenizer.apply_chat_template(probe, tokenize=False, **self.template_kwargs)
        at = text.rfind(_SENTINEL)
        if at >= 0:
            special = {i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
            tail_ids = self.tokenizer(text[at + len(_SENTINEL):], add_special_tokens=False)["input_ids"]
            found = next((i for i in tail_ids if i in special), None)
            if found is not None:
                return found
        if self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        raise ValueError("could not detect the end-of-turn token: pass end_of_turn_token='<token>' (or None)")
