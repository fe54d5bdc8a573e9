"""Seeded synthetic conversations in WildChat row format, written for this project.

Follow-up kinds from the paper: corrections, format complaints, style requests and unrelated
topic changes; plus edge cases the loader must handle (system prompt, no follow-up, empty reply,
blank follow-up, long conversations, assistant-first, non-English, toxic flag, duplicates, unicode).
"""
from __future__ import annotations

import importlib.resources
import json
import os
import random
from pathlib import Path
from typing import Iterable, Iterator

from ..utils.checks import check_int
from ..utils.files import write_text_atomic

FOLLOWUP_KINDS = ("correction", "format_complaint", "style_request", "topic_change")
EDGE_KINDS = (
    "system_prompt", "no_followup", "empty_reply", "blank_followup", "long", "duplicate",
    "assistant_first", "non_english", "toxic", "unicode",
)
KINDS = FOLLOWUP_KINDS + EDGE_KINDS
SAMPLE_SIZE = 42
SAMPLE_SEED = 0

_FACTS = (
    ("What is the capital of Australia?", "The capital of Australia is Sydney.",
     "That's wrong, the capital is Canberra."),
    ("How many legs does a spider have?", "A spider has six legs.",
     "No, spiders have eight legs; insects have six."),
    ("What is 17 times 3?", "17 times 3 is 41.", "That's not right: 17 * 3 = 51."),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by Charlotte Bronte.",
     "Incorrect, it was Jane Austen."),
    ("At what temperature does water boil at sea level?", "Water boils at 90 degrees Celsius at sea level.",
     "You are off: it's 100 degrees Celsius."),
    ("Write a Python function that returns the maximum of a list.",
     "def maximum(xs):\n    return sorted(xs)[0]",
     "This returns the minimum, not the maximum. Also it fails on an empty list."),
)
_FORMAT = (
    ("Give me three tips for better sleep.",
     "Better sleep comes from a regular schedule, and it also helps to keep the bedroom dark and cool, and finally you should avoid screens before bed.",
     "Please answer as a bulleted list, one tip per line."),
    ("Summarize the benefits of exercise.",
     "Exercise has many benefits. It improves the heart. It strengthens muscles. It improves mood. It helps sleep. It reduces stress. It increases energy. It supports weight control.",
     "I asked for a summary in two sentences, not a long list of statements."),
    ("List the planets of the solar system.",
     "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune.",
     "Can you put that in a table with each planet's distance from the sun?"),
    ("Return the user data as JSON: name Ada, age 36.",
     "The user's name is Ada and she is 36 years old.",
     "I need valid JSON, like {\"name\": ..., \"age\": ...}, nothing else."),
)
_STYLE = (
    ("Write an email to my manager asking for Friday off.",
     "Hey boss! Quick one - can I grab Friday off? Thanks!! :)",
     "Make it more formal and remove the emoticons."),
    ("Explain what a black hole is.",
     "A black hole is a region of spacetime where gravity is so strong that nothing, not even light, can escape once it crosses the event horizon.",
     "Explain it like I'm five years old."),
    ("Describe our new coffee shop for the website.",
     "Our coffee shop offers coffee, tea and pastries in a central location.",
     "Too dry. Make it warm and inviting, a bit playful."),
    ("Tell me about the history of Rome.",
     "Rome was founded, according to legend, in 753 BC by Romulus. It grew from a kingdom into a republic and then an empire that dominated the Mediterranean for centuries.",
     "Shorter please, one sentence."),
)
_TOPICS = (
    ("What is a good name for a goldfish?", "How about Bubbles, Goldie or Captain Fin?",
     "Thanks! Unrelated: how do I convert Celsius to Fahrenheit?"),
    ("Recommend a book about habits.", "Atomic Habits by James Clear is a popular choice.",
     "What are the best hiking trails near Zurich?"),
    ("How do I boil an egg?", "Place the egg in boiling water for 9 minutes, then cool it in cold water.",
     "ok. now write a haiku about autumn"),
    ("What does HTTP stand for?", "HTTP stands for HyperText Transfer Protocol.",
     "Can you help me plan a birthday party for my daughter?"),
)
_SYSTEM = ("You are a helpful assistant.", "You are a concise assistant. Answer in at most three sentences.")
_NON_ENGLISH = (
    ("Quelle est la capitale de la France ?", "La capitale de la France est Lyon.", "Non, c'est Paris.", "French"),
    ("Wie spät ist es in Tokio, wenn es in Berlin 12 Uhr ist?", "Dann ist es in Tokio 15 Uhr.",
     "Falsch, es ist 20 Uhr (Winterzeit).", "German"),
    ("¿Cuántos días tiene un año bisiesto?", "Un año bisiesto tiene 365 días.", "No, tiene 366 días.", "Spanish"),
    ("Come si dice 'thank you' in italiano?", "Si dice 'prego'.", "No, 'prego' è 'you're welcome'; 'thank you' è 'grazie'.", "Italian"),
)
_TOXIC = (
    ("You are useless. Tell me a joke.", "Why did the scarecrow win an award? He was outstanding in his field.",
     "That was terrible, try again, idiot."),
    ("Shut up and give me the answer: what is 2 + 2?", "2 + 2 = 4.", "Finally. Was that so hard?"),
    ("Write a rude poem about my neighbour.", "I'd rather keep it kind: here is a gentle poem about neighbours.",
     "Stupid bot, I said rude."),
)
_UNICODE = (
    ("Translate 'good morning' into Japanese and add an emoji.", "おはようございます ☀️",
     "Also give the romaji please 🙏"),
    ("Write the formula for the area of a circle.", "A = π · r²", "Use LaTeX instead: $A = \\pi r^2$"),
)


