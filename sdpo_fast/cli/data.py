"""`sdpo-fast data stats SOURCE`: a first look at conversation data (counts and token lengths only;
conversation text is never printed)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import PRESETS, InteractionEncoder, SkipInteraction, load_interactions

_SHOWN_BAD_ROWS = 10
_PERCENTILES = (50, 90, 99, 100)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect conversation data")
    actions = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    stats = actions.add_parser(
        "stats", help="count conversations, interactions and skips; with --tokenizer, token length percentiles"
    )
    stats.add_argument("source", help="JSONL/JSON/Parquet file, directory, or Hub dataset id (online only)")
    stats.add_argument("--tokenizer", metavar="PATH", help="local tokenizer directory (AutoTokenizer, no remote code)")
    stats.add_argument("--max-history", type=int, default=5, metavar="N", help="messages of history per interaction (default 5)")
    stats.add_argument("--preset", choices=sorted(PRESETS), help="'paper': the authors' preprocessing per row format; 'strict': our stricter filters")
    stats.add_argument("--split", default="train", help="split of a saved DatasetDict or Hub dataset (default train)")
    stats.add_argument("--max-prompt-tokens", type=int, default=2048, metavar="N")
    stats.add_argument("--max-completion-tokens", type=int, default=2048, metavar="N")
    stats.set_defaults(func=run_stats)


def percentiles(values: list[int]) -> dict[int, int]:
    """Nearest-rank percentiles {p: value} of a non-empty list."""
    ordered = sorted(values)
    return {p: ordered[max(0, -(-p * len(ordered) // 100) - 1)] for p in _PERCENTILES}


def _load_tokenizer(path: str):
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--tokenizer {path!r} is not a local directory")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except OSError as exc:
        raise ValueError(f"--tokenizer {path!r} could not be loaded: {exc.__class__.__name__}") from None


def run_stats(args: argparse.Namespace) -> int:
    tokenizer = _load_tokenizer(args.tokenizer) if args.tokenizer else None
    stream = load_interactions(args.source, max_history=args.max_history, preset=args.preset, split=args.split)
    encoder = None
    if tokenizer is not None:
        encoder = InteractionEncoder(
            tokenizer, max_prompt_tokens=args.max_prompt_tokens, max_completion_tokens=args.max_completion_tokens
        )
    lengths = {"student prompt": [], "teacher prompt": [], "completion": [], "shared prefix": []}
    encode_skips = {}
    for interaction in stream:
        if encoder is None:
            continue
        try:
            enc = encoder.encode(interaction)
        except SkipInteraction as skip:
            encode_skips[skip.reason] = encode_skips.get(skip.reason, 0) + 1
            continue
        lengths["student prompt"].append(enc.student_prompt_len)
        lengths["teacher prompt"].append(enc.teacher_prompt_len)
        lengths["completion"].append(len(enc.completion_ids))
        lengths["shared prefix"].append(enc.shared_prefix_len)

    stats = stream.stats
    print(f"rows read:      {stats.rows}")
    print(f"conversations:  {stats.conversations}")
    print(f"interactions:   {stats.interactions}")
    _print_counts("skipped", stats.skipped)
    if stats.bad_rows:
        print(f"bad rows (first {min(_SHOWN_BAD_ROWS, len(stats.bad_rows))}):")
        for where in stats.bad_rows[:_SHOWN_BAD_ROWS]:
            print(f"  {where.file}:{where.number}: {where.reason}")
    if encoder is not None:
        print(f"encoded:        {len(lengths['completion'])}")
        _print_counts("not encoded", encode_skips)
        if lengths["completion"]:
            header = "".join(f"{'p' + str(p) if p < 100 else 'max':>8}" for p in _PERCENTILES)
            print(f"tokens {'':<15}{header}")
            for name, values in lengths.items():
                row = "".join(f"{v:>8}" for v in percentiles(values).values())
                print(f"  {name:<20}{row}")
    return 0


def _print_counts(title: str, counts) -> None:
    if not counts:
        return
    print(f"{title}:")
    for reason, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {reason:<30}{count}")
