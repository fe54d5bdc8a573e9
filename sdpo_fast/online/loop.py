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
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from ..data import Interaction, InteractionEncoder, SkipInteraction, default_template_kwargs
from ..loss import distillation_objective
from ..loss.objectives import DISTILLATION_OBJECTIVES
from ..loss.validation import MIN_TEMPERATURE, check_topk_support, check_topk_vocabulary
from ..model import eval_mode, sdpo_attention, unwrap_model
from ..train.config import check_keys, coerce_floats
from ..train.setup import build_optimizer
from ..train.setup import lora_config as make_lora_config
from ..train.step import StepOptions, train_step
from ..train.teachers import TEACHERS, Teacher
from ..utils.checks import check_bool, check_choice, check_int, check_number

PRESETS: dict[str, dict[str, Any]] = {
    # Paper Table 5 (personalization) and the authors' online trainers (see shared/ANCHORS.md).
    # center_advantages / signal_clip: their defaults resolve to the authors' (on, 2.0) in sampled_token mode.
    "paper-personalization": dict(update_every=16, lr=5e-6, max_new_tokens=258, temperature=1.0, lora_r=64,
                                  lora_alpha=128.0),
}
AUTO_SIGNAL_CLIP = 2.0
"""signal_clip "auto" in sampled_token mode: the authors' single-user live trainer's clamp."""


