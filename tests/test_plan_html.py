"""The HTML plan page in a real browser: headless Chromium screenshots it and dumps its DOM.

Skipped when `chromium` is not installed (Debian: `apt-get install -y chromium`; `.ci/run` does it).
"""
from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest

from autotp.api import plan_model
from autotp.cost.model import CostModel, resolve_hardware
from autotp.examples import build_example
from autotp.io.target import builtin_memory_budget
from autotp.report.render import _SHARD_COLOURS, to_html
from autotp.report.table import price_baselines

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")


def _chromium(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--window-size=1400,1000", *mode, page.as_uri()],
        capture_output=True, text=True, timeout=90, check=False,
    )


def _png_rgb(path: Path) -> tuple[int, int, list[tuple[int, ...]]]:
    """Width, height and the pixels of an 8-bit RGB/RGBA PNG (enough of the format for a screenshot)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    assert depth == 8 and colour in (2, 6), (depth, colour)
    bpp = 3 if colour == 2 else 4
    idat, pos = b"", 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw, stride = zlib.decompress(idat), width * bpp
    rows: list[bytearray] = []
    prev = bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):  # undo the PNG filter (None, Sub, Up, Average, Paeth)
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 255
            elif kind == 2:
                line[i] = (line[i] + b) & 255
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    pixels = [tuple(row[x * bpp:x * bpp + 3]) for row in rows[::4] for x in range(0, width, 4)]  # every 4th pixel
    return width, height, pixels


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, inputs = build_example("gpt", device="meta", batch=4, seq=64, n_layer=4, n_embd=256, n_head=8, vocab_size=1024)
    budget = builtin_memory_budget(model, 4, training=True, optimizer="adamw")
    result = plan_model(model, inputs, mesh_shape=(4,), hardware="h100-sxm", memory_budget=budget)
    cost = CostModel(resolve_hardware("h100-sxm"), 4, training=True, optimizer="adamw")
    baselines = price_baselines(result.space, cost, hardware="h100-sxm", memory_budget=budget)
    path = tmp_path_factory.mktemp("html") / "plan.html"
    path.write_text(to_html(result.plan, baselines, title="autotp plan: GPT test"))
    return path


@pytest.mark.timeout(180)
def test_screenshot_is_drawn(page: Path, tmp_path: Path) -> None:
    png = tmp_path / "plan.png"
    done = _chromium(page, tmp_path / "profile", f"--screenshot={png}")
    assert png.exists(), done.stderr[-2000:]
    width, height, pixels = _png_rgb(png)
    assert (width, height) == (1400, 1000)
    assert png.stat().st_size > 20_000  # a blank page compresses to a few KiB
    colours = Counter(pixels)
    background = colours.most_common(1)[0][0]
    assert background == (255, 255, 255)
    drawn = 1 - colours[background] / len(pixels)
    assert drawn > 0.05, f"only {drawn:.1%} of the screenshot is drawn"
    shards = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in _SHARD_COLOURS]
    assert sum(colours[rgb] for rgb in shards) > 20, "no split placement drawn"
    assert colours[(0xD6, 0x27, 0x28)] > 20, "no collective badge drawn"


@pytest.mark.timeout(180)
def test_dom_has_the_layout(page: Path, tmp_path: Path) -> None:
    done = _chromium(page, tmp_path / "profile", "--dump-dom")
    dom = done.stdout
    assert done.returncode == 0 and "<html" in dom, done.stderr[-2000:]
    assert 'id="title"' in dom and "autotp plan: GPT test" in dom
    assert 'id="totals"' in dom and "replicate-all" in dom and "Megatron-LM" in dom
    assert 'id="legend"' in dom and 'id="layout"' in dom
    assert dom.count('class="layer"') >= 3 and dom.count('class="op"') >= 20
    assert 'class="collective"' in dom and "<svg" in dom
    assert 'class="count">×' in dom  # identical blocks collapsed
