"""`sdpo-fast` command line: one sub-command per module, each exposing `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

# Modules whose `add_parser(subparsers)` registers one sub-command and sets `func`.
_COMMANDS = [
    "sdpo_fast.cli.demo",
    "sdpo_fast.cli.check_kernels",
    "sdpo_fast.cli.data",
    "sdpo_fast.cli.explain",
    "sdpo_fast.cli.train",
    "sdpo_fast.cli.plan",
    "sdpo_fast.cli.online",
    "sdpo_fast.cli.eval",
    "sdpo_fast.cli.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdpo-fast", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def _rank_tag() -> str:
    """" [rank R]" under a torchrun job of several processes, else ""."""
    return f" [rank {os.environ.get('RANK', '0')}]" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors, interrupts (exit 128 + signal: 130 for Ctrl-C, 143 for SIGTERM) and OS errors
    end in one line on stderr."""
    from ..utils.signals import Interrupted

    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("sdpo-fast: interrupted", file=sys.stderr)
        return 130

    def terminated(signum, frame):
        raise Interrupted("terminated by SIGTERM", signum)

    previous = signal.signal(signal.SIGTERM, terminated) if _main_thread() else None
    try:
        return int(args.func(args) or 0)
    except Interrupted as exc:
        print(f"sdpo-fast {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"sdpo-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:
            exc = f"{exc.filename}: {exc.strerror or exc}"
        print(f"sdpo-fast {args.command}{_rank_tag()}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()