@dataclass
class OnlineConfig:
    """Options of the online loop; `validate()` names the offending field."""

    update_every: int = 16
    """k: interactions per SDPO update (the batch)."""
    lr: float = 5e-6
    """Constant learning rate (AdamW)."""
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    center_advantages: bool | None = None
    """Per-sequence mean-centred advantages (sampled_token only). None: on for sampled_token (the authors' online
    trainer), off for the logit modes."""
    signal_clip: float | str | None = "auto"
    """Clamp each token's advantage to +-this (sampled_token only; None: off). "auto": 2.0 for sampled_token,
    off for the logit modes."""
    ignore_first_k: int = 0
    temperature: float = 1.0
    """Sampling temperature of the policy, and the temperature of the loss's log-probs."""
    max_new_tokens: int = 258
    max_prompt_tokens: int = 2048
    lora_r: int = 64
    """0: update all weights (single-user policies only)."""
    lora_alpha: float = 128.0
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    micro_batch_tokens: int = 8192
    prefix_reuse: bool = True
    attn_backend: str = "auto"
    loss_backend: str = "auto"
    teacher: str = "live"
    """live (current weights, prefix K/V reused), ema or base (own teacher pass; see train/teachers.py). With LoRA
    the teacher is the policy's own adapter: base = adapter disabled, ema = an EMA of that adapter's tensors."""
    teacher_ema_rate: float = 0.05
    """EMA teacher: theta_T <- (1 - rate) theta_T + rate theta_S after each update."""
    distillation_mode: str = "sampled_token"
    """sampled_token (the SDPO policy gradient), full_logits or topk_logits (see sdpo_loss)."""
    distillation_alpha: float = 1.0
    """alpha-divergence of the logit modes: 0 forward KL, 1 reverse KL, 0.5 JSD (sampled_token needs 1)."""
    distillation_topk: int = 100
    distillation_add_tail: bool = True
    seed: int = 0
    importance_clip: float | None = None
    """Weight each token's loss by min(pi(y_t) / mu(y_t), this), mu the probability the sampler drew y_t with
    (recorded at sampling; None: off)."""

    @property
    def resolved_signal_clip(self) -> float | None:
        """signal_clip with "auto" resolved (2.0 for sampled_token, None for the logit modes)."""
        if self.signal_clip == "auto":
            return AUTO_SIGNAL_CLIP if self.distillation_mode == "sampled_token" else None
        return self.signal_clip

    @property
    def resolved_center_advantages(self) -> bool:
        """center_advantages with None resolved (True for sampled_token, False for the logit modes)."""
        if self.center_advantages is None:
            return self.distillation_mode == "sampled_token"
        return self.center_advantages

    def validate(self) -> "OnlineConfig":
        for key, low in (("update_every", 1), ("max_new_tokens", 1), ("max_prompt_tokens", 1),
                         ("micro_batch_tokens", 1), ("ignore_first_k", 0), ("lora_r", 0), ("seed", 0)):
            check_int(key, getattr(self, key), low)
        for key in ("lr", "temperature", "lora_alpha", "weight_decay", "lora_dropout", "max_grad_norm",
                    "importance_clip"):
            check_number(key, getattr(self, key), positive=key not in ("weight_decay", "lora_dropout"),
                         optional=key in ("max_grad_norm", "importance_clip"))
        if self.signal_clip != "auto":
            check_number("signal_clip", self.signal_clip, positive=True, optional=True,
                         what="'auto', None (off) or a finite number > 0")
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be < 1, got {self.lora_dropout!r}")
        if self.temperature < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be >= {MIN_TEMPERATURE} (it is also the loss's temperature), "
                             f"got {self.temperature!r}")
        if self.center_advantages is not None:
            check_bool("center_advantages", self.center_advantages)
        for key in ("prefix_reuse", "distillation_add_tail"):
            check_bool(key, getattr(self, key))
        check_choice("teacher", self.teacher, TEACHERS)
        check_choice("distillation_mode", self.distillation_mode, tuple(DISTILLATION_OBJECTIVES))
        check_int("distillation_topk", self.distillation_topk, 1)
        check_topk_support(self.distillation_mode, self.distillation_topk, self.distillation_add_tail)
        if self.ignore_first_k > self.max_new_tokens:
            raise ValueError(f"ignore_first_k {self.ignore_first_k} > max_new_tokens {self.max_new_tokens} trains "
                             "nothing (a completion has at most max_new_tokens + 1 tokens, the end of turn included, "
                             "and all are left out of the loss); lower ignore_first_k")
        for key in ("teacher_ema_rate", "distillation_alpha"):
            check_number(key, getattr(self, key), positive=key == "teacher_ema_rate")
            if getattr(self, key) > 1:
                raise ValueError(f"{key} must be at most 1, got {getattr(self, key)!r}")
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1:
            raise ValueError("distillation_alpha must be 1 with distillation_mode sampled_token, got "
                             f"{self.distillation_alpha!r}")
        if self.distillation_mode != "sampled_token":
            if self.signal_clip not in ("auto", None):
                raise ValueError(f"signal_clip applies to distillation_mode sampled_token only; unset it for "
                                 f"{self.distillation_mode} (got {self.signal_clip!r})")
            if self.center_advantages:
                raise ValueError(f"center_advantages applies to distillation_mode sampled_token only; unset it for "
                                 f"{self.distillation_mode}")
        targets = self.lora_target_modules
        if not (targets == "all-linear" or (isinstance(targets, list) and targets
                                            and all(isinstance(t, str) and t for t in targets))):
            raise ValueError(f"lora_target_modules must be 'all-linear' or a list of module names, got {targets!r}")
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "OnlineConfig":
        """A config from PRESETS[name], with `overrides` on top."""
        return resolve_online_config(overrides=overrides, preset=name)


def resolve_online_config(file_values: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, *,
                          preset: str | None = None, defaults: dict[str, Any] | None = None) -> OnlineConfig:
    """OnlineConfig defaults < `defaults` (e.g. the demo's settings) < PRESETS[preset] < file values (a YAML
    mapping of field names, see `train.config.load_yaml`) < `overrides` (the flags given); validated. Unknown keys
    are rejected with the list of valid ones."""
    file_values, overrides = dict(file_values or {}), dict(overrides or {})
    check_keys(OnlineConfig, file_values, "config file")
    check_keys(OnlineConfig, overrides, "OnlineConfig")
    merged = dict(defaults or {})
    if preset is not None:
        check_choice("preset", preset, tuple(PRESETS))
        merged.update(PRESETS[preset])
    merged.update(file_values)
    merged.update(overrides)
    return OnlineConfig(**coerce_floats(OnlineConfig, merged)).validate()


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
    return make_lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules)


