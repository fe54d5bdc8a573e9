"""The paper's online personalization experiments as functions writing CSV + PNG: win rate against the base
model vs number of interactions (with the in-context oracle as a reference line), the preference flip, and
sequential preferences. All three are schedules of (persona, interactions) phases."""
from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..model.generation import generate_batch
from ..utils.checks import check_int
from .judge import Judge, judge_all, summarize
from .loop import OnlinePolicy, prompt_messages
from .personas import Persona
from .users import EndpointError

TRAIN_PROMPTS = (
    "How do I boil an egg?", "What is photosynthesis?", "Write a short email asking for a day off.",
    "Give me ideas for a birthday party.", "How does a bicycle gear work?", "What is a good vegetarian dinner?",
    "Explain what a Python list is.", "How do I start running?", "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.", "How can I save money on groceries?", "What is inflation?",
    "How do I write a cover letter?", "What are the best hiking trails near Zurich?",
    "How do vaccines work?", "Translate 'good morning' into French and German.",
    "How do I fix a slow laptop?", "What is machine learning?", "Plan a weekend trip to Paris.",
    "How do I make bread at home?", "What is the capital of Australia?", "How do I learn to play guitar?",
    "Explain compound interest.", "How should I prepare for a job interview?",
)
EVAL_PROMPTS = (
    "How do I make a cup of tea?", "What is gravity?", "Write a thank-you note to a colleague.",
    "How can I sleep better?", "What is a black hole?", "How do I cook rice?",
    "Explain what an API is.", "How do I keep houseplants alive?", "What causes rain?",
    "How do I ask for a raise?", "What is a stock?", "How do I learn a new language?",
    "What is climate change?", "How do I clean a cast iron pan?", "What is the internet?",
    "Give me tips for public speaking.",
)
FIELDS = ("interactions", "phase", "train_persona", "eval_persona", "win_rate", "se", "wins", "losses", "ties",
          "oracle_win_rate", "oracle_se")


@dataclass(frozen=True)
class Phase:
    """Train on `persona`'s user for `interactions` interactions."""

    persona: Persona
    interactions: int


def _responses(policy: OnlinePolicy, prompts, *, base: bool, seed: int, system: str | None = None,
               batch_size: int = 32) -> list[str]:
    """Replies to `prompts` (generated `batch_size` at a time) by the policy's adapter, or by the base model."""
    conversations = [prompt_messages(p, system) for p in prompts]
    options = dict(max_new_tokens=policy.config.max_new_tokens, temperature=policy.config.temperature,
                   stop_token_ids=policy.stop_token_ids)
    texts = []
    with policy.active(), (policy.model.disable_adapter() if base else contextlib.nullcontext()):
        for start in range(0, len(conversations), batch_size):
            texts += generate_batch(policy.model, policy.tokenizer, conversations[start:start + batch_size],
                                    seed=policy.config.seed * 1_000_003 + 500_000 + 1000 * seed + start, **options)
    return texts


