"""`sdpo-fast check-kernels` compiles the fused path's kernels as the run-time launch specializes them (no GPU)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
SIXTEEN_BIT = "bf16,fp16"
ROW_KERNELS = {"row_lse_kernel", "row_token_grad_kernel", "row_divergence_grad_kernel"}
"""The grad-in-forward path's row kernels: memory-bound sweeps without products (its GEMMs are cuBLAS)."""


def check_kernels(*argv, timeout=600):
    result = subprocess.run([sys.executable, "-m", "sdpo_fast.cli", "check-kernels", *argv, "--json"],
                            capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def sass_opcodes(path: Path) -> set[str]:
    """Opcodes of a SASS listing: the first word after each /*address*/."""
    return set(re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", path.read_text()))


def hgmma_shape(kernel: str, dtype: str) -> str:
    """The HGMMA shape (one warpgroup's M x N x K) that kernel_config's sm_90 tile of `kernel` should compile to:
    N is the tile's column count (grad_weight: its 2 x block_d hidden columns), at most 256."""
    import torch

    from sdpo_fast.kernels.config import kernel_config
    from sdpo_fast.kernels.grad_weight import launch_meta

    cfg = kernel_config({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype], 90, kernel)
    return f"64x{min(256, launch_meta(cfg)['BLOCK_D'] if kernel == 'grad_weight' else cfg.block_v)}x16"


@pytest.mark.parametrize("arch,mma,dtypes", [("sm_90", "HGMMA", SIXTEEN_BIT), ("sm_80", "HMMA", SIXTEEN_BIT),
                                             ("sm_89", "HMMA", "bf16")])
def test_fused_path_lowers_to_tensor_cores_with_async_copies(arch, mma, dtypes, tmp_path):
    """Every 16-bit kernel of one loss step at d=4096, V=151936 (sampled_token's, and the logit modes'
    chunk_logits and their grad_weight chunks), at the tiles kernel_config ships for the arch: the tensor-core
    instruction of the arch (on sm_90 of the width the tile asks for), async copies, a software pipeline, no
    spills; read back from the SASS files --sass writes (a kernel's second specialization: _v1)."""
    out = check_kernels("--arch", arch, "--dtype", dtypes, "--shape", "1024,4096,151936", "--sass", str(tmp_path))
    rows = out["kernels"]
    assert {r["kernel"] for r in rows} == {"lse_gather_kernel", "grad_logits_kernel", "grad_weight_kernel",
                                           "chunk_logits_kernel"} | ROW_KERNELS
    assert {r["dtype"] for r in rows} == set(dtypes.split(","))
    variants = {}
    for row in rows:
        name = row["kernel"].removesuffix("_kernel")
        variant = variants[name, row["dtype"]] = variants.get((name, row["dtype"]), -1) + 1
        opcodes = sass_opcodes(tmp_path / (f"{name}_{row['dtype']}_sm{arch[3:]}" + (f"_v{variant}" if variant else "")
                                           + ".sass"))
        assert not opcodes & {"STL", "LDL"}, name  # no local-memory traffic (spills)
        if row["kernel"] in ROW_KERNELS:
            assert row["stack_bytes"] == row["local_bytes"] == 0 and row["programs_per_sm"] >= 2, row
            assert "vocab_size=i32:16" in row["signature"], row
            continue
        assert row["mma"] == mma and ("LDGSTS" in row["async_copies"] or "UTMALDG" in row["async_copies"]), row
        assert row["pipeline_stages"] >= 2 and row["stack_bytes"] == row["local_bytes"] == 0, row
        assert row["fits_shared"] and row["programs_per_sm"] >= 1, row
        assert "hidden_dim=i32:16" in row["signature"] and "stride_hd=1" in row["signature"], row
        assert mma in opcodes and opcodes & {"LDGSTS", "UTMALDG"}, (name, sorted(opcodes)[:40])
        if mma == "HGMMA":
            assert row["mma_shape"] == hgmma_shape(name, row["dtype"]), row


def test_integer_specialization_follows_the_jit(tmp_path):
    """Sizes divisible by 16 get the divisibility flag, others not; a size-1 dimension becomes a constant;
    an uneven last backward chunk is a second specialization of the backward kernels; the logit modes' chunk_logits
    runs over chunks of as many rows as 8 fp32 (rows, V) buffers fit in the workspace budget."""
    script = tmp_path / "bind.py"
    script.write_text('''
import json, torch
from sdpo_fast.kernels import check
rows = []
for shape in [(1000, 4096, 151936), (300, 4095, 1001), (8, 1, 7)]:
    for launch in check.distinct_launches(shape, torch.bfloat16, 90):
        import triton
        from triton.backends.compiler import GPUTarget
        backend = triton.compiler.make_backend(GPUTarget("cuda", 90, 32))
        sig, constexprs, attrs, _ = check._bind(launch, backend)
        rows.append([list(shape), launch.kernel.__name__, check._int_summary(launch, sig, constexprs, attrs),
                     [a if isinstance(a, int) else None for a in launch.args]])
print(json.dumps(rows))
''')
    env = dict(ENV, SDPO_FAST_TRITON_WORKSPACE_MB="256")  # N=1000: chunks of 768 and 232 rows
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    names = ["n_tokens", "vocab_size", "hidden_dim"]
    for shape, kernel, summary, args in rows:
        spec = dict(item.split("=") for item in summary.split())
        if kernel in ROW_KERNELS:
            assert spec["vocab_size"] == ("i32:16" if shape[2] % 16 == 0 else "i32"), (shape, kernel, summary)
            continue
        for name in names:
            assert name in spec, (kernel, summary)
        value_of = {"lse_gather_kernel": dict(zip(names, args[5:8])), "grad_logits_kernel": dict(zip(names, args[6:9])),
                    "grad_weight_kernel": dict(zip(names, args[3:6])),
                    "chunk_logits_kernel": dict(zip(names, args[3:6]))}[kernel]
        for name, value in value_of.items():
            want = "1" if value == 1 else ("i32:16" if value % 16 == 0 else "i32")
            assert spec[name] == want, (shape, kernel, name, value, summary)
    backward_1000 = [r for r in rows if r[0] == [1000, 4096, 151936] and r[1] == "grad_weight_kernel"]
    assert sorted(r[3][3] for r in backward_1000) == [232, 768]
    logits_rows = {tuple(r[0]): r[3][3] for r in rows if r[1] == "chunk_logits_kernel"}
    assert logits_rows == {(1000, 4096, 151936): (256 << 20) // (8 * 4 * 151936), (300, 4095, 1001): 300, (8, 1, 7): 8}


def test_soft_capped_launches_keep_a_tile_that_does_not_spill(tmp_path):
    """Soft-capped logits (HAS_CAP: a tanh in the epilogue) launch lse_gather and grad_logits at
    kernel_config(..., capped=True), which compiles without spills on sm_80/89/90 in bf16 (grad_logits' wider
    uncapped tiles spill there)."""
    script = tmp_path / "capped.py"
    script.write_text('''
import json, torch
from sdpo_fast.kernels import check
from sdpo_fast.kernels.config import kernel_config
from sdpo_fast.kernels.grad_logits import grad_logits_launch
from sdpo_fast.kernels.lse_gather import lse_gather_launch
n, d, vocab = 1536, 4096, 151936
meta = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype, device="meta")
rows = []
for arch in (80, 89, 90):
    lse = lse_gather_launch(meta(n, d), meta(vocab, d), meta(n, dtype=torch.int64), 1.0,
                            kernel_config(torch.bfloat16, arch, "lse_gather", capped=True), None, softcap=30.0)[0]
    grad = grad_logits_launch(meta(n, d), meta(vocab, d), meta(n, dtype=torch.int64), meta(n, dtype=torch.float32),
                              meta(n, dtype=torch.float32), 1.0, meta(n, vocab),
                              kernel_config(torch.bfloat16, arch, "grad_logits", capped=True), softcap=30.0)
    for launch in (lse, grad):
        assert launch.options["HAS_CAP"]
        rows.append(check.compile_launch(launch, arch).as_dict())
print(json.dumps(rows))
''')
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(result.stdout)
    assert len(rows) == 6
    for row in rows:
        assert not row["spills"] and row["fits_shared"] and row["programs_per_sm"] >= 1, row


@pytest.mark.slow
def test_check_kernels_all_architectures():
    out = check_kernels("--arch", "sm_80,sm_86,sm_89,sm_90", "--shape", "qwen3-8b", timeout=900)
    rows = out["kernels"]
    assert {row["arch"] for row in rows} == {80, 86, 89, 90}
    for row in rows:
        assert row["registers"] > 0, row
        assert row["stack_bytes"] == 0 and row["local_bytes"] == 0, row
        assert row["fits_shared"], row
        if row["dtype"] != "fp32" and row["kernel"] not in ROW_KERNELS:
            assert row["mma"] == ("HGMMA" if row["arch"] == 90 else "HMMA"), row
            assert row["pipeline_stages"] >= 2 and "LDGSTS" in row["async_copies"], row


def test_check_kernels_rejects_bad_arguments():
    from sdpo_fast.cli import main
    with pytest.raises(SystemExit):
        main(["check-kernels", "--arch", "ampere"])
    with pytest.raises(SystemExit):
        main(["check-kernels", "--shape", "16,0,7"])
