"""The offline SDPO trainer: exact gradient accumulation over packed, prefix-reusing micro-batches.

One optimizer step = `batch_size` interactions. Token weights are computed from the whole step, so the
sum of the micro-batch gradients equals the gradient of the step's loss taken in one piece.
"""
from __future__ import annotations

import importlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..data import EncodedInteraction, encode_interactions, load_interactions
from ..bundled import tiny_model_path, tiny_sample_path
from ..loss import sdpo_loss
from ..model import apply_liger_kernels, forward_micro_batch, micro_batch_indices, unwrap_model
from .checkpoint import latest_checkpoint, load_trainer_state, restore_rng, save_checkpoint
from .config import TrainConfig, save_config, write_atomic
from .reporting import Reporters, check_reporters

IGNORE = -100
_SFT_CHUNK_BYTES = 32 << 20
_NO_PEFT = "lora_r > 0 needs peft (pip install 'sdpo_fast[lora]'); or set lora_r 0 for full fine-tuning"
_NO_BNB = "optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes; CUDA); use --optimizer adamw instead"


def loss_token_counts(batch: list[EncodedInteraction], ignore_first_k: int) -> list[int]:
    """Completion tokens of each interaction that enter the loss (all but the first `ignore_first_k`)."""
    return [max(len(e.completion_ids) - ignore_first_k, 0) for e in batch]


def interaction_weights(counts: list[int], aggregation: str) -> list[float]:
    """Per-token weight of each interaction of a step, given its loss-token counts.

    sequence: 1 / (n_interactions * count_i), the authors' per-sequence mean then batch mean (interactions
    without loss tokens still count in the batch mean, as in their code); token: 1 / sum(counts).
    """
    if aggregation == "sequence":
        return [1.0 / (len(counts) * c) if c else 0.0 for c in counts]
    total = sum(counts)
    return [1.0 / total if c else 0.0 for c in counts]


def _nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets, reduction="none")


def sft_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
             token_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_t w_t * -log softmax(hidden_t @ weight.T)[target_t] over targets != -100.

    hidden (N, d) and weight (V, d) one float dtype; targets (N,) int64; token_weights (N,) fp32. Token chunks
    are activation-checkpointed, so no more than one chunk of logits is alive. Returns the fp32 loss and the
    detached per-loss-token NLL (fp32).
    """
    rows = (targets != IGNORE).nonzero().squeeze(1)
    hidden, targets, token_weights = hidden[rows], targets[rows], token_weights[rows]
    chunk = max(1, _SFT_CHUNK_BYTES // (4 * weight.shape[0]))
    loss, nlls = hidden.new_zeros((), dtype=torch.float32), []
    for s in range(0, rows.numel(), chunk):
        nll = activation_checkpoint(_nll, hidden[s:s + chunk], weight, targets[s:s + chunk], use_reentrant=False)
        loss = loss + (token_weights[s:s + chunk] * nll).sum()
        nlls.append(nll.detach())
    return loss, torch.cat(nlls) if nlls else hidden.new_zeros(0, dtype=torch.float32)


@dataclass(frozen=True)
class StepStats:
    """One step: its loss (sum of the micro-batch losses), tokens run (student, plus teacher for sdpo), and over
    its loss tokens, their count, the sum of the signal (advantage for sdpo, NLL for sft) and how many are > 0."""

    loss: float
    tokens: int
    loss_tokens: int
    signal_sum: float
    positive: int

    @property
    def mean_signal(self) -> float:
        """Mean advantage (sdpo) or mean NLL (sft) over the step's loss tokens."""
        return self.signal_sum / max(self.loss_tokens, 1)

    @property
    def positive_share(self) -> float:
        return self.positive / max(self.loss_tokens, 1)


