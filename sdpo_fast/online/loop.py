"""Online SDPO (the paper's Algorithm 1): the policy answers, the user replies, and every `update_every`
interactions the policy is updated from its own (x, y, u) samples with the hindsight teacher (live by default;
ema or base, see train/teachers.py).

Each update is one `train_step` (train/step.py) with the objective of `distillation_mode`; in sampled_token mode
per-sequence mean-centred advantages (A'_t = A_t - mean_seq(A), then the signal clip) are formed inside that
step's single `sdpo_loss` call.
"""
from __future__ import annotations

import collections
import contextlib
from typing import NamedTuple

import torch

from ..data import Interaction, InteractionEncoder, SkipInteraction
from ..loss.validation import check_topk_vocabulary
from ..model import sdpo_attention, unwrap_model
from ..model.generation import Sample, chat_prompt_ids, generate, generate_batch, make_sample, sample_batch
from ..train.build import make_optimizer, make_scheduler, objective_of, step_options
from ..train.options import AUTO_SIGNAL_CLIP
from ..train.step import train_step
from ..train.teachers import Teacher
from ..utils.checks import check_int
from .config import PRESETS, OnlineConfig, resolve_online_config

__all__ = ["AUTO_SIGNAL_CLIP", "EmptyGenerationError", "OnlineConfig", "OnlinePolicy", "PRESETS", "PendingInteraction",
           "Sample", "adapter_parameters", "chat_prompt_ids", "check_messages", "generate", "generate_batch",
           "lora_config", "make_sample", "prompt_messages", "resolve_online_config", "run_online", "sample_batch"]

RECENT_SAMPLES = 256
"""Replies whose sampled ids (and log-probs) a policy remembers for `observe` calls that pass only the text."""


class PendingInteraction(NamedTuple):
    """An interaction waiting for the next update, with the reply's sampled ids and their sampler log-probs
    when known."""

    interaction: Interaction
    completion_ids: tuple[int, ...] | None
    completion_logprobs: tuple[float, ...] | None = None


class EmptyGenerationError(ValueError):
    """The policy produced no text for a prompt."""


def lora_config(config: OnlineConfig):
    """The peft LoraConfig of `config`."""
    return config.lora_config()


def adapter_parameters(model, adapter_name: str) -> list[torch.nn.Parameter]:
    """The LoRA parameters of adapter `adapter_name` in a peft model."""
    found = []
    for name, param in model.named_parameters():
        parts = name.split(".")
        if any(parts[i].startswith("lora_") and parts[i + 1] == adapter_name for i in range(len(parts) - 1)):
            found.append(param)
    return found


