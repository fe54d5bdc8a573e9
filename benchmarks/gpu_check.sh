#!/usr/bin/env bash
# Usage: benchmarks/gpu_check.sh OUT_DIR
#
# One command for a GPU machine, offline: the correctness tests (on CUDA wherever a GPU is present),
# `sdpo-fast check-kernels --model` for the local GPU's arch and the GPU benchmarks (each kernel's TFLOP/s next to the
# traffic model's, cuBLAS and Liger at equal shapes, the Qwen3-8B LoRA step), within one deadline (460 s by default,
# TOTAL_TIMEOUT), each step under `timeout`. Writes OUT_DIR/results.md and OUT_DIR/results.json, with each step's
# log and the pytest-benchmark JSON files beside them. Installs nothing but the wheels in $WHEELS_DIR, if set
# (--no-deps --no-index), and this checkout itself (editable, offline; or a sitecustomize shim when that fails).
# Exit status 0 when every step exited 0.
# GPU_CHECK_DRY_RUN=1: the same flow on a CPU in about a minute (tests and benchmarks collected, not run;
# check-kernels and the traffic model for sm_90 at N=1024), so that the script cannot break unnoticed
# (tests/kernels/test_gpu_check_dry_run.py).
set -uo pipefail
DRY=${GPU_CHECK_DRY_RUN:-0}

if [ $# -ne 1 ]; then echo "usage: $0 OUT_DIR" >&2; exit 2; fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd -P) || exit 2
REPO=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$REPO" || exit 2
PY=${PYTHON:-python}
DEADLINE=$((SECONDS + ${TOTAL_TIMEOUT:-460}))
: >"$OUT/steps.tsv"

# run_step NAME LIMIT_S CMD...: CMD under `timeout` (clipped to the deadline), output in OUT/NAME.log.
run_step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if ((DEADLINE - SECONDS < limit)); then limit=$((DEADLINE - SECONDS)); fi
  if ((limit < 10)); then
    echo "not run: out of time" >"$OUT/$name.log"
    rc=124
  else
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
  fi
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" >>"$OUT/steps.tsv"
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)"
}