def accumulate_gradients(model, batch: list[EncodedInteraction], config: TrainConfig) -> StepStats:
    """Forward and backward over the micro-batches of one step; adds the step loss's gradient to `.grad`.

    Statistics stay on the device until the end of the step (one synchronization per step).
    """
    counts = loss_token_counts(batch, config.ignore_first_k)
    weights = interaction_weights(counts, config.aggregation)
    teacher = config.loss == "sdpo"
    sums = []
    for group in micro_batch_indices(batch, config.micro_batch_tokens):
        if not any(counts[i] for i in group):
            continue
        mb = forward_micro_batch(model, [batch[i] for i in group], prefix_reuse=config.prefix_reuse,
                                 attn_backend=config.attn_backend, teacher=teacher)
        seq = mb.sequence_index
        token_weights = torch.tensor([weights[i] for i in group], device=seq.device)[seq]
        targets = mb.target_ids.masked_fill(mb.position_in_completion < config.ignore_first_k, IGNORE)
        if config.loss == "sft":
            loss, signal = sft_loss(mb.student_hidden, mb.lm_head_weight, targets, token_weights)
        else:
            loss, token_stats = sdpo_loss(mb.student_hidden, mb.lm_head_weight, targets,
                                          teacher_hidden=mb.teacher_hidden, token_weights=token_weights,
                                          temperature=config.temperature, signal_clip=config.signal_clip,
                                          backend=config.loss_backend, return_stats=True)
            signal = token_stats.advantages[targets != IGNORE]
        loss.backward()
        sums.append(torch.stack([loss.detach().double(), signal.sum().double(), (signal > 0).sum().double()]))
    loss_sum, signal_sum, positive = torch.stack(sums).sum(0).tolist() if sums else (0.0, 0.0, 0.0)
    run = [len(e.student_input_ids) + (len(e.teacher_input_ids) if teacher else 0) for e in batch]
    return StepStats(loss=loss_sum, tokens=sum(run),
                     loss_tokens=sum(counts), signal_sum=signal_sum, positive=int(positive))


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float | None) -> float:
    """Clip the gradient norm (when max_grad_norm is set), step, advance the schedule, clear grads.

    Returns the gradient norm before clipping.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else math.inf)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def build_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ValueError(_NO_BNB) from None
        return bitsandbytes.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = math.ceil(config.warmup_ratio * total_steps)
    if config.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)


def step_order(n_interactions: int, batch_size: int, epoch: int, seed: int, shuffle: bool) -> list[list[int]]:
    """Interaction indices of each step of `epoch` (the last step may be short); depends only on the arguments."""
    if shuffle:
        order = torch.randperm(n_interactions, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        order = torch.arange(n_interactions)
    order = order.tolist()
    return [order[i:i + batch_size] for i in range(0, n_interactions, batch_size)]


def total_steps(n_interactions: int, config: TrainConfig) -> int:
    return config.max_steps or config.epochs * math.ceil(n_interactions / config.batch_size)


def apply_lora(model, config: TrainConfig):
    """Wrap `model` with fresh LoRA adapters (peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError(_NO_PEFT) from None
    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else list(targets),
                      task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise ValueError(f"lora_target_modules {targets}: {exc}") from None


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, config.dtype)


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def _check_local(name: str) -> None:
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not Path(name).expanduser().exists():
            raise FileNotFoundError(f"model path {name!r} does not exist")


def _load_tokenizer(name: str, config: TrainConfig):
    from transformers import AutoTokenizer

    _check_local(name)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load the tokenizer of {name!r}: {str(exc).splitlines()[0]}") from None


