"""`--fit`: the fastest configuration of a step that fits a memory budget, chosen before the weights load.

The candidates are the configurations reachable from the user's options: how many decoder layers are checkpointed
(the first N, 0 .. L), whether their inputs are offloaded to the CPU, micro_batch_tokens (the given value, or one
interaction per micro-batch) and the loss path (loss_workspace_mb: the backend's default, and the least workspace at
which `sdpo_loss`'s own rule takes the grad-in-forward path, `grad_in_forward_of`); an option the user set (flag or
config file) is kept, not searched. Each candidate is priced by `step_time` (an explicit model: FLOPs at stated
fractions of the GPU's datasheet peaks, and host<->device bytes at a stated PCIe rate) and checked by
`plan.simulate` (the trainer's own step on fake tensors) against the budget with the planner's allowances. The peak
falls as more layers are checkpointed (monotone), so within each (micro_batch_tokens, workspace, offload) group the
fewest checkpointed layers that fit are found by a bracketing search that steps by the measured bytes per layer
(`_fewest_layers`), and a group is simulated only when its fastest member could beat the best found so far (or tie
it, at a larger micro-batch: ties go to the larger; the smaller micro-batch is searched first).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..kernels.gpus import GPU, GPUS
from ..kernels.model import EFFICIENCY
from ..loss.api import GRAD_IN_FORWARD_MIN_ROWS
from .build import loss_workspace_bytes
from .plan import (GIB, SimulatedPlan, check_step, interaction, load_config, simulate, simulated_dtype,
                   simulated_loss_backend)

SEARCHED = ("checkpoint_layers", "offload_activations", "micro_batch_tokens", "loss_workspace_mb")
"""The options --fit chooses; gradient_checkpointing given explicitly fixes checkpoint_layers (all or none)."""
CPU_BUDGET_GIB = 24.0
"""--fit's budget off CUDA when --budget-gib is not given."""
PCIE_BYTES_PER_S = 25e9
"""Achieved pinned host<->device copy rate of a PCIe 4.0 x16 link (32 GB/s per direction on paper); PCIe 5.0
doubles it. Offload copies are priced as not overlapping compute (an upper bound on their cost)."""
ATTENTION_BACKWARD = 2.5
"""FLOPs of flash attention's backward per FLOP of its forward (two products become five)."""
DEFAULT_GPU = "h100"
PRUNE_MARGIN = 0.05
"""An offload group is not simulated when `_offload_estimate` puts its most-layers candidate over the budget by
more than this share (the estimate is within 1 % on Qwen3-8B)."""
CONFIRM_MARGIN = 0.25
"""A fitting guess is taken without simulating one layer fewer when the measured bytes per layer put that one
over the budget by more than this share of a layer's bytes (the peak is close to affine in the layers)."""


def runs_fit(requested: bool | None, given: dict, device_type: str) -> bool:
    """Whether `train` runs --fit: as requested (--fit / --no-fit), else on CUDA when the user set none of the
    options it searches (nor gradient_checkpointing); never unasked under torchrun, refused there when asked
    (it plans one GPU)."""
    from .distributed import launched_world

    if launched_world() is not None:
        if requested:
            raise ValueError("--fit plans one GPU; under torchrun use `sdpo-fast plan --world-size N` and set the "
                             "options yourself")
        return False
    if requested is not None:
        return requested
    return device_type == "cuda" and not any(k in given for k in SEARCHED + ("gradient_checkpointing",))


def budget_bytes(budget_gib: float | None) -> int:
    """The budget in bytes: budget_gib, else the CUDA device's free memory, else CPU_BUDGET_GIB."""
    if budget_gib is not None:
        return int(budget_gib * GIB)
    if torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    return int(CPU_BUDGET_GIB * GIB)


