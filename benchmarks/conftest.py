"""Benchmark session settings: library versions, torch threads and the GPU go into pytest-benchmark's machine info;
with SDPO_BENCH_JSONL set, each benchmark's figures are appended to that file as soon as its test ends
(pytest-benchmark writes its JSON only when the session ends, so a phase killed by a deadline would lose them)."""
import json
import os
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["sdpo_fast"] = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """After a benchmark test's body: one pytest-benchmark-shaped row (name, group, stats, extra_info) appended to
    SDPO_BENCH_JSONL and flushed to disk."""
    yield
    path = os.environ.get("SDPO_BENCH_JSONL")
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(fixture, "stats", None), "stats", None)
    if not path or stats is None or not stats.data:
        return
    row = {"name": item.name, "group": fixture.group,
           "stats": {"median": stats.median, "min": stats.min, "rounds": stats.rounds},
           "extra_info": dict(fixture.extra_info)}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
