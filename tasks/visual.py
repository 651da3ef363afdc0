"""Synthetic visual task families for the embedded vision-language toy world.

Each row's image is drawn with Pillow from a seeded random stream (the same ``data.seed``, the same pixels on
every machine: integer coordinates, no anti-aliasing, Pillow's built-in bitmap font), written to the image
store and named in the prompt by its tag (``cl.vision``): ``"<image:HASH>count="``, answer ``"3"``. The
eval split is drawn first from its own stream of distinct images; training rows never repeat an eval image
(``tasks.synthetic.SyntheticFamily``'s rule, the prompt being the image). Exact match is the verifier.

Families (all ``size`` x ``size`` pixels, white background):

- ``vcount``: 1-4 red discs, non-overlapping -> how many (``"3"``);
- ``vread``: one black digit 0-9 at a random place -> the digit;
- ``vcolor``: one filled square in one of six colours -> its name (``"blue"``);
- ``vwhere``: a disc and a square -> where the disc is relative to the square (``left``/``right``/``above``/
  ``below``, the axis with the larger gap);
- ``vbigger``: two discs of different radii, side by side -> which is bigger (``left``/``right``);
- ``vshape``: one black outlined disc, square or triangle, or a filled cross, of random size and place ->
  its name;
- ``vadd``: two digits side by side -> their sum (``"11"``), reading plus arithmetic.

Each row also has a ``key`` (0-9) that names its part of the input space, for a base stage that trains on
part of it only (``base.cover``): the digit (vread), the left digit (vadd), the number of discs (vcount),
the colour's index (vcolor), the disc's horizontal position in tenths of the width (vwhere), the bigger
disc's horizontal position in tenths of the width (vbigger: 2 left, 7 right), three times the shape's index
in ``SHAPES`` (vshape: disc 0, square 3, triangle 6, cross 9). The keys of vread, vbigger and vshape name the
answer, so with ``cover`` 0-4 their uncovered rows need an answer the stage never taught for that question
and score 0: a level set by data. vwhere's uncovered rows (right half) are reached by transfer only.
"""

from __future__ import annotations

import random
from typing import Callable

from tasks.synthetic import SyntheticFamily

# bumped whenever a drawing changes: part of the vision-language base stage's cache key
VERSION = 2  # 2: vbigger's key names the answer (the bigger disc's side); vshape

COLORS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 200, 20),
          "purple": (140, 40, 170), "orange": (240, 130, 20)}


def _canvas(size: int):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    return im, ImageDraw.Draw(im)


def _font():
    from PIL import ImageFont

    return ImageFont.load_default_imagefont()  # the bitmap font: identical glyphs everywhere


def _disc(draw, x: int, y: int, r: int, fill) -> None:
    draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _free_spots(rng: random.Random, k: int, size: int, r: int) -> list[tuple[int, int]]:
    """``k`` centres inside the canvas whose discs/squares of radius ``r`` keep at least one pixel apart."""
    while True:
        pts = [(rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r)) for _ in range(k)]
        if all(abs(a[0] - b[0]) > 2 * r + 1 or abs(a[1] - b[1]) > 2 * r + 1
               for i, a in enumerate(pts) for b in pts[i + 1:]):
            return pts


def count_discs(size: int = 32, most: int = 4) -> Callable:
    def draw(rng: random.Random):
        n = rng.randint(1, most)
        im, d = _canvas(size)
        for x, y in _free_spots(rng, n, size, 3):
            _disc(d, x, y, 3, COLORS["red"])
        return im, str(n), n
    return draw


def read_digit(size: int = 32) -> Callable:
    def draw(rng: random.Random):
        v = rng.randint(0, 9)
        im, d = _canvas(size)
        d.text((rng.randint(0, size - 7), rng.randint(0, size - 12)), str(v), fill="black", font=_font())
        return im, str(v), v
    return draw


def color_name(size: int = 32) -> Callable:
    def draw(rng: random.Random):
        name = rng.choice(sorted(COLORS))
        s = rng.randint(8, 16)
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        im, d = _canvas(size)
        d.rectangle((x, y, x + s - 1, y + s - 1), fill=COLORS[name])
        return im, name, sorted(COLORS).index(name)
    return draw


