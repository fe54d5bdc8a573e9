"""benchmarks/gpu_check.sh runs end to end on a CPU in its dry-run mode, writing its result files."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(GPU_CHECK_DRY_RUN="1", PYTHON=os.environ.get("PYTHON", "python"))
    result = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    out = tmp_path / "out"
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["steps"]) == {"tests", "check_kernels", "bench_loss", "bench_prefix"}
    assert all(step["exit"] == 0 for step in results["steps"].values()), results["steps"]
    md = (out / "results.md").read_text()
    assert "HGMMA" in md and "Model: H100 SXM5" in md and "whole step" in md
    assert sorted(p.name for p in (out / "sass").iterdir())[0].endswith("_sm90.sass")