def current_gpu() -> GPU:
    """The GPU of `kernels.gpus.GPUS` that the CUDA device's name names, else DEFAULT_GPU's."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower().replace(" ", "")
        for key, gpu in GPUS.items():
            if key in name:
                return gpu
    return GPUS[DEFAULT_GPU]


@dataclass(frozen=True)
class StepTime:
    """Modelled time of one optimizer step, by part: FLOPs and seconds of the trunk's student forward, the
    checkpointed layers' recompute, the student backward, the teacher pass, the loss path; offloaded bytes and
    their seconds. loss_flops_per_ndv: the k of k·N·d·V."""

    flops: dict[str, float]
    seconds: dict[str, float]
    offload_bytes: float
    loss_flops_per_ndv: int
    gpu: str

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    @property
    def recompute_fraction(self) -> float:
        """The recompute's share of the step's FLOPs."""
        return self.flops["recompute"] / sum(self.flops.values())


def assumptions(gpu: GPU) -> str:
    """The step-time model's assumptions, one paragraph."""
    return (f"Step-time model on {gpu.name} ({gpu.tensor_16bit_flops / 1e12:.0f} TFLOP/s 16-bit tensor peak): "
            f"trunk GEMMs at {EFFICIENCY.cublas:.0%} of the peak (cuBLAS), attention and the loss kernels at "
            f"{EFFICIENCY.triton_tensor:.0%} (kernels/model.py's EFFICIENCY); GEMM FLOPs 2 per weight per token, "
            f"causal attention 2·S²·heads·head_dim per layer forward (prefix-reused teacher: only its new "
            f"positions), backward 2x the GEMM forward (full fine-tuning) or 1x (LoRA/QLoRA: grad input only) plus "
            f"{ATTENTION_BACKWARD}x attention; recompute: the checkpointed layers' forward again; loss k·N·d·V "
            f"(N loss tokens); offload: each checkpointed layer's input to the CPU and back at "
            f"{PCIE_BYTES_PER_S / 1e9:.0f} GB/s, not overlapped. Not counted: optimizer step, NF4 dequantization, "
            f"norms, embeddings, kernel launches.")


def loss_flops_per_ndv(config, grad_in_forward: bool) -> int:
    """k of the loss path's k·N·d·V: two log-prob sweeps (student, teacher), the logits recomputed for their
    gradient, grad_hidden, and with a trained lm_head grad_weight (its 16-bit slice form, as the planner counts
    it, forms the logits gradient once more); the grad-in-forward path forms the gradients in its forward
    sweep (two fewer)."""
    trained_head = not config.lora_r
    if grad_in_forward:
        return 8 if trained_head else 6
    return 12 if trained_head else 8


def step_time(config, hf_config, checkpoint_layers: int, offload_activations: bool, grad_in_forward: bool,
              gpu: GPU) -> StepTime:
    """The modelled time of a step of `config` (batch_size interactions at the token limits, `plan.interaction`)
    with these options; the same whatever micro_batch_tokens (the FLOPs and bytes do not depend on it)."""
    text = hf_config.get_text_config()
    layers, d, vocab = text.num_hidden_layers, text.hidden_size, text.vocab_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or d // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    weights_per_layer = d * head_dim * (2 * heads + 2 * kv_heads) + 3 * d * text.intermediate_size
    batch = [interaction(config.max_prompt_tokens, config.max_completion_tokens, vocab,
                         config.importance_clip is not None)] * config.batch_size
    student_tokens = sum(len(e.student_input_ids) for e in batch)
    attention = 2 * heads * head_dim * layers
    student_gemm = 2 * weights_per_layer * layers * student_tokens
    student_attention = attention * sum(len(e.student_input_ids) ** 2 for e in batch)
    reuse = config.prefix_reuse and config.teacher == "live"
    shared = [e.shared_prefix_len if reuse else 0 for e in batch]
    teacher_gemm = 2 * weights_per_layer * layers * sum(len(e.teacher_input_ids) - s for e, s in zip(batch, shared))
    teacher_attention = attention * sum(len(e.teacher_input_ids) ** 2 - s ** 2 for e, s in zip(batch, shared))
    loss_tokens = sum(max(len(e.completion_ids) - config.ignore_first_k, 0) for e in batch)
    k = loss_flops_per_ndv(config, grad_in_forward)
    share = checkpoint_layers / layers
    gemm_backward = 1 if config.lora_r else 2
    flops = {"trunk_forward": student_gemm + student_attention,
             "recompute": share * (student_gemm + student_attention),
             "backward": gemm_backward * student_gemm + ATTENTION_BACKWARD * student_attention,
             "teacher": teacher_gemm + teacher_attention,
             "loss": k * loss_tokens * d * vocab}
    fp32 = config.dtype == "float32"
    peak = gpu.fp32_flops if fp32 else gpu.tensor_16bit_flops
    gemm_rate, kernel_rate = peak * EFFICIENCY.cublas, peak * EFFICIENCY.triton_tensor

    def seconds(gemm: float, attn: float) -> float:
        return gemm / gemm_rate + attn / kernel_rate

    elem = 4 if fp32 else 2
    offload = 2 * checkpoint_layers * student_tokens * d * elem if offload_activations else 0
    times = {"trunk_forward": seconds(student_gemm, student_attention),
             "recompute": share * seconds(student_gemm, student_attention),
             "backward": seconds(gemm_backward * student_gemm, ATTENTION_BACKWARD * student_attention),
             "teacher": seconds(teacher_gemm, teacher_attention),
             "loss": flops["loss"] / kernel_rate,
             "offload": offload / PCIE_BYTES_PER_S}
    return StepTime(flops, times, offload, k, gpu.name)


