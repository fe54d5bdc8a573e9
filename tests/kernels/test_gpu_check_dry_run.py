"""benchmarks/gpu_check.sh runs end to end on a CPU in its dry-run mode, writing its result files; on a stand-in
interpreter it runs its phases in order, within their limits and the total deadline, and keeps what a killed phase
finished and everything before it."""
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PHASES = ["bench_loss", "bench_train", "bench_attention", "tests", "train_cuda", "check_kernels"]
SLOT_S, STARTUP_S = 600, 60  # the device machine's 10-minute slot; its start-up and transfers

STUB = """#!/usr/bin/env bash
# python3 stand-in: a phase's `-m pytest` / `-m sdpo_fast.cli` run is logged, appends one benchmark row to the phase's
# SDPO_BENCH_JSONL (bench_* phases) and exits 0, or hangs after its row for the phase named by STUB_HANG; anything
# else (env.json, the import check, the summary) runs on the real interpreter.
if [ "$1" = -m ] && {{ [ "$2" = pytest ] || [ "$2" = sdpo_fast.cli ]; }}; then
  phase=$(basename "${{SDPO_BENCH_JSONL:-none}}" .jsonl)
  echo "$phase" >>"$STUB_LOG"
  if [[ $phase == bench_* ]]; then
    echo '{{"name": "'$phase'-case", "group": "g", "stats": {{"median": 1.0, "min": 1.0, "rounds": 1}}, "extra_info": {{}}}}' \\
      >>"$SDPO_BENCH_JSONL"
  fi
  if [ "$phase" = "$STUB_HANG" ]; then exec sleep 1000; fi
  exit 0
fi
exec {python} "$@"
"""


