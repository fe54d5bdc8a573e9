"""benchmarks/gpu_check.sh runs end to end on a CPU in its dry-run mode, writing its result files."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # a shared 2-core CI box compiles slower than a GPU machine's CPU: wider limits than the lease's
    env.update(GPU_CHECK_DRY_RUN="1", PYTHON=os.environ.get("PYTHON", sys.executable), TOTAL_TIMEOUT="900",
               TESTS_TIMEOUT="300", KERNELS_TIMEOUT="300", BENCH_TIMEOUT="200", TRAIN_TIMEOUT="150",
               PREFIX_TIMEOUT="150")
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=960, cwd=REPO)
    out = tmp_path / "out"
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["steps"]) == {"tests", "train_cuda", "check_kernels", "bench_loss", "bench_train",
                                     "bench_prefix"}
    assert all(step["exit"] == 0 for step in results["steps"].values()), results["steps"]
    md = (out / "results.md").read_text()
    assert "HGMMA" in md and "Model: H100 SXM5" in md and "whole step" in md
    assert sorted(p.name for p in (out / "sass").iterdir())[0].endswith("_sm90.sass")


def test_summarize_puts_measured_kernels_next_to_the_model():
    import importlib.util
    spec = importlib.util.spec_from_file_location("summarize", REPO / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
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