@dataclass(frozen=True)
class Candidate:
    """One simulated configuration: its searched options, simulated plan (None: refused before simulating,
    `refused` says why) and modelled time."""

    checkpoint_layers: int
    offload_activations: bool
    micro_batch_tokens: int
    loss_workspace_mb: int | None
    grad_in_forward: bool
    time: StepTime
    plan: SimulatedPlan | None
    refused: str | None = None

    def fits(self, budget: int) -> bool:
        return self.plan is not None and self.plan.fits(budget)

    def to_json(self, budget: int) -> dict:
        return {"checkpoint_layers": self.checkpoint_layers, "offload_activations": self.offload_activations,
                "micro_batch_tokens": self.micro_batch_tokens, "loss_workspace_mb": self.loss_workspace_mb,
                "grad_in_forward": self.grad_in_forward, "peak_bytes": self.plan.peak_bytes if self.plan else None,
                "total_bytes": self.plan.total_bytes if self.plan else None, "fits": self.fits(budget),
                "refused": self.refused, "modelled_step_seconds": self.time.total_seconds}


@dataclass(frozen=True)
class Fit:
    """The chosen configuration (`config`, None when no candidate fits) and every simulated candidate."""

    config: object
    chosen: Candidate | None
    candidates: list[Candidate]
    num_layers: int
    budget_bytes: int
    default_workspace_mb: int | None
    baseline: StepTime
    gpu: GPU

    def flags(self) -> list[str]:
        """The command-line flags that select the chosen configuration."""
        c = self.chosen
        out = [f"--checkpoint-layers {c.checkpoint_layers}", f"--micro-batch-tokens {c.micro_batch_tokens}"]
        if c.loss_workspace_mb != self.default_workspace_mb:
            out.append(f"--loss-workspace-mb {c.loss_workspace_mb}")
        return out + (["--offload-activations"] if c.offload_activations else [])

    def to_json(self) -> dict:
        """{"fit": the choice, "candidates": [...]}; ValueError when nothing fits (see `refusal`)."""
        if self.chosen is None:
            raise ValueError(self.refusal())
        c = self.chosen
        return {"fit": {"flags": self.flags(), "checkpoint_layers": c.checkpoint_layers,
                        "num_layers": self.num_layers, "offload_activations": c.offload_activations,
                        "micro_batch_tokens": c.micro_batch_tokens, "grad_in_forward": c.grad_in_forward,
                        "peak_bytes": c.plan.peak_bytes, "budget_bytes": self.budget_bytes,
                        "recompute_fraction": c.time.recompute_fraction,
                        "modelled_step_seconds": c.time.total_seconds},
                "candidates": [x.to_json(self.budget_bytes) for x in self.candidates]}

    def refusal(self) -> str:
        tried = "; ".join(f"{x.checkpoint_layers} layers{' offloaded' if x.offload_activations else ''} at "
                          f"{x.micro_batch_tokens} tokens: " + (x.refused or f"{x.plan.total_bytes / GIB:.2f} GiB")
                          for x in self.candidates)
        return (f"--fit: no configuration reachable from these options fits {self.budget_bytes / GIB:.2f} GiB "
                f"(tried {tried}); raise --budget-gib, lower --max-prompt-tokens / --max-completion-tokens, or "
                "unset an option --fit may search (--micro-batch-tokens, --gradient-checkpointing, "
                "--checkpoint-layers, --offload-activations, --loss-workspace-mb)")

    def describe(self) -> str:
        """The choice, the modelled step time by part against all-layers checkpointing, and the assumptions."""
        if self.chosen is None:
            return self.refusal()
        c, t = self.chosen, self.chosen.time
        parts = ", ".join(f"{name} {s * 1e3:.0f} ms" for name, s in t.seconds.items())
        flops = ", ".join(f"{name} {f / 1e12:.1f}" for name, f in t.flops.items())
        lines = [f"--fit chose: {' '.join(self.flags())} ({c.checkpoint_layers} of {self.num_layers} layers "
                 f"checkpointed, simulated {c.plan.total_bytes / GIB:.2f} GiB with allowances of a "
                 f"{self.budget_bytes / GIB:.2f} GiB budget; {len(self.candidates)} candidates simulated)",
                 f"modelled step {t.total_seconds:.3f} s ({parts}); every layer checkpointed: "
                 f"{self.baseline.total_seconds:.3f} s; recompute {t.recompute_fraction:.1%} of the step's FLOPs",
                 f"TFLOP per step: {flops}; loss path {t.loss_flops_per_ndv}·N·d·V (grad_in_forward "
                 f"{str(c.grad_in_forward).lower()}); offloaded {t.offload_bytes / 1e9:.2f} GB",
                 assumptions(self.gpu)]
        return "\n".join(lines)