def _outside_pytest() -> dict[str, str]:
    """This environment as a shell outside the test run would have it: no interpreter flag, no pytest-xdist worker
    variables (a pytest started with them takes itself for a worker)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("PYTEST_")}


def _run_on_stub(tmp_path, **env_values):
    stub = tmp_path / "python3"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in _outside_pytest().items() if not k.endswith("_TIMEOUT")}
    env.update(PYTHON=str(stub), STUB_LOG=str(tmp_path / "calls.log"), **env_values)
    start = time.monotonic()
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                            timeout=300, cwd=REPO)
    out = tmp_path / "out"
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    return result, time.monotonic() - start, out, {name: (int(rc), int(s), int(limit)) for name, rc, s, limit in steps}


def test_default_phase_limits_fit_the_deadline_and_the_deadline_fits_the_slot():
    text = SCRIPT.read_text()
    limits = dict(re.findall(r"run_step \w+ \"\$\{(\w+_TIMEOUT):-(\d+)\}\"", text))
    total = int(re.search(r"TOTAL_TIMEOUT:-(\d+)", text).group(1))
    summary = int(re.search(r"^SUMMARY_S=(\d+)$", text, re.M).group(1))
    assert len(limits) == len(PHASES)
    assert sum(map(int, limits.values())) <= total - summary and total + STARTUP_S <= SLOT_S
    assert re.search(r"^PY=\$\{PYTHON:-python3\}$", text, re.M)


def test_phases_run_in_order_and_a_killed_phase_keeps_its_finished_cases_and_the_earlier_results(tmp_path):
    result, _, out, steps = _run_on_stub(tmp_path, STUB_HANG="bench_train", TRAIN_TIMEOUT="12")
    assert list(steps) == PHASES and (tmp_path / "calls.log").read_text().split() == PHASES
    rc, seconds, limit = steps["bench_train"]
    assert rc == 124 and limit == 12 and seconds <= limit + 11  # killed at its limit (TERM, KILL 10 s later)
    assert all(steps[name][0] == 0 for name in PHASES if name != "bench_train")
    assert result.returncode == 1
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["benchmarks"]] == ["bench_loss-case", "bench_train-case",
                                                              "bench_attention-case"]
    assert "bench_train-case" in (out / "results.md").read_text()


def test_the_total_deadline_cuts_the_phases_that_do_not_fit(tmp_path):
    """TOTAL_TIMEOUT 80 s (60 s for phases, the summary's 20 s kept; start-up takes some of it): the first phase
    hangs and is killed at the deadline, the others are not started; the script still ends within the total and
    writes the results."""
    result, elapsed, out, steps = _run_on_stub(tmp_path, STUB_HANG="bench_loss", TOTAL_TIMEOUT="80")
    rc, seconds, limit = steps["bench_loss"]
    assert rc == 124 and 10 <= limit < 60 and seconds <= limit + 11
    assert all(steps[name][0] == 124 and steps[name][1] <= 1 for name in PHASES[1:])
    assert (tmp_path / "calls.log").read_text().split() == ["bench_loss"]
    assert elapsed <= 80 + 11
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["benchmarks"]] == ["bench_loss-case"]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = _outside_pytest()
    # a shared 2-core CI box compiles slower than a GPU machine's CPU: wider limits than the lease's
    env.update(GPU_CHECK_DRY_RUN="1", PYTHON=os.environ.get("PYTHON", sys.executable), TOTAL_TIMEOUT="900",
               TESTS_TIMEOUT="300", KERNELS_TIMEOUT="300", BENCH_TIMEOUT="200", TRAIN_TIMEOUT="150",
               ATTENTION_TIMEOUT="150", TRAIN_CUDA_TIMEOUT="150")
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=960, cwd=REPO)
    out = tmp_path / "out"
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["steps"]) == PHASES
    assert all(step["exit"] == 0 for step in results["steps"].values()), results["steps"]
    md = (out / "results.md").read_text()
    assert "HGMMA" in md and "Model: H100 SXM5" in md and "whole step" in md
    assert sorted(p.name for p in (out / "sass").iterdir())[0].endswith("_sm90.sass")


@pytest.fixture
def summarize():
    """benchmarks/summarize.py, loaded from its file."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("summarize", REPO / "benchmarks" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_summarize_puts_measured_kernels_next_to_the_model(summarize):
    kernels = {"lse_gather": dict(measured_s=0.05, tflops=816.0, cublas_s=0.04, predicted_s=0.0425,
                                  predicted_tflops=959.0),
               "grad_weight": dict(measured_s=0.03, tflops=680.0, cublas_s=0.02, predicted_s=None,
                                   predicted_tflops=None)}
    bench = {"machine_info": {"cpu": {"brand_raw": "cpu"}}, "commit_info": {}, "benchmarks": [
        {"name": "k", "group": "g", "stats": {"median": 0.08, "min": 0.08, "rounds": 3},
         "extra_info": dict(device="cuda", dtype="bf16", n=16384, d=4096, vocab=151936, gpu_model="H100 SXM5",
                            kernels=kernels, predicted_step_s=0.1047, predicted_step_tflops=974.0)}]}
    md = summarize.markdown([bench])
    assert "| lse_gather | 50.00 | 816 | 42.50 | 959 | 40.00 |" in md
    assert "| grad_weight | 30.00 | 680 | – | – | 20.00 |" in md
    step = 10 * 16384 * 4096 * 151936 / 0.08 / 1e12
    assert f"| whole step (10·N·d·V) | 80.0 | {step:.0f} | 104.7 | 974 | 60.0 |" in md


def test_summarize_names_each_loss_rows_path_head_and_flops(summarize):
    n, d, vocab = 16384, 4096, 151936
    shape = dict(device="cuda", dtype="bf16", n=n, d=d, vocab=vocab)

    def bench(median, **info):
        return {"name": "b", "group": "g", "stats": {"median": median, "min": median, "rounds": 5},
                "extra_info": dict(shape, **info)}

    rows = [bench(0.2, backend="triton", flops=10 * n * d * vocab, tflops=1.0),
            bench(0.1, backend="triton", grad_in_forward=True, frozen_head=True, flops=6 * n * d * vocab,
                  tflops=2.0, x_cublas=1.05)]
    md = summarize.markdown([{"machine_info": {}, "commit_info": {}, "benchmarks": rows}])
    lines = [line for line in md.splitlines() if line.startswith("| cuda")]
    assert lines[0].startswith("| cuda | bf16 | 16384 | 4096 | 151936 | triton | by budget | trained | 10·N·d·V | "
                               "0.2 |")
    assert lines[1].startswith("| cuda | bf16 | 16384 | 4096 | 151936 | triton | grad in forward | frozen | 6·N·d·V | "
                               "0.1 |") and "| 1.05 |" in lines[1]
