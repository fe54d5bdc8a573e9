#!/usr/bin/env bash
# Usage: benchmarks/gpu_check.sh OUT_DIR
#
# One command for a GPU machine, offline, within one 10-minute slot: the phases run most valuable first, each under
# `timeout` clipped to a total deadline (TOTAL_TIMEOUT, 540 s by default: 60 s of the slot left for start-up and
# transfers; the last SUMMARY_S = 20 s of it kept for the summary):
#   1. bench_loss (140 s)     the fused loss's kernels next to cuBLAS's time for the same GEMMs and the traffic model;
#                             the recompute kernels at their previous and shipped tiles; fwd+bwd of the Triton and
#                             torch backends on both gradient paths (grad in forward, recompute) with a trained and
#                             a frozen lm_head (Qwen3-8B shapes), and at the fp32 target's shape
#   2. bench_train (110 s)    Qwen3-8B LoRA r16 train step at the planner's settings, bf16: peak memory, tokens/s
#   3. bench_attention (50 s) varlen attention fwd+bwd per backend (flash, torch, sdpa)
#   4. tests (120 s)          the correctness tests whose code runs on the GPU
#   5. train_cuda (50 s)      bf16 training through fp32 masters; the step under sync debug mode "error"
#   6. check_kernels (50 s)   `sdpo-fast check-kernels --model` for the local GPU's arch
# (limits: *_TIMEOUT variables below). Each benchmark case appends its figures to OUT_DIR/PHASE.jsonl as it ends,
# so a phase killed at its limit keeps the cases it finished, and every phase keeps its files whatever follows.
# Writes OUT_DIR/results.md and OUT_DIR/results.json (steps, tests, check-kernels, every benchmark row), with each
# phase's log beside them. Installs nothing but the wheels in $WHEELS_DIR, if set (--no-deps --no-index); the
# checkout is imported through PYTHONPATH. PYTHON: the interpreter (default python3). Exit status 0 when every
# phase exited 0.
# GPU_CHECK_DRY_RUN=1: the same flow on a CPU (tests and benchmarks collected, not run; check-kernels and the
# traffic model for sm_90 at N=1024), so that the script cannot break unnoticed (tests/kernels/
# test_gpu_check_dry_run.py, which also runs it on a stand-in interpreter to check the order, the deadlines and
# that a killed phase keeps what came before).
set -uo pipefail
DRY=${GPU_CHECK_DRY_RUN:-0}

