"""`sdpo-fast demo`: online SDPO on CPU with the bundled tiny model (the same as `sdpo-fast online demo`)."""
from __future__ import annotations

from .online import add_demo_parser


def add_parser(subparsers) -> None:
    add_demo_parser(subparsers)