if [ -n "${WHEELS_DIR:-}" ] && [ "$DRY" != 1 ]; then
  "$PY" -m pip install --no-deps --no-index "$WHEELS_DIR"/*.whl >>"$OUT/install.log" 2>&1 \
    || echo "installing the wheels in $WHEELS_DIR failed: see $OUT/install.log" >&2
fi

# sdpo_fast.kernels is the link sdpo_fast/kernels -> ../kernels, so the checkout on PYTHONPATH is the whole package.
imports_checkout() {
  (cd / && "$PY" -c '
import os, sys
import sdpo_fast, sdpo_fast.kernels.config
sys.exit(not all(os.path.realpath(m.__file__).startswith(sys.argv[1]) for m in (sdpo_fast, sdpo_fast.kernels.config)))
' "$REPO/") 2>>"$OUT/install.log"
}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
imports_checkout || { echo "cannot import sdpo_fast.kernels from $REPO: see $OUT/install.log" >&2; exit 1; }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$OUT/nvidia-smi.txt" 2>/dev/null \
  || echo "nvidia-smi failed or is missing" >"$OUT/nvidia-smi.txt"
"$PY" - >"$OUT/env.json" <<'EOF'
import json, platform, subprocess
from importlib.metadata import PackageNotFoundError, version

import torch


def pkg(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


cuda = torch.cuda.is_available()
try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
except OSError:
    commit = None
print(json.dumps({
    "gpu": torch.cuda.get_device_name() if cuda else None,
    "arch": "sm_%d%d" % torch.cuda.get_device_capability() if cuda else None,
    "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
    **{name: pkg(name) for name in ("triton", "transformers", "peft", "pytest-benchmark", "liger-kernel")},
    "commit": commit,
}))
EOF
ARCH=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["arch"] or "")' "$OUT/env.json")
COLLECT=()
SHAPE=qwen3-8b
DTYPES=bf16,fp16
if [ "$DRY" = 1 ]; then COLLECT=(--collect-only); ARCH=sm_90; SHAPE=1024,4096,151936; DTYPES=bf16; fi

# Only the tests whose code runs on the GPU (kernels, loss, model passes, the training step); CI runs the rest.
run_step tests "${TESTS_TIMEOUT:-150}" "$PY" -m pytest tests/kernels tests/loss tests/model tests/train/test_step.py \
    -q -rfE --maxfail=20 --junitxml="$OUT/tests.xml" \
    "${COLLECT[@]}" --deselect tests/kernels/test_gpu_check_dry_run.py::test_gpu_check_dry_run
# bf16 training through fp32 master weights, and the step under torch.cuda.set_sync_debug_mode("error").
run_step train_cuda "${TRAIN_CUDA_TIMEOUT:-90}" "$PY" -m pytest tests/train/test_precision.py tests/train/test_syncs.py \
    -m cuda -q -rfE "${COLLECT[@]}"
run_step check_kernels "${KERNELS_TIMEOUT:-90}" "$PY" -m sdpo_fast.cli check-kernels ${ARCH:+--arch "$ARCH"} \
    --dtype "$DTYPES" --shape "$SHAPE" --model --sass "$OUT/sass"
# Separate runs and JSON files, so a timeout in one keeps the other's figures; -k cuda keeps the GPU cases.
run_step bench_loss "${BENCH_TIMEOUT:-170}" "$PY" -m pytest benchmarks/test_loss_bench.py --benchmark-only -q -rs \
  "${COLLECT[@]}" --benchmark-json="$OUT/bench_loss.json"
run_step bench_train "${TRAIN_TIMEOUT:-60}" "$PY" -m pytest benchmarks/test_train_bench.py -k qwen3-8b --benchmark-only \
  "${COLLECT[@]}" -q -rs --benchmark-json="$OUT/bench_train.json"
run_step bench_prefix "${PREFIX_TIMEOUT:-45}" "$PY" -m pytest benchmarks/test_prefix_bench.py -k cuda --benchmark-only \
  "${COLLECT[@]}" -q -rs --benchmark-json="$OUT/bench_prefix.json"

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import summarize

out = Path(sys.argv[1])
env = json.loads((out / "env.json").read_text())
steps = {name: {"exit": int(rc), "seconds": int(s), "limit_s": int(limit)}
         for name, rc, s, limit in (line.split("\t") for line in (out / "steps.tsv").read_text().splitlines())}
test_log = (out / "tests.log").read_text(errors="replace").splitlines()
summary = next((line.strip("= ") for line in reversed(test_log) if re.search(r"\d+ (passed|failed|errors?)\b", line)),
               f"no pytest summary (exit {steps['tests']['exit']})")
failures = [line for line in test_log if line.startswith(("FAILED ", "ERROR "))]
kernels = (out / "check_kernels.log").read_text(errors="replace").splitlines()
kernel_text = [line for line in kernels if "Warning" not in line and "warn_once" not in line]
benches = [json.loads(p.read_text()) for p in (out / "bench_loss.json", out / "bench_train.json", out / "bench_prefix.json")
           if p.exists()]
gpu = (out / "nvidia-smi.txt").read_text().strip()

results = {"env": env, "nvidia_smi": gpu, "steps": steps, "tests": {"summary": summary, "failures": failures},
           "check_kernels": "\n".join(kernels), "benchmarks": summarize.rows(benches)}
(out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("gpu", "arch", "commit") and v)
md = ["# sdpo_fast GPU check", "", f"- GPU: {env['gpu'] or 'none'} ({env['arch'] or 'no CUDA'}); nvidia-smi: {gpu}",
      f"- {versions}", f"- commit: {env['commit'] or 'unknown'}", "",
      "| step | exit | seconds | limit s |", "|---|--:|--:|--:|"]
md += [f"| {name} | {s['exit']} | {s['seconds']} | {s['limit_s']} |" for name, s in steps.items()]
md += ["", "## Tests", "", summary, "", *[f"- {line}" for line in failures], "",
       f"## check-kernels and the traffic model ({env['arch'] or 'sm_90'})", "", *kernel_text, ""]
md += ["## Benchmarks", ""]
md.append(summarize.markdown(benches) if benches else "no benchmark results (see bench_*.log)")
(out / "results.md").write_text("\n".join(md) + "\n")
sys.exit(any(s["exit"] for s in steps.values()))
EOF
