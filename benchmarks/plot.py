"""A bar chart of speed-up ratios as a PNG, with no plotting dependency (zlib + a 5x7 bitmap font).

The GPU machine has no network and may lack matplotlib; a dependency-free writer draws the same chart
everywhere. Letters are drawn upper-case.
"""
from __future__ import annotations

import struct
import zlib

# 5x7 glyphs, one 5-bit row per entry (bit 4 = leftmost column).
_FONT = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12),
    "A": (14, 17, 17, 17, 31, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30), "C": (14, 17, 16, 16, 16, 17, 14),
    "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31), "F": (31, 16, 16, 30, 16, 16, 16),
    "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17), "I": (14, 4, 4, 4, 4, 4, 14),
    "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17), "L": (16, 16, 16, 16, 16, 16, 31),
    "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17), "O": (14, 17, 17, 17, 17, 17, 14),
    "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13), "R": (30, 17, 17, 30, 20, 18, 17),
    "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4), "U": (17, 17, 17, 17, 17, 17, 14),
    "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10), "X": (17, 17, 10, 4, 10, 17, 17),
    "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    "x": (0, 0, 17, 10, 4, 10, 17), " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 12, 12), ",": (0, 0, 0, 0, 12, 4, 8),
    "-": (0, 0, 0, 31, 0, 0, 0), "+": (0, 4, 4, 31, 4, 4, 0), ":": (0, 12, 12, 0, 12, 12, 0),
    "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8), "/": (0, 1, 2, 4, 8, 16, 0),
    "%": (24, 25, 2, 4, 8, 19, 3), "_": (0, 0, 0, 0, 0, 0, 31), "=": (0, 0, 31, 0, 31, 0, 0),
    "|": (4,) * 7, "?": (14, 17, 1, 2, 4, 0, 4),
}
_SCALE = 2                   # pixels per font dot
_CHAR_W = 6 * _SCALE         # glyph + one column of spacing


class Canvas:
    def __init__(self, width: int, height: int, background=(255, 255, 255)):
        self.w, self.h = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        x0, x1 = max(0, min(x0, x1)), min(self.w, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.h, max(y0, y1))
        if x1 <= x0:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            i = (y * self.w + x0) * 3
            self.px[i:i + len(row)] = row

    def text(self, x: int, y: int, s: str, color=(0, 0, 0)) -> int:
        """Draw `s` with its top-left corner at (x, y); returns the x after the last glyph."""
        for ch in s:
            glyph = _FONT.get(ch, _FONT.get(ch.upper(), _FONT["?"]))
            for r, bits in enumerate(glyph):
                for c in range(5):
                    if bits & (16 >> c):
                        self.rect(x + c * _SCALE, y + r * _SCALE, x + (c + 1) * _SCALE, y + (r + 1) * _SCALE, color)
            x += _CHAR_W
        return x

    def png(self) -> bytes:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        stride = self.w * 3
        raw = b"".join(b"\x00" + bytes(self.px[y * stride:(y + 1) * stride]) for y in range(self.h))
        header = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


_SERIES = ((0, 90, 180), (230, 120, 0))  # blue, orange


def ratio_chart(title: str, rows: list[tuple[str, list[float | None]]], series: list[str]) -> bytes:
    """Horizontal bars: one group per variant, one bar per series (e.g. "vs eager", "vs recipe");
    a grey line marks 1.0x. `rows`: (variant label, [ratio or None per series])."""
    label_w = _CHAR_W * max([len(name) for name, _ in rows] + [12]) + 20
    bar_w, bar_h, gap = 460, 18, 14
    width = label_w + bar_w + _CHAR_W * 8 + 20
    top = 60
    height = top + len(rows) * (len(series) * (bar_h + 4) + gap) + 20
    canvas = Canvas(width, height)
    canvas.text(10, 10, title)
    x = 10
    for i, name in enumerate(series):
        canvas.rect(x, 34, x + 14, 48, _SERIES[i % 2])
        x = canvas.text(x + 20, 36, name) + 20
    vmax = max([v for _, vals in rows for v in vals if v] + [1.0]) * 1.05
    y = top
    for name, vals in rows:
        canvas.text(10, y + 4, name)
        for i, v in enumerate(vals):
            if v:
                end = label_w + int(bar_w * v / vmax)
                canvas.rect(label_w, y, end, y + bar_h, _SERIES[i % 2])
                canvas.text(end + 6, y + 2, f"{v:.2f}x")
            else:
                canvas.text(label_w + 6, y + 2, "n/a", (120, 120, 120))
            y += bar_h + 4
        y += gap
    one = label_w + int(bar_w / vmax)
    canvas.rect(one, top - 6, one + 2, height - 14, (150, 150, 150))
    return canvas.png()