def where(size: int = 32) -> Callable:
    def draw(rng: random.Random):
        while True:
            (cx, cy), (sx, sy) = _free_spots(rng, 2, size, 4)
            dx, dy = cx - sx, cy - sy
            if abs(abs(dx) - abs(dy)) >= 3:  # one axis clearly dominates
                break
        im, d = _canvas(size)
        _disc(d, cx, cy, 4, COLORS["blue"])
        d.rectangle((sx - 4, sy - 4, sx + 4, sy + 4), fill=COLORS["green"])
        ans = ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("below" if dy > 0 else "above")
        return im, ans, cx * 10 // size
    return draw


def bigger(size: int = 32) -> Callable:
    def draw(rng: random.Random):
        r1, r2 = rng.sample(range(2, 8), 2)
        im, d = _canvas(size)
        q = size // 4
        _disc(d, q, rng.randint(8, size - 9), r1, COLORS["purple"])
        _disc(d, 3 * q, rng.randint(8, size - 9), r2, COLORS["purple"])
        return im, "left" if r1 > r2 else "right", (q if r1 > r2 else 3 * q) * 10 // size
    return draw


SHAPES = ("disc", "square", "triangle", "cross")


def shape_name(size: int = 32) -> Callable:
    def draw(rng: random.Random):
        k = rng.randrange(len(SHAPES))
        s = rng.randint(10, 16)  # the bounding box's side
        x, y = rng.randint(0, size - s), rng.randint(0, size - s)
        im, d = _canvas(size)
        box = (x, y, x + s - 1, y + s - 1)
        w = 2  # outlines, so that no shape looks like vcount's discs or vcolor's filled squares
        if SHAPES[k] == "disc":
            d.ellipse(box, outline="black", width=w)
        elif SHAPES[k] == "square":
            d.rectangle(box, outline="black", width=w)
        elif SHAPES[k] == "triangle":
            pts = [(x + (s - 1) // 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)]
            d.line([*pts, pts[0]], fill="black", width=w)
        else:
            t = max(2, s // 4)  # bar thickness
            m = (s - t) // 2
            d.rectangle((x + m, y, x + m + t - 1, y + s - 1), fill="black")
            d.rectangle((x, y + m, x + s - 1, y + m + t - 1), fill="black")
        return im, SHAPES[k], 3 * k
    return draw


def add_digits(size: int = 32) -> Callable:
    def draw(rng: random.Random):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        im, d = _canvas(size)
        half = size // 2
        d.text((rng.randint(0, half - 8), rng.randint(0, size - 12)), str(a), fill="black", font=_font())
        d.text((rng.randint(half + 1, size - 7), rng.randint(0, size - 12)), str(b), fill="black", font=_font())
        return im, str(a + b), a
    return draw


class VisualFamily(SyntheticFamily):
    """A synthetic family whose body is an image: ``sample`` stores the drawn image and returns its tag; the
    prompt is ``"<image:HASH><tag>="``."""

    def __init__(self, family: str, tag: str, draw: Callable):
        def sample(rng: random.Random) -> tuple[str, str]:
            from cl.vision import store_image

            im, answer, key = draw(rng)
            return store_image(im), answer, key

        super().__init__(family, tag, sample)

    def prompt(self, body: str) -> str:
        return f"{body}{self.tag}="


VISUAL_FAMILIES: dict[str, VisualFamily] = {
    "vcount": VisualFamily("vcount", "count", count_discs()),
    "vread": VisualFamily("vread", "read", read_digit()),
    "vcolor": VisualFamily("vcolor", "color", color_name()),
    "vwhere": VisualFamily("vwhere", "where", where()),
    "vbigger": VisualFamily("vbigger", "bigger", bigger()),
    "vadd": VisualFamily("vadd", "sum", add_digits()),
    "vshape": VisualFamily("vshape", "shape", shape_name()),
}
