"""The results directory: one JSON per benchmark (base and SDPO sides, written as each finishes), a markdown
table in the paper's layout (base row, SDPO row, deltas) and a bar chart."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..utils import write_text_atomic

SIDES = ("base", "sdpo")


class ResultsDir:
    """`root/<benchmark>.json` = {"benchmark", "kind", "settings", "key", "base": result, "sdpo": result}. `key`
    is everything else that produced the results (checkpoint and base weights, task files, versions). A side
    stored with the same kind, settings and key is finished (not rerun); anything else is refused, naming what
    differs."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, benchmark: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in benchmark)
        return self.root / f"{safe}.json"

    def load(self, benchmark: str, kind: str, settings: dict, key: dict) -> dict:
        path = self.path(benchmark)
        settings, key = json.loads(json.dumps(settings)), json.loads(json.dumps(key))  # as stored: lists, str keys
        fresh = {"benchmark": benchmark, "kind": kind, "settings": settings, "key": key}
        if not path.is_file():
            return fresh
        stored = json.loads(path.read_text(encoding="utf-8"))
        differences = _differences({k: stored.get(k) for k in ("kind", "settings", "key")},
                                   {"kind": kind, "settings": settings, "key": key})
        if differences:
            listed = "; ".join(f"{name}: {old!r} there, {new!r} now" for name, old, new in differences[:4])
            more = f" and {len(differences) - 4} more" if len(differences) > 4 else ""
            raise ValueError(f"{path} holds {benchmark!r} computed by another run or with other settings ({listed}"
                             f"{more}); pass another --out, or delete it to recompute")
        return stored

    def save(self, record: dict) -> None:
        write_text_atomic(self.path(record["benchmark"]), json.dumps(record, indent=2, sort_keys=True) + "\n")

    def records(self, benchmarks: list[str]) -> list[dict]:
        return [json.loads(self.path(b).read_text(encoding="utf-8")) for b in benchmarks if self.path(b).is_file()]


def _differences(stored, now, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted name, stored value, current value) of every leaf where the two nested dicts differ."""
    if isinstance(stored, dict) and isinstance(now, dict):
        return [d for k in sorted(set(stored) | set(now), key=str)
                for d in _differences(stored.get(k), now.get(k), f"{prefix}{k}.")]
    return [] if stored == now else [(prefix.rstrip("."), stored, now)]


Z_95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval (95% at the default z) of a proportion from `successes` of `n` trials; None
    when n = 0."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def headline(record: dict, side: str) -> tuple[float, str | None]:
    """(value in percent, its uncertainty as the table writes it or None) for one side of a record: the 95% Wilson
    interval ("[lo, hi]") over the documents of a 0/1-per-document score or over the decided pairs of the win
    rate, else lm-eval's standard error ("± x")."""
    result = record[side]
    if record["kind"] == "pairwise":
        if side == "base":
            return 50.0, None
        key = "lc_win_rate" if "lc_win_rate" in result else "win_rate"
        interval = wilson_interval(result["wins"], result["wins"] + result["losses"])
        return 100.0 * result[key], (None if interval is None else
                                     f"[{100.0 * interval[0]:.1f}, {100.0 * interval[1]:.1f}]")
    value = result["metrics"][result["primary"]]
    interval = _document_interval(result)
    if interval is not None:
        return 100.0 * value, f"[{100.0 * interval[0]:.1f}, {100.0 * interval[1]:.1f}]"
    stderr = result["metrics"].get(result["primary"].replace(",", "_stderr,", 1))
    return 100.0 * value, (f"± {100.0 * stderr:.1f}" if stderr is not None and not math.isnan(stderr) else None)


def _document_interval(result: dict) -> tuple[float, float] | None:
    """The Wilson interval of an lm-eval score that is a share of its n documents (a 0/1 metric per document:
    accuracy, exact match, IFEval's prompt-level scores), else None."""
    n, value = result.get("n") or 0, result["metrics"][result["primary"]]
    successes = round(value * n)
    return wilson_interval(successes, n) if n and abs(value * n - successes) < 1e-6 else None


