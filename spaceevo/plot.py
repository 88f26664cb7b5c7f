"""Scatter / line plots as PNG, drawn with Pillow (a dependency of torchvision), so spaceevo needs no
plotting library. One function, :func:`plot_png`: series of points, optional connecting lines,
dashed vertical markers (budgets, constraints), a legend."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from spaceevo.io import atomic_write_bytes

WIDTH, HEIGHT = 800, 560
LEFT, RIGHT, TOP, BOTTOM = 80, 30, 50, 70
BLACK, LIGHT, BLUE = (0, 0, 0), (225, 225, 225), (60, 90, 200)
PALETTE = ((210, 30, 30), (40, 120, 200), (30, 150, 60), (230, 140, 20), (140, 60, 170), (120, 120, 120))


@dataclass(frozen=True)
class Series:
    """Points ``(x, y)`` drawn as discs of ``radius`` px; ``line`` joins them in x order."""

    label: str
    points: Sequence[tuple[float, float]]
    color: tuple[int, int, int] = PALETTE[0]
    radius: float = 3.0
    line: bool = False
    outline: bool = False


@dataclass(frozen=True)
class Figure:
    """A whole plot: its series, axis labels, title and dashed vertical markers at ``vlines``."""

    series: Sequence[Series]
    x_label: str
    y_label: str
    title: str
    vlines: Sequence[float] = field(default_factory=tuple)


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    span = max(high - low, 1e-9)
    raw = span / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def plot_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (axes fitted to every point and marker, 5% margins, the legend in a
    band above the highest point)."""
    points = [p for s in figure.series for p in s.points]
    xs = [x for x, _ in points] + list(figure.vlines)
    ys = [y for _, y in points] or [0.0]
    x0, x1 = min(xs, default=0.0), max(xs, default=1.0)
    y0, y1 = min(ys), max(ys)
    pad_x, pad_y = 0.05 * max(x1 - x0, 1e-3), 0.05 * max(y1 - y0, 1e-3)
    x0, x1, y0, y1 = x0 - pad_x, x1 + pad_x, y0 - pad_y, y1 + pad_y
    # keep a band above the highest point free for the legend, so that no point hides under it
    legend = min(0.5, (12 + 18 * len(figure.series)) / (HEIGHT - TOP - BOTTOM))
    y1 = max(y1, (max(ys) - legend * y0) / (1 - legend))

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            LEFT + (x - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT),
            HEIGHT - BOTTOM - (y - y0) / (y1 - y0) * (HEIGHT - TOP - BOTTOM),
        )

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    small, large = _font(13), _font(16)
    for x in nice_ticks(x0, x1):
        px, _ = at(x, y0)
        draw.line([(px, TOP), (px, HEIGHT - BOTTOM)], fill=LIGHT)
        draw.text((px, HEIGHT - BOTTOM + 6), f"{x:g}", fill=BLACK, font=small, anchor="ma")
    for y in nice_ticks(y0, y1):
        _, py = at(x0, y)
        draw.line([(LEFT, py), (WIDTH - RIGHT, py)], fill=LIGHT)
        draw.text((LEFT - 6, py), f"{y:g}", fill=BLACK, font=small, anchor="rm")
    for marker in figure.vlines:
        px, _ = at(marker, y0)
        for start in range(TOP, HEIGHT - BOTTOM, 10):
            draw.line([(px, start), (px, min(start + 5, HEIGHT - BOTTOM))], fill=BLUE)
    for series in figure.series:
        if series.line and len(series.points) > 1:
            draw.line([at(x, y) for x, y in sorted(series.points)], fill=series.color, width=2)
        r = series.radius
        for x, y in series.points:
            px, py = at(x, y)
            draw.ellipse([px - r, py - r, px + r, py + r], fill=series.color, outline=BLACK if series.outline else None)
    draw.rectangle([LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM], outline=BLACK)
    draw.text((WIDTH / 2, 15), figure.title, fill=BLACK, font=large, anchor="ma")
    draw.text((WIDTH / 2, HEIGHT - 25), figure.x_label, fill=BLACK, font=large, anchor="ma")
    label = Image.new("RGB", (360, 24), "white")
    ImageDraw.Draw(label).text((180, 12), figure.y_label, fill=BLACK, font=large, anchor="mm")
    image.paste(label.rotate(90, expand=True), (8, TOP + (HEIGHT - TOP - BOTTOM) // 2 - 180))
    for index, series in enumerate(figure.series):
        y = TOP + 8 + 18 * index
        draw.ellipse([WIDTH - RIGHT - 14, y, WIDTH - RIGHT - 6, y + 8], fill=series.color)
        draw.text((WIDTH - RIGHT - 20, y + 4), series.label, fill=BLACK, font=small, anchor="rm")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: str | Path, figure: Figure) -> Path:
    """Write :func:`plot_png` atomically to ``path``."""
    return atomic_write_bytes(path, plot_png(figure))
