"""report.html in a real browser: headless Chromium (Debian's `chromium`) shall
load the page rendered from a real run's results directory without the network,
show the verdict and the plots (in the DOM it built, not just the file), and paint
a screenshot that is not blank and carries the verdict's colour. Skipped, saying
why, where Chromium is not installed (`make deps` installs it)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from lab import html

DATA = Path(__file__).resolve().parent.parent / "data"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`; "
                                "`make deps` installs it)")


def chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-background-networking", f"--user-data-dir={tmp / 'profile'}", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """A small PNG reader (8-bit RGB or RGBA, not interlaced: what Chromium writes):
    width, height and the rows as RGB bytes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    height = depth = ctype = interlace = 0
    while pos < len(data):
        (n,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
    assert depth == 8 and ctype in (2, 6) and interlace == 0, (depth, ctype, interlace)
    bpp = 3 if ctype == 2 else 4
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        rows.append(bytes(line) if bpp == 3 else bytes(v for j, v in enumerate(line) if j % 4 != 3))
    return width, height, rows


def pixel_stats(rows: list[bytes]) -> tuple[float, int, list[tuple[int, int, int]]]:
    """The share of pixels unlike the page's background (the most common colour),
    the number of distinct colours, and every 8th pixel (for colour look-ups)."""
    counts: dict[tuple[int, int, int], int] = {}
    sample = []
    for row in rows[::2]:
        for i in range(0, len(row), 3 * 2):
            px = (row[i], row[i + 1], row[i + 2])
            counts[px] = counts.get(px, 0) + 1
    for row in rows[::4]:
        sample += [(row[i], row[i + 1], row[i + 2]) for i in range(0, len(row), 3 * 2)]
    total = sum(counts.values())
    background = max(counts.values())
    return 1 - background / total, len(counts), sample


def _has_colour(pixels: list[tuple[int, int, int]], hex_colour: str, tol: int = 10) -> bool:
    want = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return sum(all(abs(p[k] - want[k]) <= tol for k in range(3)) for p in pixels) > 50


@pytest.mark.parametrize(("run", "verdict", "also"), [
    ("run-default-pass", "PASS", "all workloads finished, progressed and drained"),
    ("run-stall-hang", "HANG", "HANG detected"),
])
def test_report_in_headless_chromium(tmp_path: Path, run: str, verdict: str, also: str) -> None:
    d = shutil.copytree(DATA / run, tmp_path / run)
    page = html.write_report(d)
    url = page.resolve().as_uri()

    dom = chromium(["--dump-dom", url], tmp_path).stdout
    assert f">{verdict}<" in dom and also in dom
    assert len(re.findall(r'<svg class="plot"', dom)) == 3, "three charts per disk: rates, in flight, backend"
    assert len(re.findall(r'<path class="series" d="M', dom)) >= 4, "the series are drawn"
    assert "ring capacity 32" in dom and 'class="timeline"' in dom

    png = tmp_path / "shot.png"
    chromium(["--window-size=1400,1600", f"--screenshot={png}", url], tmp_path)
    width, height, rows = read_png(png)
    assert (width, height) == (1400, 1600)
    inked, colours, pixels = pixel_stats(rows)
    assert inked > 0.03, f"the page looks blank: {inked:.1%} of the pixels differ from the background"
    assert colours > 30, f"only {colours} colours: no plots painted?"
    assert _has_colour(pixels, html.VERDICT_COLORS[verdict]), f"no {verdict} badge colour on the screenshot"
    assert _has_colour(pixels, html.GUEST), "no guest series colour on the screenshot"
