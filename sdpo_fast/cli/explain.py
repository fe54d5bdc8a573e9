"""`sdpo-fast explain`: score interactions and show each completion token's advantage (log q − log π) as an
HTML heatmap, in the terminal, or as JSON."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data import load_interactions
from ..demo.assets import tiny_model_path, tiny_sample_path
from ..explain import explain, render_terminal, write_html
from ..explain.report import SORTS

TINY_MODEL = "bundled tiny Qwen3 (sdpo_fast/assets/tiny_model)"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("explain", help="token-level advantage heatmaps (HTML, terminal or JSON)",
                                   description=__doc__)
    parser.add_argument("--model", help="local Hugging Face model dir or Hub id (default: the bundled tiny Qwen3)")
    parser.add_argument("--data", help="conversation source as for `data stats` (default: the bundled tiny model's sample)")
    parser.add_argument("--n", type=int, default=24, help="interactions to score (default 24)")
    parser.add_argument("--out", help="HTML report path (default report.html unless --json or --terminal)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--terminal", action="store_true", help="print a coloured rendering in the terminal")
    parser.add_argument("--group-by", metavar="META_KEY", help="group interactions by this meta field (e.g. language)")
    parser.add_argument("--sort", choices=SORTS, default="signal", help="strongest mean |A| first, or data order")
    parser.add_argument("--max-history", type=int, default=5, metavar="N", help="messages of history (default 5)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (--model)")
    parser.set_defaults(func=run)


def load_model(name: str, trust_remote_code: bool = False):
    """(model, tokenizer) from a local dir or Hub id: safetensors only, fp32 on CPU, checkpoint dtype on CUDA."""
    import torch

    from ..train.setup import load_model, load_tokenizer, resolve_device

    device = resolve_device("auto")
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    model = load_model(name, dtype="auto" if device.type == "cuda" else torch.float32, device=device,
                       trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def _check_out(out: str) -> None:
    """Before the model loads: --out must name a file in an existing directory."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out!r} is a directory; give a file path such as {str(path / 'report.html')!r}")
    if not path.parent.is_dir():
        raise ValueError(f"--out {out!r}: directory {str(path.parent)!r} does not exist; create it first")


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    out = args.out or (None if args.json or args.terminal else "report.html")
    if out:
        _check_out(out)

    model, tokenizer = load_model(args.model or str(tiny_model_path()), args.trust_remote_code)
    data = args.data or str(tiny_sample_path())
    stream = load_interactions(data, max_history=args.max_history)
    report = explain(model, tokenizer, stream, n=args.n, model_name=args.model or TINY_MODEL,
                     data_name=args.data or "bundled sample", group_by=args.group_by)
    if out:
        path = write_html(report, out, args.sort)
        print(f"wrote {path} ({len(report.interactions)} interactions)", file=sys.stderr)
    if args.terminal:
        from rich.console import Console

        render_terminal(report, Console(stderr=args.json), sort=args.sort)
    if args.json:
        json.dump(report.to_json(), sys.stdout, ensure_ascii=False, default=str)
        sys.stdout.write("\n")
    return 0
