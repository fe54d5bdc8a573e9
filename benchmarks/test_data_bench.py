"""load_interactions on a generated JSONL of >= 200 MB: interactions/s, and peak RSS that does not
grow with file size (small file vs 200 MB file, each measured in a fresh subprocess).

Run: python -m pytest benchmarks/test_data_bench.py -s
"""
import json
import subprocess
import sys
import time

import pytest

from sdpo_fast.data import load_interactions
from sdpo_fast.data.synthetic import generate_conversations

BIG_BYTES = 200 * 2**20
RSS_MARGIN_KB = 64 * 1024

_PEAK_RSS_SCRIPT = """
import resource, sys
from sdpo_fast.data import load_interactions
stream = load_interactions(sys.argv[1])
n = sum(1 for _ in stream)
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data_bench")
    block = "".join(json.dumps(row) + "\n" for row in generate_conversations(2000, seed=1)).encode()
    small, big = folder / "small.jsonl", folder / "big.jsonl"
    small.write_bytes(block)
    with open(big, "wb") as f:
        for _ in range(-(-BIG_BYTES // len(block))):
            f.write(block)
    yield small, big
    big.unlink()


def _peak_rss_kb(path) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(path)], check=True, capture_output=True, text=True)
    n, kb = out.stdout.split()
    return int(n), int(kb)


def test_interactions_per_second(benchmark, files):
    _, big = files

    def run():
        start = time.perf_counter()
        stream = load_interactions(big)
        n = sum(1 for _ in stream)
        return n, stream.stats.rows, time.perf_counter() - start

    n, rows, seconds = benchmark.pedantic(run, rounds=1, iterations=1)
    mb = big.stat().st_size / 2**20
    benchmark.extra_info.update(interactions=n, rows=rows, file_mb=round(mb, 1),
                                interactions_per_s=round(n / seconds), mb_per_s=round(mb / seconds, 1))
    print(f"\n{mb:.0f} MB, {rows} rows, {n} interactions in {seconds:.1f} s: "
          f"{n / seconds:,.0f} interactions/s, {rows / seconds:,.0f} rows/s, {mb / seconds:.1f} MB/s")
    assert n > 0


def test_peak_rss_does_not_grow_with_file_size(files):
    small, big = files
    n_small, small_kb = _peak_rss_kb(small)
    n_big, big_kb = _peak_rss_kb(big)
    print(f"\npeak RSS: {small.stat().st_size / 2**20:.1f} MB file ({n_small} interactions) {small_kb / 1024:.0f} MiB; "
          f"{big.stat().st_size / 2**20:.0f} MB file ({n_big} interactions) {big_kb / 1024:.0f} MiB")
    assert n_big > 100 * n_small
    assert big_kb < small_kb + RSS_MARGIN_KB
