"""vLLM as the online policy's sampler (optional: `pip install vllm`, CUDA GPU).

vLLM holds the frozen base model; the policy's LoRA adapter is written to disk after each update and passed
with the next batch as a new `LoRARequest`, so every reply comes from the current weights. The update still
scores the sampled ids with the training model (Hugging Face forward), as the paper's on-policy loop does.

For importance clipping the engine runs with `logprobs_mode="processed_logprobs"` (vLLM's log-probs after
temperature and the other processors, i.e. of the distribution it sampled from; its default, raw_logprobs, is the
model's distribution before temperature) and each request asks for `logprobs=0` (the sampled token's log-prob
only). vLLM takes those log-probs after top-p from 0.10.2 on (TopKTopPSampler returns them); with an older vLLM,
a top_p below 1 is refused when log-probs are recorded.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from packaging.version import Version

from ..model.generation import Sample, chat_prompt_ids, make_sample
from .adapters import write_adapter


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for `max_lora_rank`."""


def vllm_max_lora_rank(lora_r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that serves adapters of rank `lora_r`."""
    for rank in VLLM_LORA_RANKS:
        if lora_r <= rank:
            return rank
    raise ValueError(f"lora_r {lora_r} is above {VLLM_LORA_RANKS[-1]}, the largest LoRA rank vLLM serves; "
                     f"use --lora-r <= {VLLM_LORA_RANKS[-1]} or --generation hf")


class VLLMGenerator:
    """`sample(policy, conversations, seed)` for `OnlinePolicy(generator=...)` and `UserAdapters(generator=...)`.

    model: the base model's Hugging Face id or local path (the one the policy's peft model wraps).
    max_lora_rank: the policy's lora_r (vLLM is given the smallest rank it accepts above it, see
    `vllm_max_lora_rank`). gpu_memory_utilization: vLLM's share of the GPU; the rest is
    left to training. adapter_dir: where adapters are written (default: a new temporary directory).
    engine_options: more `vllm.LLM` arguments (dtype, max_model_len, enforce_eager, ...). behavior_logprobs:
    record the sampled tokens' log-probs (needed by a policy with importance_clip; needs a vLLM with the
    logprobs_mode engine option, 0.10 and later). top_p_logprobs: whether those log-probs are of the top-p
    nucleus sampled from (vLLM 0.10.2 and later).
    """

    def __init__(self, model: str, *, max_lora_rank: int, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 adapter_dir: str | Path | None = None, behavior_logprobs: bool = False, **engine_options):
        served_rank = vllm_max_lora_rank(max_lora_rank)
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise ValueError("generation backend 'vllm' needs vLLM (pip install vllm; CUDA GPU); or use 'hf'") from None
        if not isinstance(gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization!r}")
        self._vllm, self._lora_request = vllm, LoRARequest
        self.behavior_logprobs = behavior_logprobs
        self.top_p_logprobs = Version(getattr(vllm, "__version__", "0")).release >= (0, 10, 2)
        if behavior_logprobs:
            if engine_options.setdefault("logprobs_mode", "processed_logprobs") != "processed_logprobs":
                raise ValueError("behavior_logprobs needs logprobs_mode 'processed_logprobs' (the log-probs of the "
                                 f"distribution sampled from), got {engine_options['logprobs_mode']!r}")
        self.llm = vllm.LLM(model=str(model), enable_lora=True, max_lora_rank=served_rank,
                            gpu_memory_utilization=gpu_memory_utilization, seed=seed, **engine_options)
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else Path(tempfile.mkdtemp(prefix="sdpo-vllm-"))
        self.adapter_dir.mkdir(parents=True, exist_ok=True)
        self._current: dict[str, tuple[int, object, Path]] = {}
        self._next_id = 1

    def lora_request(self, policy):
        """The LoRARequest of the policy's adapter as of its latest update (written once per update)."""
        if policy.adapter_name is None:
            raise ValueError("generation backend 'vllm' needs a LoRA policy (lora_r >= 1): vLLM serves the "
                             "adapter next to the frozen base weights")
        name = policy.adapter_name
        current = self._current.get(name)
        if current is not None and current[0] == policy.updates:
            return current[1]
        path = self.adapter_dir / f"{name}-update{policy.updates}"
        shutil.rmtree(path, ignore_errors=True)
        write_adapter(policy.model, name, path)
        request = self._lora_request(f"{name}-update{policy.updates}", self._next_id, str(path))
        self._next_id += 1
        if current is not None:  # vLLM never asks for an older adapter again
            shutil.rmtree(current[2], ignore_errors=True)
        self._current[name] = (policy.updates, request, path)
        return request

    def sample(self, policy, conversations: list[list[dict]], seed: int, *, temperature: float | None = None,
               top_p: float = 1.0, max_new_tokens: int | None = None) -> list[Sample]:
        """One reply per chat from the policy's current adapter; request i is seeded with seed + i. The Samples
        carry the sampled tokens' log-probs when the policy wants them (policy.wants_logprobs).

        temperature (0: greedy), top_p, max_new_tokens: this call's sampling (default: the policy's config).
        """
        config = policy.config
        temperature = config.temperature if temperature is None else temperature
        want = policy.wants_logprobs
        if want and not self.behavior_logprobs:
            raise ValueError("the policy has importance_clip but this VLLMGenerator records no log-probs: build it "
                             "with behavior_logprobs=True")
        if want and not temperature > 0:
            raise ValueError("logprobs need temperature > 0: greedy decoding has no sampling distribution to record "
                             "(importance clipping needs a sampled policy)")
        if want and top_p < 1 and not self.top_p_logprobs:
            raise ValueError(f"top_p {top_p} with importance clipping needs vLLM 0.10.2 or later (earlier ones record "
                             "log-probs before top-p); use top_p 1 or upgrade vLLM")
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=ids)
                   for ids in chat_prompt_ids(policy.tokenizer, conversations)]
        extra = {"logprobs": 0} if want else {}
        params = [self._vllm.SamplingParams(temperature=temperature, top_p=top_p,
                                            max_tokens=max_new_tokens or config.max_new_tokens,
                                            stop_token_ids=list(policy.stop_token_ids), seed=seed + i, **extra)
                  for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request(policy), use_tqdm=False)
        return [make_sample(policy.tokenizer, list(out.outputs[0].token_ids), policy.stop_token_ids,
                            sampled_logprobs(out.outputs[0]) if want else None)
                for out in outputs]


def sampled_logprobs(completion) -> list[float]:
    """The log-prob of each sampled token of a vLLM CompletionOutput: `completion.logprobs` holds one
    {token_id: Logprob} per token of `completion.token_ids` (with logprobs=0, the sampled one; with more, the top
    ones besides). Values are capped at 0 (rounding)."""
    ids, per_token = list(completion.token_ids), completion.logprobs
    if per_token is None or len(per_token) != len(ids):
        raise ValueError("vLLM returned no log-prob for some sampled tokens (was the request made with logprobs=0?)")
    missing = [i for i, (t, entry) in enumerate(zip(ids, per_token)) if t not in entry]
    if missing:
        raise ValueError(f"vLLM's log-probs lack the sampled token at positions {missing[:5]}")
    return [min(float(entry[t].logprob), 0.0) for t, entry in zip(ids, per_token)]