class OnlinePolicy:
    """A policy that answers and learns online: a peft model's adapter `adapter_name` (LoRA), or the whole
    model (lora_r 0, adapter_name None).

    Several policies may share one peft model, each with its own adapter and optimizer: before each use the
    policy activates its adapter and makes only that adapter trainable.

    Updates learn from the sampled token ids of the replies (on-policy exactly, even where re-tokenizing the
    text would give other ids). generator: None samples with Hugging Face generate; else an object with
    `sample(policy, conversations, seed) -> list[Sample]` (e.g. `VLLMGenerator`), whose Samples carry logprobs
    when config.importance_clip is set (the sampler's log-probs weight the update, see `OnlineConfig`).
    """

    def __init__(self, model, tokenizer, config: OnlineConfig, adapter_name: str | None = "default",
                 generator=None):
        config.validate()
        self.model, self.tokenizer, self.config, self.adapter_name = model, tokenizer, config, adapter_name
        if adapter_name is None:
            unwrap_model(model)
            params = [p for p in model.parameters() if p.requires_grad]
        else:
            params = adapter_parameters(model, adapter_name)
            if not params:
                raise ValueError(f"the model has no LoRA adapter named {adapter_name!r}")
        if not params:
            raise ValueError("the model has no trainable parameters")
        check_topk_vocabulary(config.distillation_mode, config.distillation_topk,
                              model.get_output_embeddings().weight.shape[0])
        self.parameters = params
        self.optimizer = make_optimizer(params, config)
        self.scheduler = make_scheduler(self.optimizer, config, total=1)
        self.objective, self.step_options = objective_of(config), step_options(config)
        self.teacher = self.new_teacher()
        self.encoder = InteractionEncoder(tokenizer, max_prompt_tokens=config.max_prompt_tokens,
                                          max_completion_tokens=config.max_new_tokens + 1)
        self.stop_token_ids = sorted({self.encoder.end_of_turn_id, tokenizer.eos_token_id} - {None})
        self.generator = generator
        self.pending: list[PendingInteraction] = []
        self.recent: collections.OrderedDict[str, Sample] = collections.OrderedDict()
        self.generations = 0
        self.updates = 0

    def new_teacher(self) -> Teacher:
        """config.teacher over this policy's own weights as they are now: the live weights; base (LoRA: this
        adapter disabled; lora_r 0: a frozen copy of the model); ema (LoRA: a copy of this adapter's tensors only;
        lora_r 0: a copy of the model), starting from the current weights."""
        with self.active():  # Teacher takes the trainable tensors: this adapter's alone
            return Teacher(self.model, self.config.teacher, self.config.teacher_ema_rate)

    @contextlib.contextmanager
    def active(self):
        """This policy's adapter active and the only trainable parameters (the whole model when no adapter)."""
        if self.adapter_name is not None:
            self.model.set_adapter(self.adapter_name)
            mine = {id(p) for p in self.parameters}
            for p in self.model.parameters():
                p.requires_grad_(id(p) in mine)
        yield

    def respond_batch(self, conversations: list[list[dict]]) -> list[str]:
        """Sample one reply per chat, together (seeded by config.seed and this policy's generation count); an
        empty string where the policy ended the turn at once. The samples are remembered for `observe`."""
        samples = self._sample(conversations)
        for sample in samples:
            if sample.text:
                self.recent[sample.text] = sample
                self.recent.move_to_end(sample.text)
        while len(self.recent) > RECENT_SAMPLES:
            self.recent.popitem(last=False)
        return [s.text for s in samples]

    def _sample(self, conversations: list[list[dict]]) -> list[Sample]:
        if not isinstance(conversations, list) or not conversations:
            raise ValueError("conversations must be a non-empty list of chats")
        for i, messages in enumerate(conversations):
            check_messages(messages, f"conversations[{i}]", last_role="user")
        seed = self.config.seed * 1_000_003 + self.generations
        self.generations += len(conversations)
        if self.generator is not None:
            samples = self.generator.sample(self, conversations, seed)
        else:
            with self.active():
                samples = sample_batch(self.model, self.tokenizer, conversations, seed=seed,
                                       max_new_tokens=self.config.max_new_tokens, temperature=self.config.temperature,
                                       stop_token_ids=self.stop_token_ids, logprobs=self.wants_logprobs)
        if self.wants_logprobs and any(s.logprobs is None or len(s.logprobs) != len(s.token_ids) for s in samples):
            raise ValueError("importance_clip is set but the sampler returned no log-probs for its tokens")
        return samples

    @property
    def wants_logprobs(self) -> bool:
        """Whether samples must record the sampler's log-probs (config.importance_clip is set)."""
        return self.config.importance_clip is not None

    def respond(self, messages: list[dict]) -> str:
        """One sampled reply; raises EmptyGenerationError when it is empty."""
        check_messages(messages, "messages", last_role="user")
        text = self.respond_batch([messages])[0]
        if not text:
            raise EmptyGenerationError("the policy generated no text for this prompt (it ended the turn at once)")
        return text

    def observe(self, messages: list[dict], response: str, followup: str,
                response_ids: list[int] | tuple[int, ...] | None = None,
                response_logprobs: list[float] | tuple[float, ...] | None = None) -> dict | None:
        """Buffer (x, y, u); run an update when `update_every` are buffered. Returns the update's stats or None.

        response_ids: y's sampled token ids, response_logprobs: the sampler's log-prob of each; default: those
        of this policy's recent reply with exactly this text, else (a reply not sampled here, or too long ago)
        the tokenized text without log-probs. With importance_clip, a reply without log-probs is refused
        (ValueError, nothing buffered).
        """
        if response_ids is None:
            if response_logprobs is not None:
                raise ValueError("response_logprobs needs the response_ids they belong to")
            recent = self.recent.pop(response, None)
            if recent is not None:
                response_ids, response_logprobs = recent.token_ids, recent.logprobs
        if self.wants_logprobs and response_logprobs is None:
            raise ValueError("importance_clip needs the sampler's log-probs of the reply: observe a reply this "
                             "policy sampled (respond/respond_batch), or pass response_ids and response_logprobs")
        self.pending.append(PendingInteraction(Interaction(list(messages), response, followup),
                                               None if response_ids is None else tuple(response_ids),
                                               None if response_logprobs is None else tuple(response_logprobs)))
        if len(self.pending) < self.config.update_every:
            return None
        return self.update()

    def update(self) -> dict | None:
        """One SDPO step on the buffered interactions (None when nothing is buffered); empties the buffer."""
        batch, self.pending = self.pending, []
        encoded, skipped = [], 0
        for item in batch:
            try:
                encoded.append(self.encoder.encode(item.interaction, completion_ids=item.completion_ids,
                                                   completion_logprobs=item.completion_logprobs))
            except SkipInteraction:
                skipped += 1
        retokenized = sum(item.completion_ids is None for item in batch)
        if not encoded:
            return {"interactions": 0, "skipped": skipped, "retokenized": retokenized} if batch else None
        with self.active(), sdpo_attention(unwrap_model(self.model)):  # generation keeps its own attention
            self.model.train()
            stats = train_step(self.model, encoded, self.objective, self.optimizer, self.scheduler,
                               self.step_options, teacher=self.teacher)
        self.updates += 1
        return {"loss": stats.loss, self.objective.signal_name: stats.mean_signal, "loss_tokens": stats.loss_tokens,
                "grad_norm": stats.grad_norm, "interactions": len(encoded), "skipped": skipped,
                "retokenized": retokenized}

    def interact_batch(self, conversations: list[list[dict]], user) -> list[dict]:
        """Algorithm 1 for several prompts at once (at most up to the next update, so every reply comes from the
        current weights): y ~ policy(x), u = user(x, y), learn from (x, y, u) when a batch is full.

        Returns per prompt {"response", "followup", "update"}; an empty reply is not shown to the user (followup
        None). "update" holds the stats of an update triggered by that interaction, else None.
        """
        room = self.config.update_every - len(self.pending)
        if len(conversations) > room:
            raise ValueError(f"at most {room} prompts fit before the next update, got {len(conversations)}")
        out = []
        for messages, sample in zip(conversations, self._sample(conversations)):
            if not sample.text:
                out.append({"response": "", "followup": None, "update": None})
                continue
            followup = user.reply(messages, sample.text)
            out.append({"response": sample.text, "followup": followup,
                        "update": self.observe(messages, sample.text, followup, sample.token_ids,
                                               sample.logprobs)})
        return out

    def room(self) -> int:
        """Interactions until the next update."""
        return self.config.update_every - len(self.pending)


