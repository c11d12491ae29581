"""A timeline chart as a PNG, with the standard library only (zlib, struct): memory per session over time, the
limit as a dashed line, events (kills, policy actions) as labelled marks.

Written for the isolation benchmark, which runs in the testbed guest: Debian's python3 there has no matplotlib,
and adding it to the image would rebuild the image for every developer (and drag in ~60 MB of packages) for one
chart. A line chart needs lines, rectangles and a small bitmap font; that is all this module draws.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
GREY: RGB = (200, 200, 200)
RED: RGB = (200, 0, 0)
ORANGE: RGB = (230, 130, 0)
SERIES_COLOURS: tuple[RGB, ...] = ((31, 90, 180), (40, 150, 60), (150, 60, 170), (20, 160, 170), (120, 90, 40),
                                   (90, 90, 90))
SCALE = 2  # font pixels per glyph dot
MARK_ROWS = 16  # mark labels cycle through this many rows below the top
GLYPH_W, GLYPH_H = 5, 7

# A 5x7 font, one string per glyph, rows separated by spaces ('#' = ink). Lower case is drawn as upper case.
FONT: dict[str, str] = {
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.", "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#", "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.", "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####", "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####", "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.", "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#", "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#", "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.", "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#", "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.", "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.", "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.", "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..", "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "-": "..... ..... ..... ##### ..... ..... .....", ".": "..... ..... ..... ..... ..... .##.. .##..",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....", "/": "....# ....# ...#. ..#.. .#... #.... #....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##", "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...", "=": "..... ..... ##### ..... ##### ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####", ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....", " ": "..... ..... ..... ..... ..... ..... .....",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]  # (seconds, bytes)


@dataclass
class Mark:
    at: float  # seconds
    label: str
    colour: RGB = RED


@dataclass
class Chart:
    title: str
    series: list[Series]
    marks: list[Mark] = field(default_factory=list)
    limit: float | None = None  # bytes; drawn dashed
    width: int = 960
    height: int = 480


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * (width * height))

    def dot(self, x: int, y: int, colour: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i:i + 3] = bytes(colour)

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: RGB) -> None:
        row = bytes(colour) * (max(0, min(x1, self.width) - max(x0, 0)))
        for y in range(max(y0, 0), min(y1, self.height)):
            i = 3 * (y * self.width + max(x0, 0))
            self.pixels[i:i + len(row)] = row

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: RGB, width: int = 1, dash: int = 0) -> None:
        """Bresenham's line; `dash` > 0 draws that many pixels on, then as many off."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err, n = dx + dy, 0
        while True:
            if not dash or (n // dash) % 2 == 0:
                for w in range(width):
                    self.dot(x0, y0 + w, colour)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy
            n += 1

    def text(self, x: int, y: int, text: str, colour: RGB = BLACK) -> int:
        """Draw text with its top-left corner at (x, y); return the x after it."""
        for char in text.upper():
            rows = FONT.get(char, FONT["?"]).split()
            for gy, row in enumerate(rows):
                for gx, ink in enumerate(row):
                    if ink == "#":
                        self.rect(x + gx * SCALE, y + gy * SCALE, x + (gx + 1) * SCALE, y + (gy + 1) * SCALE, colour)
            x += (GLYPH_W + 1) * SCALE
        return x

    def png(self) -> bytes:
        stride = 3 * self.width
        raw = b"".join(b"\x00" + bytes(self.pixels[y * stride:(y + 1) * stride]) for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + \
            chunk(b"IEND", b"")


def text_width(text: str) -> int:
    return len(text) * (GLYPH_W + 1) * SCALE


def nice_step(span: float, ticks: int) -> float:
    """A 1/2/5 x 10^n step that cuts `span` into about `ticks` parts."""
    if span <= 0:
        return 1.0
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    step: float = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return step


def render(chart: Chart) -> bytes:
    """The chart as PNG bytes: x = seconds, y = MiB."""
    canvas = Canvas(chart.width, chart.height)
    left, right, top, bottom = 80, chart.width - 20, 40, chart.height - 70
    t_max = max([p[0] for s in chart.series for p in s.points] + [m.at for m in chart.marks] + [1e-3])
    y_max = max([p[1] for s in chart.series for p in s.points] + [chart.limit or 0.0, 1.0]) * 1.08 / (1 << 20)

    def px(t: float) -> int:
        return left + round((right - left) * t / t_max)

    def py(mib: float) -> int:
        return bottom - round((bottom - top) * mib / y_max)

    canvas.text(left, 10, chart.title)
    _axes(canvas, left, right, top, bottom, t_max, y_max, px, py)
    if chart.limit:
        canvas.line(left, py(chart.limit / (1 << 20)), right, py(chart.limit / (1 << 20)), RED, dash=6)
        canvas.text(right - text_width("LIMIT"), py(chart.limit / (1 << 20)) - 18, "limit", RED)
    for i, series in enumerate(chart.series):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        pts = [(px(t), py(b / (1 << 20))) for t, b in series.points]
        for (x0, y0), (x1, y1) in itertools.pairwise(pts):
            canvas.line(x0, y0, x1, y1, colour, width=2)
    _marks(canvas, chart.marks, px, top, bottom)
    _legend(canvas, chart.series, left, chart.height - 26)
    return canvas.png()


def _axes(canvas: Canvas, left: int, right: int, top: int, bottom: int, t_max: float, y_max: float,
          px: Callable[[float], int], py: Callable[[float], int]) -> None:
    canvas.line(left, bottom, right, bottom, BLACK)
    canvas.line(left, top, left, bottom, BLACK)
    step = nice_step(y_max, 6)
    mib = 0.0
    while mib <= y_max:
        y = py(mib)
        canvas.line(left + 1, y, right, y, GREY)
        label = f"{mib:g}"
        canvas.text(left - 8 - text_width(label), y - 7, label)
        mib += step
    canvas.text(4, top - 30, "MiB")
    step = nice_step(t_max, 10)
    t = 0.0
    while t <= t_max:
        x = px(t)
        canvas.line(x, bottom, x, bottom + 5, BLACK)
        label = f"{t:g}"
        canvas.text(x - text_width(label) // 2, bottom + 8, label)
        t += step
    canvas.text(right - text_width("SECONDS"), bottom + 26, "seconds")


def _marks(canvas: Canvas, marks: Sequence[Mark], px: Callable[[float], int], top: int, bottom: int) -> None:
    for i, mark in enumerate(marks):
        x = px(mark.at)
        canvas.line(x, top, x, bottom, mark.colour, dash=3)
        # Labels past the middle go to the left of their line, so that they stay on the canvas.
        lx = x + 3 if x < canvas.width // 2 else x - 3 - text_width(mark.label)
        canvas.text(lx, top + 4 + 16 * (i % MARK_ROWS), mark.label, mark.colour)


def _legend(canvas: Canvas, series: Sequence[Series], x: int, y: int) -> None:
    for i, s in enumerate(series):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        canvas.rect(x, y + 2, x + 14, y + 12, colour)
        x = canvas.text(x + 20, y, s.label) + 24