if [ $# -ne 1 ]; then echo "usage: $0 OUT_DIR" >&2; exit 2; fi
mkdir -p "$1" && OUT=$(cd "$1" && pwd -P) || exit 2
REPO=$(cd "$(dirname "$0")/.." && pwd -P)
cd "$REPO" || exit 2
PY=${PYTHON:-python3}
SUMMARY_S=20
DEADLINE=$((SECONDS + ${TOTAL_TIMEOUT:-540} - SUMMARY_S))
: >"$OUT/steps.tsv"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # as `sdpo-fast train` sets it

# run_step NAME LIMIT_S CMD...: CMD under `timeout` (clipped to the deadline), output in OUT/NAME.log; a benchmark
# phase's cases go to OUT/NAME.jsonl (SDPO_BENCH_JSONL, benchmarks/conftest.py).
run_step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if ((DEADLINE - SECONDS < limit)); then limit=$((DEADLINE - SECONDS)); fi
  if ((limit < 10)); then
    echo "not run: out of time" >"$OUT/$name.log"
    rc=124
  else
    SDPO_BENCH_JSONL="$OUT/$name.jsonl" timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
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

BENCH=(--benchmark-only -q -rs "${COLLECT[@]}")
run_step bench_loss "${BENCH_TIMEOUT:-140}" "$PY" -m pytest benchmarks/test_loss_bench.py "${BENCH[@]}" \
  -k "test_kernels_vs_model or test_recompute_tiles or (test_fwd_bwd and (triton or torch) and target) or (test_paths_fwd_bwd and qwen3)" \
  --benchmark-json="$OUT/bench_loss.json"
run_step bench_train "${TRAIN_TIMEOUT:-110}" "$PY" -m pytest benchmarks/test_train_bench.py "${BENCH[@]}" \
  -k "qwen3-8b and trainer" --benchmark-json="$OUT/bench_train.json"
run_step bench_attention "${ATTENTION_TIMEOUT:-50}" "$PY" -m pytest benchmarks/test_attention_bench.py "${BENCH[@]}" \
  --benchmark-json="$OUT/bench_attention.json"
# Only the tests whose code runs on the GPU (kernels, loss, model passes, the training step); CI runs the rest.
run_step tests "${TESTS_TIMEOUT:-120}" "$PY" -m pytest tests/kernels tests/loss tests/model tests/train/test_step.py \
    -q -rfE --maxfail=20 --junitxml="$OUT/tests.xml" \
    "${COLLECT[@]}" --deselect tests/kernels/test_gpu_check_dry_run.py::test_gpu_check_dry_run
# bf16 training through fp32 master weights, and the step under torch.cuda.set_sync_debug_mode("error").
run_step train_cuda "${TRAIN_CUDA_TIMEOUT:-50}" "$PY" -m pytest tests/train/test_precision.py tests/train/test_syncs.py \
    -m cuda -q -rfE "${COLLECT[@]}"
run_step check_kernels "${KERNELS_TIMEOUT:-50}" "$PY" -m sdpo_fast.cli check-kernels ${ARCH:+--arch "$ARCH"} \
    --dtype "$DTYPES" --shape "$SHAPE" --model --sass "$OUT/sass"

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import summarize

out = Path(sys.argv[1])
env = json.loads((out / "env.json").read_text())
steps = {name: {"exit": int(rc), "seconds": int(s), "limit_s": int(limit)}
         for name, rc, s, limit in (line.split("\t") for line in (out / "steps.tsv").read_text().splitlines())}


def lines(name):
    path = out / f"{name}.log"
    return path.read_text(errors="replace").splitlines() if path.exists() else []


test_log = lines("tests")
summary = next((line.strip("= ") for line in reversed(test_log) if re.search(r"\d+ (passed|failed|errors?)\b", line)),
               f"no pytest summary (exit {steps.get('tests', {}).get('exit')})")
failures = [line for line in test_log if line.startswith(("FAILED ", "ERROR "))]
kernels = lines("check_kernels")
kernel_text = [line for line in kernels if "Warning" not in line and "warn_once" not in line]


def bench(name):
    """pytest-benchmark's JSON of a phase that ended; else the cases it finished before it was stopped."""
    full, partial = out / f"{name}.json", out / f"{name}.jsonl"
    if full.exists():
        return json.loads(full.read_text())
    if partial.exists() and partial.read_text().strip():
        rows = [json.loads(line) for line in partial.read_text().splitlines() if line.strip()]
        return {"machine_info": {"sdpo_fast": {"gpu": env["gpu"]}}, "commit_info": {}, "benchmarks": rows}
    return None


benches = [b for b in map(bench, [name for name in steps if name.startswith("bench_")]) if b is not None]
gpu = (out / "nvidia-smi.txt").read_text().strip()

results = {"env": env, "nvidia_smi": gpu, "steps": steps, "tests": {"summary": summary, "failures": failures},
           "check_kernels": "\n".join(kernels), "benchmarks": summarize.rows(benches)}
(out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("gpu", "arch", "commit") and v)
md = ["# sdpo_fast GPU check", "", f"- GPU: {env['gpu'] or 'none'} ({env['arch'] or 'no CUDA'}); nvidia-smi: {gpu}",
      f"- {versions}", f"- commit: {env['commit'] or 'unknown'}", "",
      "| step | exit | seconds | limit s |", "|---|--:|--:|--:|"]
md += [f"| {name} | {s['exit']} | {s['seconds']} | {s['limit_s']} |" for name, s in steps.items()]
md += ["", "## Benchmarks", ""]
md.append(summarize.markdown(benches) if benches else "no benchmark results (see bench_*.log)")
md += ["", "## Tests", "", summary, "", *[f"- {line}" for line in failures], "",
       f"## check-kernels and the traffic model ({env['arch'] or 'sm_90'})", "", *kernel_text, ""]
(out / "results.md").write_text("\n".join(md) + "\n")
sys.exit(any(s["exit"] for s in steps.values()))
EOF