@dataclass(frozen=True)
class Sample:
    """One sampled reply: its decoded text (special tokens skipped, stripped) and the sampled token ids, up to
    and including the stop token when one was sampled (a reply cut at max_new_tokens has none); logprobs: the
    log of the probability the sampler drew each of those ids with (its distribution at the sampling
    temperature), or None when not recorded."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None


@torch.no_grad()
def sample_batch(model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int,
                 temperature: float = 1.0, seed: int = 0, stop_token_ids: list[int] | None = None,
                 logprobs: bool = False) -> list[Sample]:
    """One reply per chat in `conversations`, generated together (left padding; HF generate; full-distribution
    sampling at `temperature`, greedy at 0).

    The global RNG is left untouched: sampling uses its own seed. stop_token_ids default: the tokenizer's eos.
    logprobs: record each Sample's log-probs, log_softmax of generate's processed scores (logits / temperature)
    at the sampled id; needs temperature > 0 (greedy decoding draws from no distribution).
    """
    if logprobs and not temperature > 0:
        raise ValueError("logprobs need temperature > 0: greedy decoding has no sampling distribution to record "
                         "(importance clipping needs a sampled policy)")
    prompts = chat_prompt_ids(tokenizer, conversations)
    device = unwrap_model(model).get_input_embeddings().weight.device
    stops = stop_token_ids if stop_token_ids is not None else [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    sampling = dict(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0) if temperature > 0 \
        else dict(do_sample=False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), eval_mode(model):
        torch.manual_seed(seed)
        recorded = dict(output_scores=True, return_dict_in_generate=True) if logprobs else {}
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad, **sampling, **recorded)
    if not logprobs:
        return [make_sample(tokenizer, row, stops) for row in out[:, width:].tolist()]
    generated = out.sequences[:, width:]
    # one (batch, V) step at a time: the scores of a whole reply would be (batch, steps, V)
    sampled = torch.stack([torch.log_softmax(scores.float(), -1).gather(1, generated[:, t, None])[:, 0]
                           for t, scores in enumerate(out.scores)], 1)
    return [make_sample(tokenizer, row, stops, lps) for row, lps in zip(generated.tolist(), sampled.tolist())]


def chat_prompt_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """The chat-template prompt ids (generation prompt added, thinking off where the template has the switch)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; set tokenizer.chat_template")
    kwargs = default_template_kwargs(tokenizer.chat_template)
    return [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True, **kwargs),
                      add_special_tokens=False)["input_ids"] for m in conversations]


def make_sample(tokenizer, generated: list[int], stop_token_ids: list[int],
                logprobs: list[float] | None = None) -> Sample:
    """A Sample of the generated ids (and their log-probs, same length), cut after the first stop token (what
    follows is padding)."""
    end = next((i + 1 for i, t in enumerate(generated) if t in stop_token_ids), len(generated))
    ids = tuple(generated[:end])
    return Sample(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids,
                  None if logprobs is None else tuple(logprobs[:end]))


def generate_batch(model, tokenizer, conversations: list[list[dict]], **options) -> list[str]:
    """The texts of `sample_batch` (same options)."""
    return [s.text for s in sample_batch(model, tokenizer, conversations, **options)]


def generate(model, tokenizer, messages: list[dict], **options) -> str:
    """`generate_batch` for one chat."""
    return generate_batch(model, tokenizer, [messages], **options)[0]


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
        self.optimizer = build_optimizer(params, "adamw", config.lr, config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        self.objective = distillation_objective(
            config.distillation_mode, temperature=config.temperature, alpha=config.distillation_alpha,
            topk=config.distillation_topk, add_tail=config.distillation_add_tail,
            signal_clip=config.resolved_signal_clip, center_advantages=config.resolved_center_advantages,
            importance_clip=config.importance_clip, backend=config.loss_backend)
        self.teacher = self.new_teacher()
        self.step_options = StepOptions(micro_batch_tokens=config.micro_batch_tokens,
                                        ignore_first_k=config.ignore_first_k, aggregation="sequence",
                                        max_grad_norm=config.max_grad_norm, prefix_reuse=config.prefix_reuse,
                                        attn_backend=config.attn_backend)
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
