"""Synthetic class-labelled images: a class-per-folder collection for image-to-image retrieval.

Each class is one shape in one colour family; every image draws the shape at a random position,
scale and rotation, with its hue, saturation and brightness jittered inside the family, on a
random low-saturation background with pixel noise, and half the images carry a small distractor
of another shape and colour. So the class is visible to a model that looks at shape and colour
wherever they are, while raw pixels are a poor match (a nearest neighbour on them is far from
perfect): a tiny ViT trained from scratch has something to learn. Layout and names are what
``genius import-images`` reads:

    python -m genius.synthetic.class_images --out DIR [--classes 8 --per-class 30 --size 32 --seed 0]

writes ``DIR/<class>/<index:03d>.png`` (class names ``<k:02d>_<shape>``), byte-identical for one seed.
"""
from __future__ import annotations

import argparse
import colorsys
import math
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from genius.common.io import atomic_dir, atomic_write_json
from genius.common.stage import add_debug_flag, user_errors_exit

MARKER = ".class_images.json"  # hidden, so import-images does not take it for a class


def _regular(n: int, phase: float = 0.0) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star(points: int, inner: float) -> list[tuple[float, float]]:
    return [(r * math.cos(math.pi * k / points), r * math.sin(math.pi * k / points))
            for k, r in zip(range(2 * points), [1.0, inner] * points)]


# Outlines in a unit box centred on the origin; the order fixes which class gets which shape.
SHAPES = {
    "circle": _regular(24),
    "triangle": _regular(3, -math.pi / 2),
    "square": _regular(4, math.pi / 4),
    "star": _star(5, 0.45),
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
    "bar": [(-1, -0.35), (1, -0.35), (1, 0.35), (-1, 0.35)],
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.7), (1, 0), (0.2, 0.7), (0.2, 0.25), (-1, 0.25)],
    "ell": [(-0.8, -1), (-0.2, -1), (-0.2, 0.4), (0.8, 0.4), (0.8, 1), (-0.8, 1)],
    "hexagon": _regular(6),
    "crescent": [(math.cos(a), math.sin(a)) for a in np.linspace(-2.2, 2.2, 12)]
                + [(0.55 * math.cos(a) - 0.35, 0.75 * math.sin(a)) for a in np.linspace(1.9, -1.9, 10)],
}
SUPERSAMPLE = 4  # shapes are drawn this much larger and box-filtered down, for anti-aliased edges


def class_names(num_classes: int) -> list[str]:
    shapes = list(SHAPES)
    return [f"{k:02d}_{shapes[k % len(shapes)]}" for k in range(num_classes)]


def _colour(hue: float, rng: np.random.Generator, saturation: tuple[float, float],
            value: tuple[float, float]) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(*saturation), rng.uniform(*value))
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(draw: ImageDraw.ImageDraw, outline, centre, radius: float, angle: float, fill) -> None:
    cos, sin = math.cos(angle), math.sin(angle)
    draw.polygon([(centre[0] + radius * (x * cos - y * sin), centre[1] + radius * (x * sin + y * cos))
                  for x, y in outline], fill=fill)


def render(label: int, num_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class ``label``: its shape and colour family, everything else random."""
    shapes = list(SHAPES.values())
    big = size * SUPERSAMPLE
    background = _colour(rng.uniform(), rng, (0.0, 0.25), (0.25, 0.85))
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    if rng.uniform() < 0.5:  # a distractor, drawn first so the class shape stays on top
        other = (label + 1 + rng.integers(num_classes - 1)) % num_classes
        _draw_shape(draw, shapes[other % len(shapes)], rng.uniform(0.15, 0.85, 2) * big, big * rng.uniform(0.08, 0.14),
                    rng.uniform(0, 2 * math.pi), _colour(rng.uniform(), rng, (0.3, 1.0), (0.4, 1.0)))
    # Neighbouring classes' colour families overlap at their edges, so colour alone is not enough.
    hue = (label + rng.uniform(-0.6, 0.6)) / num_classes
    radius = big * rng.uniform(0.18, 0.34)
    centre = rng.uniform(radius, big - radius, 2)
    _draw_shape(draw, shapes[label % len(shapes)], centre, radius, rng.uniform(0, 2 * math.pi),
                _colour(hue, rng, (0.55, 1.0), (0.55, 1.0)))
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    pixels += rng.normal(0, 18, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_class_images(out_dir: str | os.PathLike, num_classes: int = 8, per_class: int = 30, size: int = 32,
                       seed: int = 0) -> Path:
    """Write the collection to ``out_dir`` (replaced whole; refused when it holds anything else)."""
    for key, value, low in (("num_classes", num_classes, 2), ("per_class", per_class, 1), ("size", size, 8),
                            ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{key}: {value!r} is out of range; it must be an integer >= {low}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or (out_dir / MARKER).is_file())):
        raise ValueError(f"{out_dir}: exists and is not a synthetic class-image folder; choose another --out or "
                         "remove it")
    names = class_names(num_classes)
    with atomic_dir(out_dir) as tmp:
        for label, name in enumerate(names):
            (tmp / name).mkdir()
            for index in range(per_class):
                rng = np.random.default_rng([seed, label, index])
                render(label, num_classes, size, rng).save(tmp / name / f"{index:03d}.png")
        atomic_write_json(tmp / MARKER, {"generator": "genius.synthetic.class_images", "classes": names,
                                         "per_class": per_class, "size": size, "seed": seed})
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genius.synthetic.class_images",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the folder to write (DIR/<class>/<n>.png)")
    parser.add_argument("--classes", type=int, default=8, help="number of classes (default 8)")
    parser.add_argument("--per-class", type=int, default=30, help="images per class (default 30)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files (default 0)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with user_errors_exit(parser):
        out = write_class_images(args.out, args.classes, args.per_class, args.size, args.seed)
    print(f"wrote {args.classes} classes x {args.per_class} images ({args.size} px) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
