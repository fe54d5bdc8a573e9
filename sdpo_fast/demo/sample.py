"""The bundled demo's styled conversations: replies in several styles and follow-ups that react to the style.

Used by scripts/make_tiny_model.py (the tiny model's training data) and for the bundled tiny_sample.jsonl
(`generate_preference_conversations(STYLE_SAMPLE_SIZE)`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from ..data.synthetic import conversation_row
from ..utils.checks import check_int


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
    check_int("n", n, 0)
    rng = random.Random(seed)
    subjects = style_subjects(held_out=False)
    for index in range(n):
        request = random_request(rng, subjects)
        style = random_style(rng)
        kind = _preference_followup(style, rng)
        turns = [("user", request.text), ("assistant", styled_reply(request, style, rng)),
                 ("user", style_followup(kind, rng, subjects, request))]
        yield conversation_row(index, seed, f"style:{kind}", turns)
