"""Load on `sdpo-fast serve run` (the bundled tiny model, on loopback): N simulated users chat at once, each one
conversation of T turns whose every turn after the first is a follow-up; the service learns in the background.

Run: pytest benchmarks/test_serve_bench.py --benchmark-only
  or python benchmarks/test_serve_bench.py [--users 4] [--turns 5] [--update-every 2] [--max-new-tokens 16]
     [--time-limit 600] [--json]
(the script writes its figures into BENCHMARKS.md between its two markers; --json prints them instead).

Bounded: T turns per user and a wall-clock limit, after which the users stop and the run ends by itself. Checked:
nothing lost (the replies and interactions in the database, read after the service stopped, equal the turns and
follow-ups the clients got an answer for). Reported: request latency p50/p95 (a whole non-streamed reply), and the
learner lag of each follow-up that an update can take (each user's first multiple of --update-every): the time
from its turn's answer until GET /v1/me counts it learned.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
BEGIN = "<!-- test_serve_bench.py: begin -->"
END = "<!-- test_serve_bench.py: end -->"
FOLLOWUPS = ("Please answer without emojis.", "Shorter, and no emojis.", "Plain text only, please.",
             "Thanks. Again, no emojis.")
PROMPTS = ("Tell me about coffee.", "How do plants grow?", "What is a good way to learn to cook?",
           "Describe the ocean.", "Why is the sky blue?", "Give me tips for running.")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _start(state_dir: Path, update_every: int, max_new_tokens: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "sdpo_fast.cli", "serve", "run", "--state-dir", str(state_dir), "--port", "0",
         "--update-every", str(update_every), "--max-new-tokens", str(max_new_tokens), "--rate-limit", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"serve run did not start (first line {line!r})")
    return process, line.split()[-1]


def _chat(url: str, model: str, key: str, user_index: int, turns: int, deadline: float, record: dict) -> None:
    """One simulated user's conversation; record["latencies"] (s), record["followup_acked"] (time each follow-up's
    reply arrived), record["turns"] acknowledged, record["errors"] (status codes, or exception names)."""
    import httpx

    messages = [{"role": "user", "content": PROMPTS[user_index % len(PROMPTS)]}]
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=max(deadline - time.monotonic(), 1.0)) as client:
        for turn in range(turns):
            if time.monotonic() > deadline:
                break
            start = time.monotonic()
            try:
                response = client.post(f"{url}/v1/chat/completions", headers=headers,
                                       json={"model": model, "messages": messages})
            except httpx.HTTPError as exc:
                record["errors"].append(type(exc).__name__)
                break
            if response.status_code != 200:
                record["errors"].append(response.status_code)
                break
            now = time.monotonic()
            record["latencies"].append(now - start)
            record["turns"] += 1
            if turn > 0:
                record["followup_acked"].append(now)
            reply = response.json()["choices"][0]["message"]["content"]
            messages = messages + [{"role": "assistant", "content": reply},
                                   {"role": "user", "content": FOLLOWUPS[turn % len(FOLLOWUPS)]}]


def _watch_learned(url: str, keys: list[str], records: list[dict], stop: threading.Event) -> None:
    """Poll GET /v1/me; record["learned_at"][k] = when the user's learned count first reached k + 1."""
    import httpx

    with httpx.Client(timeout=60.0) as client:
        while not stop.is_set():
            for key, record in zip(keys, records):
                me = client.get(f"{url}/v1/me", headers={"Authorization": f"Bearer {key}"}).json()
                now = time.monotonic()
                while len(record["learned_at"]) < me["learned"]:
                    record["learned_at"].append(now)
            stop.wait(0.2)


