"""Command-line flags generated from a config dataclass (`TrainConfig`, `OnlineConfig`): one flag per field,
named after it (dashes for underscores), its help the field's docstring and default; a flag not given is absent
from the parsed arguments, so the config's own precedence (defaults < preset < file < flags) decides."""
from __future__ import annotations

import argparse
import dataclasses

from ..train.config import field_docs, field_names

_METAVARS = {"int": "N", "int | None": "N", "float": "X", "float | None": "X", "str": "S", "str | None": "S",
             "list[str]": "A,B", "str | list[str]": "A,B"}


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


_PARSERS = {"int": int, "float": float, "str": str, "str | None": str, "list[str]": str,
            "int | None": _optional(int), "float | None": _optional(float), "str | list[str]": _names}


def add_dataclass_flags(parser, config_class, *, skip=(), choices: dict | None = None) -> None:
    """One flag per field of `config_class` but `skip`; choices: {field: allowed values} for argparse to check."""
    docs, choices = field_docs(config_class), choices or {}
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for f in (fields[name] for name in field_names(config_class)):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"{docs[f.name]} (default {default})" if f.name in docs else f"(default {default})"
        if f.name in choices:
            parser.add_argument(flag, choices=list(choices[f.name]), default=argparse.SUPPRESS, help=help_text)
        elif f.type in ("bool", "bool | None"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, type=_PARSERS[f.type], default=argparse.SUPPRESS, help=help_text,
                                metavar=_METAVARS[f.type])


def given_fields(args: argparse.Namespace, config_class) -> dict:
    """{field: value} of the flags of `config_class` given on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