def column_name(record: dict) -> str:
    """The benchmark, its metric and the counts behind it: documents scored, or decided pairs and ties."""
    result = record.get("sdpo", {})
    if record["kind"] == "pairwise":
        lc = "LC; " if "lc_win_rate" in result else ""
        return (f"win rate vs base ({lc}{result['wins']} won, {result['losses']} lost, {result['ties']} tied of "
                f"{result['wins'] + result['losses'] + result['ties']})")
    return f"{record['benchmark']} ({result['primary'].split(',')[0]}, n={result.get('n', '?')})"


def _fmt(value: float, uncertainty: str | None = None) -> str:
    if value != value:
        return "n/a"
    return f"{value:.1f}" + (f" {uncertainty}" if uncertainty else "")


NOTE = ("[lo, hi]: the 95% Wilson score interval of a share: of the n documents scored (lm-eval tasks with a "
        "0/1 score per document), or of the decided pairs won (win rate: each pair judged in both orders, a split "
        "verdict is a tie, ties excluded; the interval is the plain win rate's, also under the length-controlled "
        "value). ± : lm-eval's standard error, for other metrics.")


def markdown_table(records: list[dict]) -> str:
    """Rows Base, SDPO, Δ (SDPO − base, percentage points); one column per benchmark with both sides done, its
    header naming the counts behind it; a note on the uncertainties under the table."""
    done = [r for r in records if all(s in r for s in SIDES)]
    header = "| model | " + " | ".join(column_name(r) for r in done) + " |"
    lines = [header, "|---|" + "---|" * len(done)]
    base = [headline(r, "base") for r in done]
    sdpo = [headline(r, "sdpo") for r in done]
    lines.append("| Base | " + " | ".join(_fmt(*v) for v in base) + " |")
    lines.append("| SDPO | " + " | ".join(_fmt(*v) for v in sdpo) + " |")
    lines.append("| Δ | " + " | ".join(f"{s[0] - b[0]:+.1f}" if s[0] == s[0] else "n/a"
                                       for b, s in zip(base, sdpo)) + " |")
    return "\n".join(lines) + "\n\n" + NOTE + "\n"


def bar_chart(records: list[dict], path: str | Path) -> None:
    """Grouped bars (base, SDPO) per benchmark, in percent, with the table's uncertainties where known (standard
    errors; the win rate's Wilson interval)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if all(s in r for s in SIDES)]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(done) + 1), 3.2))
    xs = range(len(done))
    for offset, side, label in ((-0.2, "base", "Base"), (0.2, "sdpo", "SDPO")):
        values = [headline(r, side)[0] for r in done]
        errors = [_error_bar(r, side, v) for r, v in zip(done, values)]
        ax.bar([x + offset for x in xs], values, width=0.4, label=label,
               yerr=[[lo for lo, _ in errors], [hi for _, hi in errors]], capsize=3)
    ax.set_xticks(list(xs), [column_name(r) for r in done], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _error_bar(record: dict, side: str, value: float) -> tuple[float, float]:
    """(below, above) `value` in percent: the Wilson interval's ends, or the standard error both ways."""
    result = record[side]
    if record["kind"] == "pairwise":
        interval = wilson_interval(result["wins"], result["wins"] + result["losses"]) if side == "sdpo" else None
        return (0.0, 0.0) if interval is None else (max(0.0, value - 100 * interval[0]),
                                                     max(0.0, 100 * interval[1] - value))
    interval = _document_interval(result)
    if interval is not None:
        return max(0.0, value - 100 * interval[0]), max(0.0, 100 * interval[1] - value)
    stderr = result["metrics"].get(result["primary"].replace(",", "_stderr,", 1))
    return (0.0, 0.0) if stderr is None or math.isnan(stderr) else (100 * stderr, 100 * stderr)
