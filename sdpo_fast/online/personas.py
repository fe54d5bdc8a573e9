"""Personas: a simulated user's hidden preferences, as text (LLM users and judges) and as built-in rules
(rule-based users and judges)."""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..demo.style import has_emoji

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

_PRAISE = re.compile(r"\b(great question|good question|excellent question|certainly|absolutely|of course|"
                     r"i'?d be (happy|glad)|happy to help|what a)\b", re.IGNORECASE)
_WARM = re.compile(r"\b(great|glad|happy|love|wonderful|hope this helps)\b", re.IGNORECASE)
_MARKDOWN = re.compile(r"(^\s*([-*+]|\d+[.)]|#{1,6})\s)|\*\*|__|`", re.MULTILINE)


@dataclass(frozen=True)
class Rule:
    """A checkable preference: `check(reply)` is True when the reply fits; `complaint` is what a rule-based
    user says when it does not."""

    name: str
    check: Callable[[str], bool]
    complaint: str


def _words(text: str) -> int:
    return len(text.split())


RULES: dict[str, Rule] = {r.name: r for r in (
    Rule("no_emoji", lambda t: not has_emoji(t), "Please stop using emojis."),
    Rule("emoji", has_emoji, "Add some emojis, please!"),
    Rule("no_praise", lambda t: not _PRAISE.search(t), "Skip the compliments and filler, just get to the point."),
    Rule("warm", lambda t: bool(_WARM.search(t)), "You sound cold. Be a bit warmer and more encouraging."),
    Rule("plain_format", lambda t: not _MARKDOWN.search(t),
         "Less formatting please: no bullet points, bold or headings, just answer directly."),
    Rule("structured", lambda t: bool(_MARKDOWN.search(t)), "Please structure it with headings or bullet points."),
    Rule("concise", lambda t: _words(t) <= 40, "Too long. Keep it short and simple."),
    Rule("detailed", lambda t: _words(t) >= 80, "Too brief. I want a thorough, detailed answer."),
    Rule("brief", lambda t: _words(t) <= 20, "Too long, make it shorter."),
    Rule("fuller", lambda t: _words(t) > 20, "Can you give more detail?"),
)}
"""Built-in rules by name, for rule-based users and judges."""


@dataclass(frozen=True)
class Persona:
    """name: identifier; description: the profile in the second person (an LLM user's system prompt);
    rules: names of `RULES` checks a rule-based user/judge applies;
    opposite: name of the persona that reverses it (preference-flip experiments), or None."""

    name: str
    description: str
    rules: tuple[str, ...] = field(default_factory=tuple)
    opposite: str | None = None


def default_personas_path() -> Path:
    """The bundled persona file (the paper's five profiles and their opposites)."""
    return Path(str(resources.files("sdpo_fast") / "assets" / "personas.yaml"))


def _field(where: str, key: str, value, kind: str) -> None:
    raise ValueError(f"{where}.{key} must be {kind}, got {value!r}")


def parse_personas(data, source: str = "personas") -> dict[str, Persona]:
    """Personas from parsed YAML `{"personas": [{name, description, rules?, opposite?}, ...]}`, by name.

    Errors name the offending field, e.g. `file.yaml: personas[2].description must be a non-empty string`.
    """
    if not isinstance(data, dict) or not isinstance(data.get("personas"), list) or not data["personas"]:
        raise ValueError(f"{source}: top level must be a mapping with a non-empty list under 'personas'")
    personas: dict[str, Persona] = {}
    for i, entry in enumerate(data["personas"]):
        where = f"{source}: personas[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a mapping with name and description, got {type(entry).__name__}")
        unknown = sorted(set(entry) - {"name", "description", "rules", "opposite"})
        if unknown:
            raise ValueError(f"{where} has unknown fields {unknown}; allowed: name, description, rules, opposite")
        name = entry.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            _field(where, "name", name, "1-64 letters, digits, '_' or '-' (starting with a letter or digit)")
        if name in personas:
            raise ValueError(f"{where}.name {name!r} is defined twice")
        description = entry.get("description")
        if not isinstance(description, str) or not description.strip():
            _field(where, "description", description, "a non-empty string")
        rules = entry.get("rules", [])
        if not isinstance(rules, list) or not all(isinstance(r, str) for r in rules):
            _field(where, "rules", rules, "a list of rule names")
        for r in rules:
            if r not in RULES:
                raise ValueError(f"{where}.rules: unknown rule {r!r}; known rules: {sorted(RULES)}")
        opposite = entry.get("opposite")
        if opposite is not None and not isinstance(opposite, str):
            _field(where, "opposite", opposite, "a persona name or absent")
        personas[name] = Persona(name, description.strip(), tuple(rules), opposite)
    for i, p in enumerate(personas.values()):
        if p.opposite is not None and p.opposite not in personas:
            raise ValueError(f"{source}: personas[{i}].opposite {p.opposite!r} is not a persona in this file")
    return personas


def load_personas(path: str | Path | None = None) -> dict[str, Persona]:
    """Personas from a YAML file (default: the bundled file); see `parse_personas` for the format."""
    path = Path(path) if path is not None else default_personas_path()
    if not path.is_file():
        raise FileNotFoundError(f"persona file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"persona file {str(path)!r} is not UTF-8 text (byte {exc.start}); pass a YAML file") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_personas(data, str(path))


def get_persona(name: str, path: str | Path | None = None) -> Persona:
    """One persona by name from `load_personas(path)`."""
    personas = load_personas(path)
    if name not in personas:
        raise ValueError(f"persona {name!r} not found; available: {sorted(personas)}")
    return personas[name]