def kept_options(given: dict) -> dict:
    """Of the options the user set (flags and config file, as {field: value}), those that fix a searched one,
    resolved to {searched field: value or None (fixed at the config's own)}."""
    fixed = {k: given[k] for k in SEARCHED if k in given}
    if "checkpoint_layers" not in fixed and "gradient_checkpointing" in given \
            and given["gradient_checkpointing"] is not None:
        fixed["checkpoint_layers"] = None
    return fixed


def grad_in_forward_of(config, hf_config, loss_rows: int) -> bool:
    """Whether the simulated step's loss (the planner's backend and dtype, at `build.loss_workspace_bytes(config)`)
    forms its gradients in the forward for a call on `loss_rows` loss tokens: `sdpo_loss`'s own rule
    (`choose_grad_in_forward`). False for sft (its own cross entropy) and the reference backend."""
    from ..loss.api import choose_grad_in_forward
    from ..loss.backends import get_backend

    backend = simulated_loss_backend(config)
    if config.loss == "sft" or backend == "reference":
        return False
    text = hf_config.get_text_config()
    mode = config.distillation_mode
    topk = config.distillation_topk if mode != "sampled_token" else 0
    budget = loss_workspace_bytes(dataclasses.replace(config, loss_backend=backend))
    return choose_grad_in_forward(get_backend(backend).row_ops, None, budget, loss_rows, mode,
                                  simulated_dtype(config), text.vocab_size, topk or 0, True,
                                  getattr(text, "final_logit_softcapping", None) is not None)


