"""vLLM as the online policy's sampler (optional: `pip install vllm`, CUDA GPU).

vLLM holds the frozen base model; the policy's LoRA adapter is written to disk after each update and passed
with the next batch as a new `LoRARequest`, so every reply comes from the current weights. The update still
scores the sampled ids with the training model (Hugging Face forward), as the paper's on-policy loop does.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .adapters import write_adapter
from .loop import Sample, chat_prompt_ids, make_sample


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
    engine_options: more `vllm.LLM` arguments (dtype, max_model_len, enforce_eager, ...).
    """

    def __init__(self, model: str, *, max_lora_rank: int, gpu_memory_utilization: float = 0.3, seed: int = 0,
                 adapter_dir: str | Path | None = None, **engine_options):
        served_rank = vllm_max_lora_rank(max_lora_rank)
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError:
            raise ValueError("generation backend 'vllm' needs vLLM (pip install vllm; CUDA GPU); or use 'hf'") from None
        if not isinstance(gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization!r}")
        self._vllm, self._lora_request = vllm, LoRARequest
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

    def sample(self, policy, conversations: list[list[dict]], seed: int) -> list[Sample]:
        """One reply per chat from the policy's current adapter; request i is seeded with seed + i."""
        config = policy.config
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=ids)
                   for ids in chat_prompt_ids(policy.tokenizer, conversations)]
        params = [self._vllm.SamplingParams(temperature=config.temperature, max_tokens=config.max_new_tokens,
                                            stop_token_ids=list(policy.stop_token_ids), seed=seed + i)
                  for i in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request(policy), use_tqdm=False)
        return [make_sample(policy.tokenizer, list(out.outputs[0].token_ids), policy.stop_token_ids)
                for out in outputs]
