"""`sdpo-fast check-kernels`: compile every Triton kernel ahead of time for given GPUs; no GPU needed."""
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


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("check-kernels", help=__doc__.split(":", 1)[1].strip(),
                                   description=__doc__)
    parser.add_argument("--arch", type=_archs, default=[80, 86, 89, 90],
                        help="comma-separated compute capabilities (default: sm_80,sm_86,sm_89,sm_90)")
    parser.add_argument("--dtype", default=",".join(_DTYPES),
                        help=f"comma-separated input dtypes among {','.join(_DTYPES)} (default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a markdown table")
    parser.set_defaults(func=run)


def run(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Interpreted kernels cannot be compiled: re-run this command without the interpreter.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = ["check-kernels", "--arch", ",".join(map(str, args.arch)), "--dtype", args.dtype]
        return subprocess.call([sys.executable, "-m", "sdpo_fast.cli", *argv, *(["--json"] if args.json else [])],
                               env=env)
    import torch

    from ..kernels.check import check_kernels, format_table

    names = [d.strip() for d in args.dtype.split(",")]
    unknown = [d for d in names if d not in _DTYPES]
    if unknown:
        raise ValueError(f"--dtype: unknown {unknown}; choose among {list(_DTYPES)}")
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in names]
    rows = check_kernels(args.arch, dtypes)
    if args.json:
        print(json.dumps([{**row.__dict__, "spills": row.spills, "fits_shared": row.fits_shared} for row in rows]))
    else:
        print(format_table(rows))
    bad = [r for r in rows if r.spills or not r.fits_shared]
    if bad:
        print(f"{len(bad)} kernel build(s) spill registers or exceed shared memory", file=sys.stderr)
        return 1
    return 0
