"""`sdpo-fast check-kernels`: compile the Triton kernels ahead of time for given GPUs, as launched; no GPU needed."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_DTYPES = ("bf16", "fp16", "fp32")


def _archs(text: str) -> list[int]:
    archs = []
    for item in text.split(","):
        digits = item.strip().lower().removeprefix("sm_")
        if not digits.isdigit():
            raise argparse.ArgumentTypeError(f"--arch wants a list like sm_80,sm_90; got {item!r}")
        archs.append(int(digits))
    return archs


def _shape(text: str) -> tuple[int, int, int]:
    from ..kernels.check import SHAPES

    if text in SHAPES:
        return SHAPES[text]
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--shape wants N,d,V (positive integers) or one of {sorted(SHAPES)}; "
                                         f"got {text!r}")
    return tuple(int(p) for p in parts)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("check-kernels", help=__doc__.split(":", 1)[1].strip(),
                                   description=__doc__)
    parser.add_argument("--arch", type=_archs, default=[80, 86, 89, 90],
                        help="comma-separated compute capabilities (default: sm_80,sm_86,sm_89,sm_90)")
    parser.add_argument("--dtype", default=",".join(_DTYPES),
                        help=f"comma-separated input dtypes among {','.join(_DTYPES)} (default: all)")
    parser.add_argument("--shape", type=_shape, default="qwen3-8b",
                        help="N,d,V of one loss step, or qwen3-8b (16384,4096,151936) / qwen3-8b-4k; the launches "
                             "(chunks, vocabulary splits) and their integer specialization follow from it")
    parser.add_argument("--sass", metavar="DIR", help="write each kernel's SASS to DIR/kernel_dtype_smARCH.sass")
    parser.add_argument("--model", action="store_true",
                        help="also print the traffic/roofline model of one loss step per reference GPU")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    parser.set_defaults(func=run)


def run(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Interpreted kernels cannot be compiled: re-run this command without the interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = ["check-kernels", "--arch", ",".join(map(str, args.arch)), "--dtype", args.dtype,
                "--shape", ",".join(map(str, args.shape))]
        argv += ["--sass", args.sass] if args.sass else []
        argv += ["--model"] if args.model else []
        argv += ["--json"] if args.json else []
        return subprocess.call([sys.executable, "-m", "sdpo_fast.cli", *argv], env=env)
    import torch

    from ..kernels.check import check_kernels, format_table

    names = [d.strip() for d in args.dtype.split(",")]
    unknown = [d for d in names if d not in _DTYPES]
    if unknown:
        raise ValueError(f"--dtype: unknown {unknown}; choose among {list(_DTYPES)}")
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in names]
    rows = check_kernels(args.arch, dtypes, shape=args.shape, sass_dir=args.sass)
    models = []
    if args.model:
        from ..kernels.gpus import GPUS
        from ..kernels.config import triton_workspace_bytes
        from ..kernels.model import format_model, model_grad_in_forward_step, model_step

        gpus = [gpu for gpu in ("h100", "h200", "a100", "rtx4090", "l40s") if GPUS[gpu].arch in args.arch]
        models = [model for dtype in dtypes for gpu in gpus
                  for model in (model_step(args.shape, dtype, gpu, usages=rows),
                                model_grad_in_forward_step(args.shape, dtype, gpu, triton_workspace_bytes()))]
    if args.json:
        out = {"shape": list(args.shape), "kernels": [row.as_dict() for row in rows]}
        if args.model:
            out["model"] = [m.as_dict() for m in models]
        print(json.dumps(out))
    else:
        print(f"N, d, V = {args.shape}\n")
        print(format_table(rows))
        for m in models:
            print("\n" + format_model(m))
    bad = [r for r in rows if r.spills or not r.fits_shared]
    if bad:
        print(f"{len(bad)} kernel build(s) spill registers or exceed shared memory", file=sys.stderr)
        return 1
    return 0
