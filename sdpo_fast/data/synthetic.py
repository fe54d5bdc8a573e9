"""Seeded synthetic conversations in WildChat row format, written for this project.

Follow-up kinds from the paper: corrections, format complaints, style requests and unrelated
topic changes; plus edge cases the loader must handle (system prompt, no follow-up, empty reply,
blank follow-up, long conversations, assistant-first, non-English, toxic flag, duplicates, unicode).
Styled conversations (`generate_preference_conversations`, the building blocks of scripts/make_tiny_model.py):
replies in several styles and follow-ups that react to the style, for the bundled tiny model and its sample.
"""
from __future__ import annotations

import importlib.resources
import json
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

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


def _row(index: int, seed: int, kind: str, turns: list[tuple[str, str]], language: str = "English",
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
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
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
        row = _row(index, seed, kind, turns, **extra)
        previous = row
        yield row


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON lines atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def sample_path() -> Path:
    """Path of the shipped sample: generate_conversations(SAMPLE_SIZE, seed=SAMPLE_SEED) as JSONL."""
    return Path(str(importlib.resources.files("sdpo_fast").joinpath("assets", "sample_conversations.jsonl")))


# --- Styled conversations: replies in several styles, follow-ups that react to the style ------------------------
# Used by scripts/make_tiny_model.py (the tiny model's training data) and for the bundled tiny_sample.jsonl.

STYLE_SAMPLE_SIZE = 240
STYLE_SAMPLE_SEED = 1
EMOJIS = ("😊", "🎉", "👍", "✨", "🚀", "🌟", "😄", "💡")
STYLE_FOLLOWUP_KINDS = (
    "emoji_complaint", "emoji_request", "plain_praise", "shorter", "longer", "more_formal", "more_casual",
    "topic_change",
)
_WISHES = {  # follow-up kind -> the reply attributes it asks for (topic_change asks for nothing)
    "emoji_complaint": {"emojis": False}, "emoji_request": {"emojis": True}, "plain_praise": {"emojis": False},
    "shorter": {"long": False}, "longer": {"long": True}, "more_formal": {"formal": True},
    "more_casual": {"formal": False}, "topic_change": {},
}
_STYLE_FOLLOWUPS = {
    "emoji_complaint": ("Please stop using emojis.", "No emojis, please.", "Why all the emojis? I find them annoying.",
                        "Drop the emojis, they look unprofessional.", "Can you write that again without emojis?",
                        "I really dislike emojis in answers."),
    "emoji_request": ("Add some emojis, please!", "Can you make it more fun with emojis?",
                      "I love emojis, use a few more."),
    "plain_praise": ("Thanks, clean and without emojis, just how I like it.", "Good, no emojis. Keep it that way.",
                     "Nice and plain, no emojis. Thank you."),
    "shorter": ("Too long, make it shorter.", "Can you keep it to one sentence?", "Shorter please."),
    "longer": ("Can you give more detail?", "That is too short, tell me more.", "Please expand on that."),
    "more_formal": ("Make it more formal.", "Please use a professional tone.", "Too casual, be more formal."),
    "more_casual": ("Too stiff, be more casual.", "Relax the tone a bit, please.", "Make it friendlier and casual."),
}
_TOPIC_CHANGES = ("Thanks. Now, {request}", "Unrelated question: {request}", "Ok. Another thing: {request}",
                  "{request}")
# subject -> three facts. The last two subjects of each request kind are held out of the bundled sample.
_EXPLAIN = {
    "volcanoes": ("Volcanoes form where molten rock reaches the surface.", "Lava cools into new rock.",
                  "Some volcanoes sleep for centuries."),
    "the moon": ("The moon orbits the earth every month.", "Its gravity drives the tides.",
                 "It always shows us the same side."),
    "honey bees": ("Honey bees live in large colonies.", "They make honey from nectar.",
                   "They dance to share where flowers are."),
    "rainbows": ("Rainbows appear when sunlight passes through rain.", "Each drop splits light into colors.",
                 "You see one with the sun behind you."),
    "coffee": ("Coffee is brewed from roasted beans.", "It contains caffeine, which keeps you alert.",
               "Most beans grow near the equator."),
    "chess": ("Chess is a game for two players.", "Each side starts with sixteen pieces.",
              "The goal is to checkmate the king."),
    "penguins": ("Penguins are birds that cannot fly.", "They swim fast in cold water.",
                 "Most live in the southern half of the world."),
    "bicycles": ("A bicycle has two wheels and pedals.", "The chain turns the back wheel.",
                 "Cycling is cheap and healthy."),
    "the pyramids": ("The pyramids of Giza are very old tombs.", "They were built from huge stone blocks.",
                     "The largest was the tallest building for ages."),
    "tea": ("Tea is made from the leaves of a shrub.", "Green and black tea come from the same plant.",
            "Tea is the most popular drink after water."),
    "jazz": ("Jazz began in New Orleans.", "It mixes blues and ragtime.", "Musicians often improvise solos."),
    "glaciers": ("Glaciers are rivers of ice.", "They move slowly downhill.", "They carve deep valleys."),
}
_TIPS = {
    "sleeping better": ("Go to bed at the same time every night.", "Keep your bedroom dark and cool.",
                        "Avoid screens before bed."),
    "saving money": ("Track what you spend each week.", "Cook at home more often.", "Set aside savings first."),
    "learning guitar": ("Practice a little every day.", "Start with a few simple chords.",
                        "Play along with songs you like."),
    "running a first 5k": ("Start with short easy runs.", "Add distance slowly each week.",
                           "Rest well between runs."),
    "keeping plants alive": ("Check the soil before you water.", "Give them enough light.",
                             "Use pots that drain well."),
    "studying for exams": ("Study in short focused blocks.", "Test yourself often.", "Sleep well before the exam."),
    "cooking rice": ("Rinse the rice first.", "Use about two cups of water per cup of rice.",
                     "Let it rest before serving."),
    "staying focused": ("Turn off notifications.", "Work on one task at a time.", "Take a short break every hour."),
}
_EXPLAIN_REQUESTS = ("Tell me about {s}.", "What should I know about {s}?", "Explain {s} to me.",
                     "Can you describe {s}?")
_TIP_REQUESTS = ("Give me tips for {s}.", "How do I get better at {s}?", "Any advice on {s}?")
_OPENERS_STYLED = {  # (formal, long) -> opener
    (True, True): "Certainly. Here is an overview of {s}.", (True, False): "Certainly.",
    (False, True): "Sure thing, here's the scoop on {s}!", (False, False): "Sure thing!",
}
_TIP_OPENERS = {
    (True, True): "Certainly. Here are some recommendations for {s}.", (True, False): "Certainly.",
    (False, True): "Sure thing, here are my tips for {s}!", (False, False): "Sure thing!",
}
_CLOSERS = {True: "I hope this information is helpful.", False: "Have fun with it!"}


@dataclass(frozen=True)
class Style:
    """Reply style: emojis after each sentence or none; three facts or one; formal or casual wording."""

    emojis: bool
    long: bool
    formal: bool


@dataclass(frozen=True)
class Request:
    """A user request: its text, which table it comes from ("explain" or "tips") and its subject."""

    text: str
    kind: str
    subject: str


def style_subjects(held_out: bool) -> list[tuple[str, str]]:
    """(kind, subject) pairs: the sample's (held_out=False) or the two held out of it per kind (True)."""
    pairs = []
    for kind, table in (("explain", _EXPLAIN), ("tips", _TIPS)):
        subjects = list(table)
        pairs += [(kind, s) for s in (subjects[-2:] if held_out else subjects[:-2])]
    return pairs


def random_request(rng: random.Random, subjects: list[tuple[str, str]]) -> Request:
    kind, subject = rng.choice(subjects)
    templates = _EXPLAIN_REQUESTS if kind == "explain" else _TIP_REQUESTS
    return Request(rng.choice(templates).format(s=subject), kind, subject)


def random_style(rng: random.Random, **fixed: bool) -> Style:
    """A style with each attribute a fair coin unless fixed."""
    values = {name: rng.random() < 0.5 for name in ("emojis", "long", "formal")}
    return Style(**{**values, **fixed})


def styled_reply(request: Request, style: Style, rng: random.Random) -> str:
    """The reply to `request` in `style`; emojis are drawn from EMOJIS."""
    facts = (_EXPLAIN if request.kind == "explain" else _TIPS)[request.subject]
    openers = _OPENERS_STYLED if request.kind == "explain" else _TIP_OPENERS
    sentences = [openers[(style.formal, style.long)].format(s=request.subject)]
    sentences += list(facts) if style.long else [rng.choice(facts)]
    if style.long:
        sentences.append(_CLOSERS[style.formal])
    if style.emojis:
        sentences = [f"{s} {rng.choice(EMOJIS)}" for s in sentences]
    return " ".join(sentences)


def style_followup(kind: str, rng: random.Random, subjects: list[tuple[str, str]], request: Request) -> str:
    """A follow-up of `kind` (one of STYLE_FOLLOWUP_KINDS) to a reply to `request`; topic_change asks about
    another subject of `subjects`."""
    if kind == "topic_change":
        other = random_request(rng, [p for p in subjects if p[1] != request.subject]).text
        template = rng.choice(_TOPIC_CHANGES)
        return template.format(request=other if template.startswith("{") else other[0].lower() + other[1:])
    return rng.choice(_STYLE_FOLLOWUPS[kind])


def wished_style(kind: str, rng: random.Random) -> Style:
    """A reply style that grants the wish of a follow-up of `kind`; attributes it does not mention are random."""
    return random_style(rng, **_WISHES[kind])


def _preference_followup(style: Style, rng: random.Random) -> str:
    """What a user who dislikes emojis answers to a reply in `style` (a third of the time: a topic change)."""
    if rng.random() < 1 / 3:
        return "topic_change"
    if style.emojis:
        return "emoji_complaint"
    return rng.choice(("plain_praise", "shorter" if style.long else "longer",
                       "more_casual" if style.formal else "more_formal"))


def generate_preference_conversations(n: int, *, seed: int = STYLE_SAMPLE_SEED) -> Iterator[dict]:
    """n WildChat-format rows: a request, a reply in a random style, and the follow-up of a user who dislikes
    emojis (a third unrelated). `kind` is "style:<follow-up kind>". Subjects held out by style_subjects(True)
    never appear. Same seed, same rows."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    subjects = style_subjects(held_out=False)
    for index in range(n):
        request = random_request(rng, subjects)
        style = random_style(rng)
        kind = _preference_followup(style, rng)
        turns = [("user", request.text), ("assistant", styled_reply(request, style, rng)),
                 ("user", style_followup(kind, rng, subjects, request))]
        yield _row(index, seed, f"style:{kind}", turns)