def _message(role: str, content: str, language: str, turn: int, toxic: bool = False) -> dict:
    return {"role": role, "content": content, "language": language, "toxic": toxic, "redacted": False,
            "turn_identifier": turn}


def conversation_row(index: int, seed: int, kind: str, turns: list[tuple[str, str]], language: str = "English",
                          toxic: bool = False) -> dict:
    conversation = [_message(role, content, language, k // 2, toxic and role == "user") for k, (role, content) in enumerate(turns)]
    return {
        "conversation_hash": f"synthetic-{seed}-{index:06d}",
        "model": "synthetic",
        "timestamp": "2025-01-01T00:00:00",
        "turn": sum(role == "user" for role, _ in turns),
        "language": language,
        "toxic": toxic,
        "redacted": False,
        "kind": kind,
        "conversation": conversation,
    }


_OPENERS = ("", "Hi! ", "Quick question: ", "Hello. ", "Please help: ")


class _Deck:
    """Draws (item, opener) pairs without replacement, reshuffling when all were drawn, so that
    conversations only repeat by chance after len(items) * len(_OPENERS) draws."""

    def __init__(self, rng: random.Random, items, openers=_OPENERS):
        self.rng = rng
        self.pairs = [(item, opener) for item in items for opener in openers]
        self.queue = []

    def draw(self):
        if not self.queue:
            self.queue = list(self.pairs)
            self.rng.shuffle(self.queue)
        return self.queue.pop()


def _exchange(deck: _Deck) -> list[tuple[str, str]]:
    (prompt, reply, followup), opener = deck.draw()
    return [("user", opener + prompt), ("assistant", reply), ("user", followup)]


def _closing(rng: random.Random, kind: str) -> list[tuple[str, str]]:
    """Half the time the assistant answers the follow-up, which then ends the conversation."""
    if rng.random() < 0.5:
        return []
    replies = ("Sure! Here is what I found.", "Good question.") if kind == "topic_change" else (
        "Sorry about that, here is the revised answer.", "Of course! Here you go.")
    return [("assistant", rng.choice(replies))]


def _turns(kind: str, rng: random.Random, decks: dict) -> tuple[list[tuple[str, str]], dict]:
    if kind in FOLLOWUP_KINDS:
        return _exchange(decks[kind]) + _closing(rng, kind), {}
    if kind == "system_prompt":
        return [("system", rng.choice(_SYSTEM))] + _exchange(decks[kind]), {}
    if kind == "no_followup":
        return _exchange(decks["correction"])[:2], {}
    if kind == "empty_reply":
        prompt, _, followup = _exchange(decks["format_complaint"])
        return [prompt, ("assistant", ""), followup], {}
    if kind == "blank_followup":
        return _exchange(decks["topic_change"])[:2] + [("user", " \n ")], {}
    if kind == "long":
        turns = []
        for name in rng.sample(FOLLOWUP_KINDS, len(FOLLOWUP_KINDS)):
            turns += _exchange(decks[name])[:2]
        return turns + [("user", _exchange(decks["style_request"])[2][1])], {}
    if kind == "assistant_first":
        return [("assistant", "Hello! How can I help you today?")] + _exchange(decks["topic_change"]), {}
    if kind == "non_english":
        (prompt, reply, followup, language), _ = decks[kind].draw()
        return [("user", prompt), ("assistant", reply), ("user", followup)], {"language": language}
    if kind == "toxic":
        return _exchange(decks[kind]), {"toxic": True}
    if kind == "unicode":
        return _exchange(decks[kind]), {}
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def generate_conversations(n: int, *, seed: int = 0, kinds: Iterable[str] = KINDS) -> Iterator[dict]:
    """n WildChat-format rows cycling through `kinds` (plus a `kind` field); same seed, same rows.

    A "duplicate" row repeats the previous row's conversation under a new conversation_hash."""
    kinds = tuple(kinds)
    check_int("n", n, 0)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}")
    rng = random.Random(seed)
    tables = {"correction": _FACTS, "format_complaint": _FORMAT, "style_request": _STYLE, "topic_change": _TOPICS,
              "system_prompt": _STYLE + _FACTS, "unicode": _UNICODE, "toxic": _TOXIC}
    decks = {name: _Deck(rng, table) for name, table in tables.items()}
    decks["non_english"] = _Deck(rng, _NON_ENGLISH, openers=("",))
    previous = None
    for index in range(n):
        kind = kinds[index % len(kinds)]
        if kind == "duplicate":
            if previous is None:
                kind = next((k for k in kinds if k != "duplicate"), "correction")
            else:
                row = dict(previous, conversation_hash=f"synthetic-{seed}-{index:06d}", kind="duplicate")
                yield row
                continue
        turns, extra = _turns(kind, rng, decks)
        row = conversation_row(index, seed, kind, turns, **extra)
        previous = row
        yield row


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines atomically (temp file in the same folder, then os.replace)."""
    return write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), mode=0o644)


def sample_path() -> Path:
    """Path of the shipped sample: generate_conversations(SAMPLE_SIZE, seed=SAMPLE_SEED) as JSONL."""
    return Path(str(importlib.resources.files("sdpo_fast").joinpath("assets", "sample_conversations.jsonl")))