def run_load(users: int = 4, turns: int = 5, update_every: int = 2, max_new_tokens: int = 16,
             time_limit: float = 600.0) -> dict:
    """Serve, load, stop, check; returns the figures (times in seconds). AssertionError when a turn is lost."""
    import httpx

    from sdpo_fast.serve.store import Store

    start = time.monotonic()
    deadline = start + time_limit
    with tempfile.TemporaryDirectory() as tmp:
        state_dir = Path(tmp) / "state"
        store = Store(state_dir)
        names = [f"user{i}" for i in range(users)]
        keys = [store.add_user(name) for name in names]
        store.close()
        process, url = _start(state_dir, update_every, max_new_tokens)
        records = [{"latencies": [], "followup_acked": [], "learned_at": [], "turns": 0, "errors": []}
                   for _ in names]
        stop = threading.Event()
        try:
            models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {keys[0]}"}).json()
            model = models["data"][0]["id"]
            load_start = time.monotonic()
            threads = [threading.Thread(target=_chat, args=(url, model, key, i, turns, deadline, record))
                       for i, (key, record) in enumerate(zip(keys, records))]
            watcher = threading.Thread(target=_watch_learned, args=(url, keys, records, stop), daemon=True)
            for thread in threads + [watcher]:
                thread.start()
            for thread in threads:
                thread.join()
            load_seconds = time.monotonic() - load_start
            learnable = [len(r["followup_acked"]) // update_every * update_every for r in records]
            while time.monotonic() < deadline and watcher.is_alive() and any(
                    len(r["learned_at"]) < n for r, n in zip(records, learnable)):
                time.sleep(0.2)
            stop.set()
            watcher.join()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
        store = Store(state_dir)
        stored = {name: store.counts(name) for name in names}
        store.close()
    acknowledged = sum(r["turns"] for r in records)
    followups = sum(len(r["followup_acked"]) for r in records)
    for name, record in zip(names, records):
        assert stored[name]["replies"] == record["turns"], (name, stored[name], record["turns"])
        assert stored[name]["interactions"] == len(record["followup_acked"]), (name, stored[name])
    latencies = [x for r in records for x in r["latencies"]]
    lags = [learned - acked for r, n in zip(records, learnable)
            for acked, learned in zip(r["followup_acked"][:n], r["learned_at"][:n])]
    return {
        "users": users, "turns_per_user": turns, "update_every": update_every, "max_new_tokens": max_new_tokens,
        "acknowledged_turns": acknowledged, "stored_turns": sum(s["replies"] for s in stored.values()),
        "followups": followups, "stored_interactions": sum(s["interactions"] for s in stored.values()),
        "learnable": sum(learnable), "learned_in_time": len(lags),
        "errors": sum(len(r["errors"]) for r in records),
        "load_s": round(load_seconds, 2), "turns_per_s": round(acknowledged / load_seconds, 3),
        "latency_p50_s": _round(percentile(latencies, 50)), "latency_p95_s": _round(percentile(latencies, 95)),
        "learner_lag_p50_s": _round(percentile(lags, 50)), "learner_lag_p95_s": _round(percentile(lags, 95)),
        "learner_lag_max_s": _round(max(lags, default=None)), "total_s": round(time.monotonic() - start, 2),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def markdown(figures: dict) -> str:
    f = figures
    machine = f"{_cpu_name()}, {os.cpu_count()} cores"
    return (
        f"{f['users']} users x {f['turns_per_user']} turns (`--update-every {f['update_every']}`, "
        f"`--max-new-tokens {f['max_new_tokens']}`), {machine}; generated by "
        "`python benchmarks/test_serve_bench.py`.\n\n"
        "| acknowledged turns | stored turns | follow-ups | stored interactions | errors | turns/s | "
        "latency p50 | latency p95 | learned in time | learner lag p50 | learner lag p95 | lag max |\n"
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n"
        f"| {f['acknowledged_turns']} | {f['stored_turns']} | {f['followups']} | {f['stored_interactions']} | "
        f"{f['errors']} | {f['turns_per_s']} | {_s(f['latency_p50_s'])} | {_s(f['latency_p95_s'])} | "
        f"{f['learned_in_time']} of {f['learnable']} | {_s(f['learner_lag_p50_s'])} | {_s(f['learner_lag_p95_s'])} | "
        f"{_s(f['learner_lag_max_s'])} |")


def _cpu_name() -> str:
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
    except OSError:
        names = []
    return names[0] if names else platform.processor() or platform.machine()


def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def write_between_markers(path: Path, text: str) -> None:
    """Replace what lies between BEGIN and END in the file at path (each on a line of its own) by text."""
    content = path.read_text()
    if content.count(BEGIN) != 1 or content.count(END) != 1 or content.index(BEGIN) > content.index(END):
        raise ValueError(f"{path} needs one {BEGIN!r} line followed by one {END!r} line (the section's markers)")
    before, rest = content.split(BEGIN)
    path.write_text(f"{before}{BEGIN}\n{text}\n{END}{rest.split(END)[1]}")


def test_serve_load(benchmark):
    figures = {}

    def once():
        figures.update(run_load(users=2, turns=3, update_every=2, max_new_tokens=8, time_limit=300))

    benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info.update(figures)
    assert figures["errors"] == 0 and figures["stored_turns"] == figures["acknowledged_turns"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--update-every", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds until the users stop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = run_load(args.users, args.turns, args.update_every, args.max_new_tokens, args.time_limit)
    if args.json:
        print(json.dumps(figures, indent=1))
    else:
        write_between_markers(BENCHMARKS, markdown(figures))
        print(f"figures written into {BENCHMARKS}")


if __name__ == "__main__":
    main()