def _write_csv(rows: list[dict], path: Path) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def plot(rows: list[dict], path: Path, title: str, boundaries: list[int] = ()) -> None:
    """Win rate (± SE) vs interactions per evaluated persona; oracle as dashed lines; phase starts dotted."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install 'sdpo_fast[online]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.axhline(0.5, color="0.7", lw=0.8)
    for k, persona in enumerate(dict.fromkeys(r["eval_persona"] for r in rows)):
        mine = [r for r in rows if r["eval_persona"] == persona]
        color = f"C{k}"
        ax.errorbar([r["interactions"] for r in mine], [r["win_rate"] for r in mine],
                    yerr=[0 if math.isnan(r["se"]) else r["se"] for r in mine], color=color, marker="o", ms=3,
                    capsize=2, label=f"online SDPO, judged as {persona}")
        oracle = mine[0]["oracle_win_rate"]
        if oracle is not None and not math.isnan(oracle):
            ax.axhline(oracle, color=color, ls="--", lw=1, label=f"in-context oracle ({persona})")
    for x in boundaries:
        ax.axvline(x, color="0.4", ls=":", lw=1)
    ax.set_xlabel("interactions")
    ax.set_ylabel("win rate vs base (ties excluded)")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_schedule(policy: OnlinePolicy, phases: list[Phase], make_user, judge: Judge, output_dir, *,
                 name: str = "online", eval_personas: list[Persona] | None = None, eval_every: int = 20,
                 train_prompts=TRAIN_PROMPTS, eval_prompts=EVAL_PROMPTS, oracle: bool = True,
                 log=None, overwrite: bool = False) -> list[dict]:
    """Train `policy` (a LoRA adapter) through `phases`, judging it against the base model at the start, at the
    end of each phase, and after the update batch that reaches each multiple of `eval_every` interactions
    (exactly there when update_every divides it), under each of `eval_personas` (default: the phases' personas).
    Evaluation never splits a batch, so what is learned does not depend on `eval_every`.

    make_user(persona) -> user. Writes output_dir/{name}.csv after every evaluation (so an endpoint failure
    keeps what was completed) and output_dir/{name}.png at the end; an existing {name}.csv is a ValueError
    unless `overwrite`. The directory is created owner-only (0o700). Returns the rows.
    """
    if policy.adapter_name is None:
        raise ValueError("experiments compare against the base model: the policy needs a LoRA adapter (lora_r > 0)")
    if not phases or not all(isinstance(p, Phase) and p.interactions >= 1 for p in phases):
        raise ValueError("phases must be a non-empty list of Phase with interactions >= 1")
    check_int("eval_every", eval_every, 1)
    out = Path(output_dir)
    if (out / f"{name}.csv").exists() and not overwrite:
        raise ValueError(f"output_dir {str(out)!r} already holds {name}.csv; pass overwrite=True (--overwrite) "
                         "or choose another output directory")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    personas = eval_personas or list({p.persona.name: p.persona for p in phases}.values())
    eval_prompts = list(eval_prompts)
    base = _responses(policy, eval_prompts, base=True, seed=0)
    oracles = {}
    for persona in personas:
        if oracle:
            told = _responses(policy, eval_prompts, base=True, seed=1, system=persona.description)
            oracles[persona.name] = summarize(judge_all(judge, persona, eval_prompts, told, base))
    rows: list[dict] = []
    done, train_seconds = 0, 0.0

    def evaluate(phase_index: int) -> None:
        trained = _responses(policy, eval_prompts, base=False, seed=1)
        for persona in personas:
            s = summarize(judge_all(judge, persona, eval_prompts, trained, base))
            o = oracles.get(persona.name)
            rows.append({"interactions": done, "phase": phase_index,
                         "train_persona": phases[phase_index].persona.name, "eval_persona": persona.name,
                         "win_rate": s.win_rate, "se": s.se, "wins": s.wins, "losses": s.losses, "ties": s.ties,
                         "oracle_win_rate": o.win_rate if o else math.nan, "oracle_se": o.se if o else math.nan})
            if log is not None:
                log(f"{done:5d} interactions  judged as {persona.name}: win rate {s.win_rate:.2f} ± {s.se:.2f} "
                    f"({s.wins}W/{s.losses}L/{s.ties}T)")
        _write_csv(rows, out / f"{name}.csv")

    try:
        evaluate(0)
        for index, phase in enumerate(phases):
            user = make_user(phase.persona)
            end = done + phase.interactions
            while done < end:
                n = min(policy.room(), end - done)
                batch = [prompt_messages(train_prompts[(done + j) % len(train_prompts)]) for j in range(n)]
                started = time.perf_counter()
                policy.interact_batch(batch, user)
                train_seconds += time.perf_counter() - started
                done += n
                if done // eval_every > (done - n) // eval_every or done == end:
                    evaluate(index)
        if log is not None:
            log(f"training: {done} interactions in {train_seconds:.1f}s ({done / max(train_seconds, 1e-9):.2f} "
                "interactions/s: generation, user, update)")
    except EndpointError as exc:
        raise EndpointError(f"{exc}; stopped after {done} interactions, results so far in "
                            f"{out / (name + '.csv')}") from None
    finally:
        if rows:
            boundaries = [sum(p.interactions for p in phases[:i]) for i in range(1, len(phases))]
            plot(rows, out / f"{name}.png", name, [b for b in boundaries if b <= done])
    return rows


def win_rate_curve(policy, persona: Persona, make_user, judge, output_dir, interactions: int = 200, **options):
    """Win rate vs interactions for one persona, with the in-context oracle line."""
    return run_schedule(policy, [Phase(persona, interactions)], make_user, judge, output_dir,
                        name=options.pop("name", "win_rate_curve"), **options)


def preference_flip(policy, persona: Persona, opposite: Persona, make_user, judge, output_dir,
                    interactions: int = 200, flip_after: int | None = None, **options):
    """`flip_after` (default: `interactions`) interactions with `persona`, then `interactions` with `opposite`;
    judged under both."""
    first = interactions if flip_after is None else flip_after
    return run_schedule(policy, [Phase(persona, first), Phase(opposite, interactions)], make_user, judge,
                        output_dir, name=options.pop("name", "preference_flip"), **options)


def sequential_preferences(policy, personas: list[Persona], make_user, judge, output_dir,
                           interactions: int = 200, **options):
    """`interactions` with each of `personas` in turn (compatible preferences); judged under each."""
    return run_schedule(policy, [Phase(p, interactions) for p in personas], make_user, judge, output_dir,
                        name=options.pop("name", "sequential_preferences"), **options)