def _load_model(name: str, config: TrainConfig, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    _check_local(name)
    quantization = {}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        quantization["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
        quantization["device_map"] = {"": 0}
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=config.trust_remote_code,
                                                    use_safetensors=True, **quantization)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load model {name!r}: {str(exc).splitlines()[0]}") from None


def load_model_and_tokenizer(config: TrainConfig, checkpoint: Path | None = None):
    """The model to train (LoRA-wrapped if lora_r > 0, weights from `checkpoint` when resuming) and tokenizer.

    model None: the bundled tiny Qwen3 (`tiny_model_path()`, made by scripts/make_tiny_model.py).
    """
    if config.lora_r and not _importable("peft"):
        raise ValueError(_NO_PEFT)
    check_reporters(config.report_to)
    device = _device(config)
    if config.load_in_4bit and (device.type != "cuda" or not _importable("bitsandbytes")):
        raise ValueError("load_in_4bit (QLoRA) needs a CUDA GPU and bitsandbytes (pip install bitsandbytes); "
                         "use lora_r without load_in_4bit instead")
    if config.use_liger and (device.type != "cuda" or not _importable("liger_kernel")):
        raise ValueError("use_liger needs a CUDA GPU and liger-kernel (pip install liger-kernel)")
    dtype = _dtype(config, device)
    torch.manual_seed(config.seed)  # LoRA adapters are initialized from the global RNG
    name = config.model or str(tiny_model_path())
    full_weights = str(checkpoint) if checkpoint is not None and not config.lora_r else name
    tokenizer = _load_tokenizer(name, config)
    model = _load_model(full_weights, config, dtype)
    if not config.load_in_4bit:
        model = model.to(device=device, dtype=dtype)
    if config.use_liger:
        apply_liger_kernels(model)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_r:
        if checkpoint is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
        else:
            model = apply_lora(model, config)
    unwrap_model(model)
    return model.train(), tokenizer


def load_encoded_data(config: TrainConfig, tokenizer) -> tuple[list[EncodedInteraction], dict]:
    """Encoded interactions of `config.data` (default: the bundled tiny_sample.jsonl) and counts of what was
    skipped."""
    source = config.data if config.data is not None else tiny_sample_path()
    stream = load_interactions(source, max_history=config.max_history, preset=config.data_preset)
    encoded, skipped = encode_interactions(tokenizer, stream, max_prompt_tokens=config.max_prompt_tokens,
                                           max_completion_tokens=config.max_completion_tokens)
    skipped = {**dict(stream.skipped), **dict(skipped)}
    if not encoded:
        raise ValueError(f"data {str(source)!r} gave zero usable interactions (skipped: {skipped or 'none'}; "
                         f"bad rows: {len(stream.bad_rows)})")
    return encoded, skipped


def default_output_dir() -> str:
    return str(Path("runs") / datetime.now().strftime("sdpo-%Y%m%d-%H%M%S"))


class Trainer:
    """Runs `config` on a prepared model, tokenizer and encoded interactions, writing into config.output_dir."""

    def __init__(self, config: TrainConfig, model, tokenizer, encoded: list[EncodedInteraction]):
        if not encoded:
            raise ValueError("no interactions to train on")
        self.config, self.model, self.tokenizer, self.encoded = config, model, tokenizer, encoded
        self.output_dir = Path(config.output_dir or default_output_dir())
        self.total_steps = total_steps(len(encoded), config)
        self.steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        self.step = 0

    def _prepare_output_dir(self) -> None:
        if self.config.resume:
            ckpt = latest_checkpoint(self.output_dir)
            if ckpt is None:
                raise ValueError(f"resume: no checkpoint in {str(self.output_dir)!r}")
            self._restore(ckpt)
        elif self.output_dir.exists() and any(self.output_dir.iterdir()):
            raise ValueError(f"output_dir {str(self.output_dir)!r} is not empty; pass --resume to continue its run "
                             "or choose another --output-dir")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.output_dir.glob(".tmp-checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
        save_config(self.config, self.output_dir / "config.yaml")
        metrics = self.output_dir / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        write_atomic(metrics, "".join(line + "\n" for line in lines if _logged_step(line) <= self.step))

    def _position(self) -> dict:
        return {"num_interactions": len(self.encoded), "total_steps": self.total_steps, "seed": self.config.seed,
                "batch_size": self.config.batch_size, "shuffle": self.config.shuffle}

    def _restore(self, ckpt: Path) -> None:
        state = load_trainer_state(ckpt)
        if state["extra"] != self._position():
            raise ValueError(f"resume: checkpoint {str(ckpt)!r} was written for {state['extra']}, but this run has "
                             f"{self._position()}; use the same data and settings")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state)
        self.step = state["step"]

    def save(self) -> Path:
        return save_checkpoint(self.output_dir, self.step, self.model, self.tokenizer, self.optimizer,
                               self.scheduler, self._position())

    def batches(self):
        """(step, interactions) from the current step on; the order depends only on seed, epoch and step."""
        for step in range(self.step, self.total_steps):
            epoch, index = divmod(step, self.steps_per_epoch)
            order = step_order(len(self.encoded), self.config.batch_size, epoch, self.config.seed,
                               self.config.shuffle)
            yield step, [self.encoded[i] for i in order[index]]

    def fit(self, *, progress: bool = True, stop_after: int | None = None) -> dict:
        """Train to total_steps (or stop after step `stop_after`, as a crash would); returns a summary."""
        from tqdm import tqdm

        if not self.config.resume:
            torch.manual_seed(self.config.seed)
        self._prepare_output_dir()
        self.model.train()
        cfg, start, first, last = self.config, time.perf_counter(), None, None
        tokens = 0
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"sdpo-fast train ({cfg.loss})", unit="step",
                   disable=not progress, dynamic_ncols=True)
        reporters = Reporters(cfg.report_to, self.output_dir, cfg.to_dict())
        with open(self.output_dir / "metrics.jsonl", "a") as metrics:
            for step, batch in self.batches():
                t0 = time.perf_counter()
                stats = accumulate_gradients(self.model, batch, cfg)
                lr = self.scheduler.get_last_lr()[0]
                grad_norm = optimizer_step(self.model, self.optimizer, self.scheduler, cfg.max_grad_norm)
                self.step, seconds = step + 1, time.perf_counter() - t0
                tokens += stats.tokens
                last = {"step": self.step, "epoch": step // self.steps_per_epoch, "loss": stats.loss,
                        "mean_advantage" if cfg.loss == "sdpo" else "mean_nll": stats.mean_signal,
                        "positive_advantage_share": stats.positive_share if cfg.loss == "sdpo" else None,
                        "grad_norm": grad_norm, "lr": lr, "interactions": len(batch), "tokens": stats.tokens,
                        "loss_tokens": stats.loss_tokens, "tokens_per_s": stats.tokens / seconds, "seconds": seconds}
                if torch.cuda.is_available():
                    last["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                first = first or last
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                reporters.log(last, self.step)
                if self.step % cfg.logging_steps == 0:
                    bar.set_postfix(_postfix(last), refresh=False)
                bar.update()
                if (cfg.save_steps and self.step % cfg.save_steps == 0) or self.step == self.total_steps:
                    self.save()
                if stop_after is not None and self.step >= stop_after:
                    break
        bar.close()
        reporters.close()
        elapsed = time.perf_counter() - start
        return {"steps": self.step, "total_steps": self.total_steps, "interactions": len(self.encoded),
                "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                "first": first, "last": last, "output_dir": str(self.output_dir),
                "checkpoint": str(latest_checkpoint(self.output_dir) or "")}


def _logged_step(line: str) -> float:
    """The step of a metrics line; inf for a line cut short by a crash."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _postfix(metrics: dict) -> dict:
    out = {"loss": f"{metrics['loss']:.4g}", "tok/s": f"{metrics['tokens_per_s']:.0f}"}
    if metrics.get("positive_advantage_share") is not None:
        out["adv"] = f"{metrics['mean_advantage']:+.3f}"
        out["adv>0"] = f"{metrics['positive_advantage_share']:.0%}"
    else:
        out["nll"] = f"{metrics['mean_nll']:.3f}"
    if "peak_memory_gib" in metrics:
        out["mem"] = f"{metrics['peak_memory_gib']:.1f}G"
    return out


def train(config: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> dict:
    """Load model, tokenizer and data for `config` (resuming from output_dir's latest checkpoint if asked) and fit.

    Everything is loaded and checked before anything is written to the output directory.
    """
    config.validate()
    if config.output_dir is None:
        config.output_dir = default_output_dir()
    ckpt = latest_checkpoint(config.output_dir) if config.resume else None
    if config.resume and ckpt is None:
        raise ValueError(f"resume: no checkpoint in {config.output_dir!r}")
    if config.optimizer == "adamw8bit" and not _importable("bitsandbytes"):
        raise ValueError(_NO_BNB)
    model, tokenizer = load_model_and_tokenizer(config, ckpt)
    encoded, _ = load_encoded_data(config, tokenizer)
    return Trainer(config, model, tokenizer, encoded).fit(progress=progress, stop_after=stop_after)
