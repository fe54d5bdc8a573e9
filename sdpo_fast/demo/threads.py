"""Running tiny CPU workloads on one thread."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """torch on one intra-op thread inside the block (restored after). Tiny models' CPU ops are too small to
    gain from threads; on a busy 2-core machine the hand-offs made their steps ~30x slower."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