def check_messages(messages, name: str, last_role: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{name} must be a non-empty list of {{'role', 'content'}} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise ValueError(f"{name}[{i}] must be a dict with role system/user/assistant and str content")
    if messages[-1]["role"] != last_role:
        raise ValueError(f"{name} must end with a {last_role} message, got {messages[-1]['role']!r}")


def prompt_messages(prompt: str, system: str | None = None) -> list[dict]:
    """A one-turn conversation for `prompt`, with an optional system message."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def run_online(policy: OnlinePolicy, user, prompts: list[str], n_interactions: int, *,
               callback=None) -> list[dict]:
    """Algorithm 1 over `n_interactions` prompts taken from `prompts` in turn; `callback(i, record)` after each
    interaction i (1-based). Returns per-interaction records without the texts (response length, update stats)."""
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    check_int("n_interactions", n_interactions, 1)
    records: list[dict] = []
    while len(records) < n_interactions:
        n = min(policy.room(), n_interactions - len(records))
        prompts_now = [prompts[(len(records) + j) % len(prompts)] for j in range(n)]
        for out in policy.interact_batch([prompt_messages(p) for p in prompts_now], user):
            record = {"interaction": len(records) + 1, "response_words": len(out["response"].split()),
                      "empty": not out["response"], "update": out["update"]}
            records.append(record)
            if callback is not None:
                callback(record["interaction"], record)
    return records
