"""The explain report in a real browser: Debian's headless Chromium runs its script and renders coloured tokens."""
from __future__ import annotations

import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from sdpo_fast.explain import BLUE, RED, build_report, write_html
from sdpo_fast.testing import tiny_tokenizer
from test_explain import INJECTED, fake_scores, interactions

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)")
WIDTH, HEIGHT = 800, 600


def chromium(tmp_path: Path, *args: str) -> str:
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    result = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=60, check=True)
    return result.stdout


def decode_png(data: bytes) -> tuple[int, int, int, bytes]:
    """(width, height, channels, raw pixel bytes) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, colour_type, _, _, interlace = header
    assert depth == 8 and colour_type in (2, 6) and interlace == 0, header
    channels = 3 if colour_type == 2 else 4
    stride = width * channels
    raw = zlib.decompress(b"".join(idat))
    out, previous = bytearray(), bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, up_left = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 255
        out += line
        previous = line
    return width, height, channels, bytes(out)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    tokenizer = tiny_tokenizer("qwen3")
    items = interactions()
    scored = fake_scores(tokenizer, items)
    for s in scored:  # strong, alternating signs: saturated blue and red tokens
        s.advantages.copy_((s.advantages.sign() + (s.advantages == 0)) * 3)
    report = build_report(items, scored, tokenizer, model="tiny", data=INJECTED)
    return write_html(report, tmp_path_factory.mktemp("explain") / "report.html")


def test_script_runs_and_injected_markup_stays_text(page, tmp_path):
    dom = chromium(tmp_path, "--dump-dom", page.as_uri())
    assert "3 of 3 shown" in dom, "the inline script (allowed by its CSP hash) did not run"
    assert dom.count("<script") == 1 and "<img" not in dom
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom


def test_screenshot_is_not_blank(page, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri())
    width, height, channels, pixels = decode_png(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    rgb = {pixels[i:i + 3] for i in range(0, len(pixels), channels)}
    assert len(rgb) > 50, "the screenshot is (nearly) one colour"
    for colour in (BLUE, RED):
        near = [p for p in rgb if sum(abs(a - b) for a, b in zip(p, colour)) < 30]
        assert near, f"no token coloured near {colour}"
