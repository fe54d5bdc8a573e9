"""The results directory: one JSON per benchmark (base and SDPO sides, written as each finishes), a markdown
table in the paper's layout (base row, SDPO row, deltas) and a bar chart."""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..utils import write_text_atomic

SIDES = ("base", "sdpo")


class ResultsDir:
    """`root/<benchmark>.json` = {"benchmark", "kind", "settings", "base": result, "sdpo": result}. A side
    already stored with the same settings is finished (not rerun); other settings are an error."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, benchmark: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in benchmark)
        return self.root / f"{safe}.json"

    def load(self, benchmark: str, kind: str, settings: dict) -> dict:
        path = self.path(benchmark)
        if not path.is_file():
            return {"benchmark": benchmark, "kind": kind, "settings": settings}
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored.get("settings") != settings or stored.get("kind") != kind:
            raise ValueError(f"{path} holds {benchmark!r} computed with other settings "
                             f"({stored.get('settings')} != {settings}); pass another --out or delete it")
        return stored

    def save(self, record: dict) -> None:
        write_text_atomic(self.path(record["benchmark"]), json.dumps(record, indent=2, sort_keys=True) + "\n")

    def records(self, benchmarks: list[str]) -> list[dict]:
        return [json.loads(self.path(b).read_text(encoding="utf-8")) for b in benchmarks if self.path(b).is_file()]


def headline(record: dict, side: str) -> tuple[float, float | None]:
    """(value in percent, standard error in percent or None) the table shows for one side of a record."""
    result = record[side]
    if record["kind"] == "pairwise":
        if side == "base":
            return 50.0, None
        key = "lc_win_rate" if "lc_win_rate" in result else "win_rate"
        se = result.get("se")
        return 100.0 * result[key], (100.0 * se if se is not None and se == se else None)
    value = result["metrics"][result["primary"]]
    stderr = result["metrics"].get(result["primary"].replace(",", "_stderr,", 1))
    return 100.0 * value, (100.0 * stderr if stderr is not None else None)


def column_name(record: dict) -> str:
    if record["kind"] == "pairwise":
        return "win rate vs base" + (" (LC)" if "lc_win_rate" in record.get("sdpo", {}) else "")
    return f"{record['benchmark']} ({record['sdpo']['primary'].split(',')[0]})"


def _fmt(value: float, se: float | None = None) -> str:
    if value != value:
        return "n/a"
    return f"{value:.1f}" + (f" ± {se:.1f}" if se is not None and not math.isnan(se) else "")


def markdown_table(records: list[dict]) -> str:
    """Rows Base, SDPO, Δ (SDPO − base, percentage points); one column per benchmark with both sides done."""
    done = [r for r in records if all(s in r for s in SIDES)]
    header = "| model | " + " | ".join(column_name(r) for r in done) + " |"
    lines = [header, "|---|" + "---|" * len(done)]
    base = [headline(r, "base") for r in done]
    sdpo = [headline(r, "sdpo") for r in done]
    lines.append("| Base | " + " | ".join(_fmt(*v) for v in base) + " |")
    lines.append("| SDPO | " + " | ".join(_fmt(*v) for v in sdpo) + " |")
    lines.append("| Δ | " + " | ".join(f"{s[0] - b[0]:+.1f}" if s[0] == s[0] else "n/a"
                                       for b, s in zip(base, sdpo)) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(records: list[dict], path: str | Path) -> None:
    """Grouped bars (base, SDPO) per benchmark, in percent, with standard errors where known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if all(s in r for s in SIDES)]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(done) + 1), 3.2))
    xs = range(len(done))
    for offset, side, label in ((-0.2, "base", "Base"), (0.2, "sdpo", "SDPO")):
        values = [headline(r, side) for r in done]
        ax.bar([x + offset for x in xs], [v for v, _ in values], width=0.4, label=label,
               yerr=[se or 0.0 for _, se in values], capsize=3)
    ax.set_xticks(list(xs), [column_name(r) for r in done], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("%")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
