"""Forward: per-token logsumexp over the vocabulary and the target's logit, logits never written to memory.

Each program owns BLOCK_N tokens and one contiguous vocabulary split; it sweeps the split's tiles with an
online logsumexp. Splits are merged on the host; merging is deterministic. Program order: split fastest, so the
programs resident at once share few token blocks (their hidden rows stay in L2) and walk all splits of the weight.
`n_splits` is not specialized: the one-split launch that measures the kernel's occupancy (once per dtype, device
and config) compiles the same kernel as the launches that run.
"""
import torch
import triton
import triton.language as tl

from .config import KernelConfig, Launch, l2_bytes as device_l2_bytes, launch_config, sm_count, \
    tile_meta as launch_meta
from .gpus import programs_per_sm
from .logits_tile import head_logits, logits_tile


@triton.jit(do_not_specialize=["n_splits"])
def lse_gather_kernel(
    hidden_ptr, weight_ptr, target_ptr, lse_ptr, target_logit_ptr,
    n_tokens, vocab_size, hidden_dim, vocab_per_split, n_splits,
    stride_hn, stride_hd, stride_wv, stride_wd,
    inv_temperature, softcap,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, HAS_CAP: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_split = pid % n_splits
    row0 = (pid // n_splits).to(tl.int64) * BLOCK_N
    n_valid = n_tokens - row0
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)
    row_mask = offs_n < n_valid
    targets = tl.load(target_ptr + row0 + offs_n, mask=row_mask, other=-1)
    hidden_base = hidden_ptr + row0 * stride_hn

    running_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    target_logit = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_begin = pid_split.to(tl.int64) * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab_size)
    for v0 in range(v_begin, v_end, BLOCK_V):
        v_valid = v_end - v0
        logits = head_logits(logits_tile(
            hidden_base, weight_ptr + v0 * stride_wv, n_valid, v_valid, hidden_dim,
            stride_hn, stride_hd, stride_wv, stride_wd, BLOCK_N, BLOCK_V, BLOCK_D, INPUT_PRECISION, UPCAST_OPERANDS,
        ), softcap, inv_temperature, HAS_CAP)
        logits = tl.where((offs_v < v_valid)[None, :], logits, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
        local_target = (targets - v0).to(tl.int32)
        target_logit += tl.sum(tl.where(offs_v[None, :] == local_target[:, None], logits, 0.0), axis=1)

    out = pid_split.to(tl.int64) * n_tokens + row0 + offs_n
    tl.store(lse_ptr + out, running_max + tl.log(running_sum), mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)


def _vocab_splits(n_tokens: int, vocab_size: int, hidden_dim: int, elem_bytes: int, cfg: KernelConfig,
                  sm_count: int | None, l2_bytes: int, programs_per_sm: int) -> int:
    """Vocabulary splits S (one on CPU: sm_count None). The resident programs (programs_per_sm x SMs) hold about
    resident/S token blocks: S is the smallest count that keeps their hidden rows within a quarter of the L2 (the
    rest holds the weight tiles in flight) and fills the
    waves best (idle slots of the last wave and the uneven last split counted, to 1 %)."""
    if sm_count is None:
        return 1
    tiles, row_blocks = triton.cdiv(vocab_size, cfg.block_v), triton.cdiv(n_tokens, cfg.block_n)
    resident = max(1, programs_per_sm) * sm_count
    best_score, best = None, 1
    for splits in range(1, min(tiles, 2 * resident) + 1):
        per_split = triton.cdiv(tiles, splits)
        if triton.cdiv(tiles, per_split) != splits:
            continue
        waves = triton.cdiv(row_blocks * splits, resident)
        efficiency = row_blocks * tiles / (waves * resident * per_split)
        in_flight = min(row_blocks, triton.cdiv(resident, splits)) * cfg.block_n + splits * cfg.block_v
        fits = in_flight * hidden_dim * elem_bytes <= l2_bytes // 2
        score = (fits, round(efficiency, 2))
        if best_score is None or score > best_score:
            best_score, best = score, splits
    return best


def lse_gather_launch(hidden, weight, targets, inv_temperature: float, cfg: KernelConfig, sm_count: int | None,
                      l2_bytes: int = 0, programs_per_sm: int = 1, *, softcap: float | None = None):
    """The launch of lse_gather_kernel for these inputs (any device, `meta` included) on a GPU with sm_count SMs
    (None: CPU), l2_bytes of L2 and programs_per_sm resident programs, and the (splits, N) fp32 outputs it fills:
    (launch, lse_parts, target_parts). softcap: logits c * tanh(h.W / c) * inv_temperature (None: no cap)."""
    n_tokens, hidden_dim = hidden.shape
    vocab_size = weight.shape[0]
    splits = _vocab_splits(n_tokens, vocab_size, hidden_dim, hidden.element_size(), cfg, sm_count, l2_bytes,
                           programs_per_sm)
    vocab_per_split = triton.cdiv(triton.cdiv(vocab_size, splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(vocab_size, vocab_per_split)
    lse_parts = torch.empty((splits, n_tokens), dtype=torch.float32, device=hidden.device)
    target_parts = torch.empty_like(lse_parts)
    launch = Launch(
        lse_gather_kernel, (triton.cdiv(n_tokens, cfg.block_n) * splits,),
        (hidden, weight, targets, lse_parts, target_parts, n_tokens, vocab_size, hidden_dim, vocab_per_split, splits,
         hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), inv_temperature,
         1.0 if softcap is None else softcap),
        dict(**launch_meta(cfg), HAS_CAP=softcap is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )
    return launch, lse_parts, target_parts


_PROGRAMS_PER_SM: dict[tuple, int] = {}
"""(dtype, device, KernelConfig, soft-capped) -> programs per SM of the compiled lse_gather_kernel there."""


def _resident_programs(hidden, weight, targets, inv_temperature: float, cfg: KernelConfig,
                       softcap: float | None = None) -> int:
    """Programs per SM of the compiled kernel on hidden's CUDA device (1 if Triton does not expose its registers),
    measured on the first call for (dtype, device, cfg, whether the logits are soft-capped) and cached."""
    key = (hidden.dtype, hidden.device, cfg, softcap is not None)
    if key not in _PROGRAMS_PER_SM:
        launch, _, _ = lse_gather_launch(hidden, weight, targets, inv_temperature, cfg, None, softcap=softcap)
        with torch.cuda.device(hidden.device):
            compiled = launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.options)
            try:
                compiled._init_handles()
                registers = compiled.n_regs
            except (AttributeError, TypeError):
                _PROGRAMS_PER_SM[key] = 1
                return 1
        major, minor = torch.cuda.get_device_capability(hidden.device)
        _PROGRAMS_PER_SM[key] = max(1, programs_per_sm(registers, compiled.metadata.shared, cfg.num_warps,
                                                       10 * major + minor))
    return _PROGRAMS_PER_SM[key]


def lse_gather(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_temperature: float,
               softcap: float | None = None, cfg: KernelConfig | None = None):
    """hidden (N, d), weight (V, d) same float dtype, targets (N,) int64 in [0, V); cfg: the tile (default
    `launch_config`'s).

    Returns (lse, target_logit): (N,) float32 each, of logits = hidden @ weight.T * inv_temperature (with softcap:
    softcap * tanh(hidden @ weight.T / softcap) * inv_temperature).
    """
    cfg = cfg or launch_config(hidden.dtype, hidden.device, "lse_gather", softcap is not None)
    sms = sm_count(hidden.device)
    if sms is None:
        launch, lse_parts, target_parts = lse_gather_launch(hidden, weight, targets, inv_temperature, cfg, None,
                                                            softcap=softcap)
    else:
        resident = _resident_programs(hidden, weight, targets, inv_temperature, cfg, softcap)
        launch, lse_parts, target_parts = lse_gather_launch(hidden, weight, targets, inv_temperature, cfg, sms,
                                                            device_l2_bytes(hidden.device), resident, softcap=softcap)
    launch()
    if lse_parts.shape[0] == 1:
        return lse_parts[0], target_parts[0]
    return torch.logsumexp(lse_parts, dim=0), target_parts.sum(dim=0)
