"""Peak-memory growth of one call: the CUDA allocator's peak, or on CPU the process's peak RSS (VmHWM).

CPU measurements belong in a fresh process (glibc told to mmap blocks >= 1 MiB, MALLOC_MMAP_THRESHOLD_, so
freed tensors leave the RSS); `subprocess_env()` gives that environment.
"""
from __future__ import annotations

import gc
import os

import torch


def subprocess_env() -> dict:
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peak_growth(fn) -> int:
    """Bytes the peak RSS grows during fn(), after resetting VmHWM through /proc/self/clear_refs."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    baseline = _proc_status_kb("VmRSS")
    if _proc_status_kb("VmHWM") > baseline + 1024:
        raise RuntimeError("could not reset VmHWM through /proc/self/clear_refs")
    fn()
    return (_proc_status_kb("VmHWM") - baseline) * 1024


def cuda_peak_growth(fn) -> int:
    """Bytes the CUDA allocator's peak grows over what was allocated before fn()."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