def grad_in_forward_workspace_mb(config, hf_config) -> int:
    """The least loss_workspace_mb at which the simulated step's loss takes the grad-in-forward path for calls of
    GRAD_IN_FORWARD_MIN_ROWS loss tokens or more (found by `grad_in_forward_of` itself)."""

    def admits(mb: int) -> bool:
        return grad_in_forward_of(dataclasses.replace(config, loss_workspace_mb=mb), hf_config,
                                  GRAD_IN_FORWARD_MIN_ROWS)

    hi = 1
    while not admits(hi):
        hi *= 2
    lo = hi // 2  # does not admit (or 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if admits(mid) else (mid, hi)
    return hi


def fit(config, given: dict, budget: int, *, hf_config=None, gpu: GPU | None = None, log=None) -> Fit:
    """The least modelled step time among the configurations reachable from `config` (`given`: the options the
    user set, as `given_fields` and the config file give them) whose simulated peak plus allowances fits
    `budget` bytes. log: called with one line per simulated candidate."""
    from .config import resolved_checkpoint_layers

    config.validate()
    hf_config = hf_config if hf_config is not None else load_config(config.model)
    gpu = gpu or current_gpu()
    layers = hf_config.get_text_config().num_hidden_layers
    fixed = kept_options(given)
    vocab = hf_config.get_text_config().vocab_size
    if "checkpoint_layers" in fixed:
        n = resolved_checkpoint_layers(config, layers)
        layer_range = (n, n)
    else:
        layer_range = (0, layers)
    offloads = [config.offload_activations] if "offload_activations" in fixed else [False, True]
    if offloads == [True]:  # offload kept on: at least one layer checkpointed
        layer_range = (max(layer_range[0], 1), layer_range[1])
    longest_interaction = interaction(config.max_prompt_tokens, config.max_completion_tokens, vocab)
    longest = max(len(longest_interaction.student_input_ids), len(longest_interaction.teacher_input_ids))
    if "micro_batch_tokens" in fixed:
        token_budgets = [config.micro_batch_tokens]
    elif config.offload_optimizer:  # one micro-batch per step (step.check_micro_batches)
        token_budgets = [max(config.micro_batch_tokens, config.batch_size * longest)]
    else:
        # smallest first: it needs the fewest layers checkpointed, so it bounds the larger one's search
        token_budgets = [longest, config.micro_batch_tokens] if config.micro_batch_tokens > longest \
            else [config.micro_batch_tokens]
    # the loss path: the default workspace, and (searched first: faster, a larger workspace) the least one that
    # admits the grad-in-forward path, unless the default already does
    workspaces = [config.loss_workspace_mb]
    if "loss_workspace_mb" not in fixed and config.loss != "sft" and simulated_loss_backend(config) != "reference" \
            and not grad_in_forward_of(config, hf_config, GRAD_IN_FORWARD_MIN_ROWS):
        workspaces.insert(0, grad_in_forward_workspace_mb(config, hf_config))
    cache: dict[tuple, Candidate] = {}

    def workspace_bytes(workspace: int | None) -> int:
        return loss_workspace_bytes(dataclasses.replace(config, loss_backend=simulated_loss_backend(config),
                                                        loss_workspace_mb=workspace)) or 0

    def path_of(tokens: int, workspace: int | None) -> bool:
        """The loss path of a micro-batch of `tokens` tokens, as many interactions at the limits as it holds (the
        loss's rows: their completion tokens, those of ignore_first_k included at weight 0)."""
        per_micro_batch = min(config.batch_size, max(1, tokens // longest))
        return grad_in_forward_of(dataclasses.replace(config, loss_workspace_mb=workspace), hf_config,
                                  per_micro_batch * config.max_completion_tokens)

    def time_of(n: int, offload: bool, grad_in_forward: bool) -> StepTime:
        return step_time(config, hf_config, n, offload and n > 0, grad_in_forward, gpu)

    def run(n: int, offload: bool, tokens: int, workspace: int | None) -> Candidate:
        offload = offload and n > 0
        key = (n, offload, tokens, workspace)
        if key not in cache:
            path = path_of(tokens, workspace)
            cache[key] = _simulate(config, hf_config, n, offload, tokens, workspace, path,
                                   time_of(n, offload, path))
            if log is not None:
                c = cache[key]
                log(f"--fit: {n}/{layers} layers checkpointed{', offloaded' if offload else ''}, {tokens} tokens, "
                    f"loss {'grad-in-forward' if path else 'recompute'} path "
                    f"(workspace {'default' if workspace is None else f'{workspace} MiB'}): "
                    + (c.refused or f"{c.plan.total_bytes / GIB:.2f} GiB with allowances")
                    + f", modelled {c.time.total_seconds:.3f} s")
        return cache[key]

    best: Candidate | None = None
    per_token = None  # bytes saved per checkpointed layer per student token of a micro-batch, once measured
    for tokens in token_budgets:
        micro_tokens = max(1, tokens // longest) * len(longest_interaction.student_input_ids)
        for workspace in workspaces:
            path = path_of(tokens, workspace)
            for offload in offloads:
                if offload and layer_range[1] == 0:
                    continue
                lo, hi = layer_range
                if best is not None:  # the candidates that could beat (or tie, later in the order) the best
                    while hi >= lo and time_of(hi, offload, path).total_seconds > best.time.total_seconds:
                        hi -= 1
                    if hi < lo:
                        continue
                if not offload and workspace != workspaces[0] and _workspace_estimate(
                        cache, hi, tokens, workspace_bytes(workspace), workspace_bytes,
                        per_token * micro_tokens if per_token else None) > budget:
                    continue
                input_bytes = micro_tokens * hf_config.get_text_config().hidden_size * (
                    4 if config.dtype == "float32" else 2)
                if offload and _offload_estimate(cache, hi, tokens, workspace, workspace_bytes,
                                                 input_bytes) > budget * (1 + PRUNE_MARGIN):
                    continue
                found, slope = _fewest_layers(lambda n: run(n, offload, tokens, workspace), lo, hi, budget,
                                              per_token * micro_tokens if per_token else None)
                per_token = slope / micro_tokens if slope else per_token
                if found is not None and (best is None or found.time.total_seconds <= best.time.total_seconds):
                    best = found
    chosen_config = None
    if best is not None:
        chosen_config = _configured(config, best.checkpoint_layers, best.offload_activations,
                                    best.micro_batch_tokens, best.loss_workspace_mb)
    return Fit(chosen_config, best, list(cache.values()), layers, budget, config.loss_workspace_mb,
               time_of(layers, False, path_of(token_budgets[-1], config.loss_workspace_mb)), gpu)


def _totals(cache: dict, tokens: int, workspace: int | None, workspace_bytes) -> dict[int, float]:
    """{checkpointed layers: peak plus allowances} of the simulated candidates without offload at `tokens`: those at
    `workspace` if any, else those at the other workspaces less the difference of the workspaces' bytes."""
    own = {n: c.plan.total_bytes for (n, off, t, w), c in cache.items()
           if t == tokens and w == workspace and not off and c.plan}
    if own:
        return own
    shift = workspace_bytes(workspace)
    return {n: c.plan.total_bytes - workspace_bytes(w) + shift for (n, off, t, w), c in cache.items()
            if t == tokens and not off and c.plan}


def _workspace_estimate(cache: dict, layers: int, tokens: int, workspace_bytes_here: int, workspace_bytes,
                        slope: float | None) -> float:
    """Peak plus allowances of `layers` checkpointed at `tokens` with a loss workspace of `workspace_bytes_here`,
    from the nearest simulated candidate without offload at another workspace at `tokens` (less the difference of
    the workspaces' bytes) and the bytes per layer `slope`, less CONFIRM_MARGIN of a layer's bytes (as
    `_fewest_layers` skips a probe); 0 (no estimate) without a slope or such a candidate."""
    totals = {n: c.plan.total_bytes - workspace_bytes(w) + workspace_bytes_here
              for (n, off, t, w), c in cache.items() if t == tokens and not off and c.plan}
    if not slope or not totals:
        return 0.0
    near = min(totals, key=lambda n: abs(n - layers))
    return totals[near] + slope * (near - layers) - CONFIRM_MARGIN * slope


def _offload_estimate(cache: dict, layers: int, tokens: int, workspace: int | None, workspace_bytes,
                      input_bytes: int) -> float:
    """Peak plus allowances of `layers` checkpointed and offloaded at `tokens`, estimated from that group's
    simulated candidates without offload (`_totals`) (the line through the nearest on either side
    of `layers`, else the two nearest; with one, at or above `layers`, that one: a lower bound, the peak falling
    with layers) less the offloaded inputs of one micro-batch (`input_bytes` per layer); 0 (no estimate) otherwise."""
    totals = _totals(cache, tokens, workspace, workspace_bytes)
    below, above = [n for n in totals if n <= layers], [n for n in totals if n > layers]
    if below and above:
        a, b = max(below), min(above)
    elif len(totals) >= 2:
        a, b = sorted(totals, key=lambda n: abs(n - layers))[:2]
    elif above:
        return totals[above[0]] - layers * input_bytes
    else:
        return 0.0
    return totals[a] + (totals[b] - totals[a]) * (layers - a) / (b - a) - layers * input_bytes


def _fewest_layers(run, lo: int, hi: int, budget: int, slope: float | None) -> tuple:
    """(The candidate with the fewest checkpointed layers in [lo, hi] that fits, or None; the bytes saved per
    checkpointed layer, measured). The peak falls as layers are added. Without a `slope` guess, lo is probed
    first (fits: done), then hi; with one, hi first (does not fit: none does). Each further probe steps down
    from the fewest layers known to fit by its slack over the slope (measured across the bracket once both ends
    are known), kept inside the bracket; a fitting guess is checked one layer below (unless the slope puts that
    one over the budget by CONFIRM_MARGIN of a layer's bytes), a guess that does not fit makes the next probe
    the bracket's middle."""
    totals: dict[int, int] = {}

    def probe(n: int) -> bool:
        c = run(n)
        if c.plan is not None:
            totals[n] = c.plan.total_bytes
        return c.fits(budget)

    if slope is None:
        if probe(lo):
            return run(lo), slope
        if lo == hi or not probe(hi):
            return None, slope
        bad = lo
    else:
        if not probe(hi):
            return None, slope
        bad = lo - 1  # not probed: the bracket ends at lo
    good, secant = hi, True
    while good - bad > 1:
        if bad in totals and totals[bad] > totals[good]:
            slope = (totals[bad] - totals[good]) / (good - bad)
        if secant and slope:
            guess = good - math.floor((budget - totals[good]) / slope)
            guess = min(max(guess, bad + 1), good - 1)
        else:
            guess = (bad + good) // 2
        if probe(guess):
            good = guess
            if secant and slope and good - bad > 1 and totals[good] + slope * (1 - CONFIRM_MARGIN) > budget:
                break  # the slope puts one layer fewer over the budget by a margin
            if good - bad > 1 and probe(good - 1):
                good -= 1
            else:
                bad = max(bad, good - 1)
            secant = True
        else:
            bad, secant = guess, False
    return run(good), slope


def _configured(config, checkpoint_layers: int, offload_activations: bool, micro_batch_tokens: int,
                loss_workspace_mb: int | None):
    """`config` with the searched options set (gradient_checkpointing left to checkpoint_layers)."""
    return dataclasses.replace(config, checkpoint_layers=checkpoint_layers, gradient_checkpointing=None,
                               offload_activations=offload_activations, micro_batch_tokens=micro_batch_tokens,
                               loss_workspace_mb=loss_workspace_mb)


def _simulate(config, hf_config, checkpoint_layers: int, offload: bool, tokens: int, workspace: int | None,
              grad_in_forward: bool, time: StepTime) -> Candidate:
    candidate = _configured(config, checkpoint_layers, offload, tokens, workspace)
    try:
        check_step(candidate)
    except ValueError as exc:
        return Candidate(checkpoint_layers, offload, tokens, workspace, grad_in_forward, time, None, str(exc))
    return Candidate(checkpoint_layers, offload, tokens, workspace, grad_in_forward, time,
                     simulate(candidate, hf_config))
