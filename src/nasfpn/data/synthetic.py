"""The embedded dataset: procedural shapes on cluttered backgrounds, written in COCO format.

``generate_dataset(out_dir, num_train, num_val)`` writes::

    out_dir/train/000001.png ...            out_dir/annotations/instances_train.json
    out_dir/val/000001.png ...              out_dir/annotations/instances_val.json
    out_dir/synthetic.json                  (what was generated; a second call with the same
                                             arguments finds it and returns at once)

Image ids are 1.. in train and 1000001.. in val, so results scored against the wrong split
fail loudly. Category ids are ``SHAPE_CATEGORY_IDS``, non-contiguous on purpose.

What is in an image
    * Background: a two-colour linear gradient, low-frequency colour blotches and per-pixel noise.
    * Distractors, drawn first so they lie behind the objects and are never annotated: thin
      open polylines, soft-edged translucent blobs and confetti (2-3 px squares).
    * 1..``max_objects`` objects, each one of ``SHAPE_NAMES``. The class is carried by the
      outline only: colour and texture (solid, gradient, stripes, checker, noise) are drawn at
      random for every object, so a detector cannot shortcut through colour.
    * Size: the side ``sqrt(w * h)`` of the shape's frame is log-triangular between
      ``min_size`` and ``max_size`` of the short image side (12.8 to 128 px at 256 px, mode
      ~40 px); aspect ratio ``w / h`` log-uniform in [1/2, 2] (stars and crosses [0.8, 1.25]).
    * Rotation: free for shapes that stay themselves when rotated; +-15 degrees for rectangle
      and diamond (a square turned 45 degrees would be a diamond) and +-20 for the cross.

Boxes and occlusion
    * Objects are drawn in order, later over earlier. A box is the exact tight box of the
      shape's full pixel mask (``[x, y, w, h]`` in pixel edges, integers): an occluded object
      keeps the box of its whole extent, not of the visible remainder. ``area`` is the box's
      ``w * h``: with amodal boxes the box is what a detector predicts, and COCO's small /
      medium / large bands then split objects by box size whatever their shape.
    * No object is more than ``max_occlusion`` hidden (default 0.6): a placement that would hide
      more of an earlier object is tried elsewhere (20 tries), and the new object is dropped if
      none fits. Dropping the object, rather than only its annotation, leaves no unlabelled
      fragments that would teach the detector to miss real ones. ``visible`` in each
      annotation records the fraction left visible.
    * Objects lie fully inside the image; the first one always fits, so no image is empty.
    * Every object contrasts with what lies under it: each of its colours differs from the mean
      colour beneath by at least ``_MIN_CONTRAST`` (sum of absolute RGB differences).

The trade-off
    The data drives ``nasfpn demo``: a small NAS-FPN RetinaNet trained from scratch on a 2-core
    CPU in minutes must reach AP50 >= 0.8, yet the task should still exercise what a detector
    does (scale, clutter, occlusion, class confusion). So the variety lives where it costs
    little: colour, texture, background, aspect ratio, rotation. What makes a from-scratch
    CPU model fail is kept in check: sizes are log-triangular so about 15% of objects are under
    24 px and 10% over 77 px (at 256 px) rather than a flat spread of tiny ones; the smallest
    is 12 px at 256 px and never under 8 px; shapes are opaque and contrast with their
    surroundings; distractors stay behind the objects and look like no class; occlusion is
    capped. Look-alike pairs are kept apart: the rotation limits above, and crescents thin
    enough (a third to a half of the radius) that none passes for a dented ellipse.

Determinism
    Each image comes from its own generator seeded by ``(seed, split, index)``, so a dataset is
    the same whatever the order or number of workers, and one image can be re-made alone.
    Random draws are integers and uniforms (bit-exact across platforms); the few
    transcendental values (rotation cosines, log-sizes) are scalars rounded to a coarse grid,
    and pixels are computed with + - * / and comparisons only, so pixel values are identical on
    every machine. The PNG bytes are also identical for a given Pillow build (it bundles zlib).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nasfpn.core.fileio import write_json_atomic

SHAPE_NAMES: tuple[str, ...] = (
    "ellipse",
    "rectangle",
    "triangle",
    "star",
    "ring",
    "cross",
    "diamond",
    "crescent",
)
# Non-contiguous on purpose, like COCO's, so the label <-> category id mapping is exercised.
SHAPE_CATEGORY_IDS: tuple[int, ...] = (1, 2, 4, 5, 7, 8, 11, 13)

GENERATOR_VERSION = 2
"""Bumped whenever the same arguments would produce different files."""

_SPLITS = {"train": 0, "val": 1}
# Image ids: train 1, 2, ...; val 1000001, ...: disjoint, so that detections scored against the
# wrong split fail loudly instead of giving a meaningless AP.
_SPLIT_ID_BASE = 1_000_000
_MIN_CONTRAST = 120  # sum over RGB of |colour - mean colour beneath|, in 0..765
_MIN_PIXELS = 8.0  # below this a shape is not recognisable
_PLACEMENT_TRIES = 20
_TEXTURES = ("solid", "gradient", "stripes", "checker", "noise")


@dataclass(frozen=True)
class SyntheticSpec:
    """What the generator draws (see the module docstring)."""

    image_size: tuple[int, int] = (256, 256)
    """(H, W) of every image."""
    num_classes: int = len(SHAPE_NAMES)
    """Use the first this many of ``SHAPE_NAMES``."""
    max_objects: int = 6
    """Objects per image are drawn uniformly from 1..max_objects (fewer when some do not fit)."""
    min_size: float = 0.05
    """Smallest shape side as a fraction of the short image side."""
    max_size: float = 0.5
    """Largest shape side as a fraction of the short image side."""
    max_occlusion: float = 0.6
    """No object is hidden by more than this fraction of its pixels."""
    max_distractors: int = 4

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= len(SHAPE_NAMES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPE_NAMES)}, got {self.num_classes}")
        if min(self.image_size) < 32:
            raise ValueError(f"image_size must be at least 32x32, got {self.image_size}")
        if not 0 < self.min_size <= self.max_size <= 0.7:
            raise ValueError(f"need 0 < min_size <= max_size <= 0.7, got {self.min_size}, {self.max_size}")
        if self.max_objects < 1 or self.max_distractors < 0 or not 0 <= self.max_occlusion < 1:
            raise ValueError("need max_objects >= 1, max_distractors >= 0, 0 <= max_occlusion < 1")

    @property
    def class_names(self) -> tuple[str, ...]:
        return SHAPE_NAMES[: self.num_classes]

    @property
    def category_ids(self) -> tuple[int, ...]:
        return SHAPE_CATEGORY_IDS[: self.num_classes]


@dataclass(frozen=True)
class SyntheticDataset:
    """Where ``generate_dataset`` put things."""

    root: Path
    train_images: Path
    val_images: Path
    train_annotations: Path
    val_annotations: Path
    spec: SyntheticSpec

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.spec.class_names

    @property
    def category_ids(self) -> tuple[int, ...]:
        return self.spec.category_ids


# --------------------------------------------------------------------------- small helpers


def _q(x: float, step: float = 1 / 4096) -> float:
    """Round to a binary grid: a last-bit difference of a libm call cannot reach the pixels."""
    return round(x / step) * step


def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return _q(lo + (hi - lo) * float(rng.random()))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return _q(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * float(rng.random())))


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.float64)


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, (h, 1) and (1, w)."""
    return np.arange(h, dtype=np.float64)[:, None] + 0.5, np.arange(w, dtype=np.float64)[None, :] + 0.5


# --------------------------------------------------------------------------- shapes


def _star_vertices(inner: float) -> list[tuple[float, float]]:
    """Five-pointed star in the unit frame, first tip pointing up."""
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else inner
        a = math.pi * (-0.5 + k / 5)
        pts.append((_q(r * math.cos(a)), _q(r * math.sin(a))))
    return pts


def _inside_polygon(u: np.ndarray, v: np.ndarray, pts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd rule: a ray to +u crosses the boundary an odd number of times."""
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    for (x1, y1), (x2, y2) in zip(pts, [*pts[1:], pts[0]]):
        if y1 == y2:
            continue
        slope = (x2 - x1) / (y2 - y1)
        crosses = ((y1 > v) != (y2 > v)) & (u < x1 + (v - y1) * slope)
        inside ^= crosses
    return inside


def _shape_mask(kind: str, u: np.ndarray, v: np.ndarray, p: float) -> np.ndarray:
    """Membership of points ``(u, v)`` of the shape's unit frame ([-1, 1]^2); ``p`` is the
    shape's own parameter (ring hole, cross arm width, star inner radius, crescent thickness)."""
    r2 = u * u + v * v
    if kind == "ellipse":
        return r2 <= 1.0
    if kind == "ring":
        return (r2 <= 1.0) & (r2 >= p * p)
    if kind == "rectangle":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if kind == "cross":
        au, av = np.abs(u), np.abs(v)
        return ((au <= p) & (av <= 1.0)) | ((av <= p) & (au <= 1.0))
    if kind == "triangle":
        return (v <= 1.0) & (v >= 2.0 * np.abs(u) - 1.0)
    if kind == "star":
        return _inside_polygon(u, v, _star_vertices(p))
    if kind == "crescent":
        # The unit disc minus a disc centred at (0.4, 0) reaching to u = p - 1, so the crescent
        # is p thick at its middle and its horns end near u = 0..0.45: a thin moon, never a
        # dented disc that would pass for an ellipse.
        bite = 1.4 - p
        return (r2 <= 1.0) & ((u - 0.4) * (u - 0.4) + v * v > bite * bite)
    raise ValueError(f"unknown shape {kind!r}")


def _sample_shape(rng: np.random.Generator, kind: str, spec: SyntheticSpec) -> np.ndarray:
    """Draw size, aspect, rotation and parameter of one shape; return its tight mask (h, w)."""
    short = min(spec.image_size)
    lo = max(spec.min_size * short, _MIN_PIXELS)
    hi = max(spec.max_size * short, lo)
    # Log-triangular: the mean of two uniforms in log space; few tiny and few huge objects.
    t = 0.5 * (float(rng.random()) + float(rng.random()))
    side = _q(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * t))
    max_aspect = 1.25 if kind in ("star", "cross") else 2.0
    aspect = _log_uniform(rng, 1 / max_aspect, max_aspect)
    w = _q(side * math.sqrt(aspect))
    h = _q(side / math.sqrt(aspect))
    # Keep the rotated frame inside the image.
    diag = math.sqrt(w * w + h * h)
    if diag > 0.95 * short:
        w, h = _q(w * 0.95 * short / diag), _q(h * 0.95 * short / diag)
    max_turn = {"rectangle": 15.0, "diamond": 15.0, "cross": 20.0}.get(kind, 180.0)
    angle = math.radians(_uniform(rng, -max_turn, max_turn))
    c, s = _q(math.cos(angle)), _q(math.sin(angle))
    param = {
        "ring": (0.45, 0.65),
        "cross": (0.25, 0.4),
        "star": (0.38, 0.5),
        "crescent": (0.35, 0.5),
    }.get(kind, (0.0, 0.0))
    p = _uniform(rng, *param)

    # Evaluate on a window holding the rotated frame; the centre sits at a random sub-pixel offset.
    half = math.ceil(0.5 * math.sqrt(w * w + h * h)) + 1
    ys, xs = _pixel_grid(2 * half + 1, 2 * half + 1)
    cy = half + _q(float(rng.random()), 1 / 16)
    cx = half + _q(float(rng.random()), 1 / 16)
    dx, dy = xs - cx, ys - cy
    u = (dx * c + dy * s) / (w / 2)
    v = (dy * c - dx * s) / (h / 2)
    mask = _shape_mask(kind, u, v, p)
    # Every shape covers pixels here: its frame is at least 8 x 5.6 px and holds the unit frame.
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


# --------------------------------------------------------------------------- colours and textures


def _contrasting_colour(rng: np.random.Generator, beneath: np.ndarray) -> np.ndarray:
    """A random colour at least ``_MIN_CONTRAST`` away from ``beneath``."""
    for _ in range(30):
        c = _colour(rng)
        if np.abs(c - beneath).sum() >= _MIN_CONTRAST:
            return c
    # Rarely reached: the opposite corner of the RGB cube is always far enough.
    return np.where(beneath < 128, 255.0, 0.0)


def _texture(rng: np.random.Generator, h: int, w: int, beneath: np.ndarray) -> np.ndarray:
    """(h, w, 3) float fill of an object, every colour in it contrasting with ``beneath``."""
    kind = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    c0 = _contrasting_colour(rng, beneath)
    ys, xs = _pixel_grid(h, w)
    if kind == "solid":
        return np.broadcast_to(c0, (h, w, 3)).copy()
    if kind == "noise":
        # Noise around c0, small enough to keep contrast on average.
        noise = rng.integers(-30, 31, size=(h, w, 3)).astype(np.float64)
        return np.clip(c0 + noise, 0.0, 255.0)
    c1 = _contrasting_colour(rng, beneath)
    if kind == "gradient":
        a = math.radians(_uniform(rng, 0.0, 360.0))
        c, s = _q(math.cos(a)), _q(math.sin(a))
        t = xs * c + ys * s
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        return c0 + (c1 - c0) * t[:, :, None]
    if kind == "stripes":
        a = math.radians(_uniform(rng, 0.0, 180.0))
        c, s = _q(math.cos(a)), _q(math.sin(a))
        half_period = float(rng.integers(2, 6))
        band = np.floor((xs * c + ys * s) / half_period).astype(np.int64) % 2
    else:  # checker
        cell = float(rng.integers(3, 9))
        band = (np.floor(xs / cell).astype(np.int64) + np.floor(ys / cell).astype(np.int64)) % 2
    return np.where(band[:, :, None] == 0, c0, c1)


# --------------------------------------------------------------------------- background and clutter


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w, 3) float: gradient + blotches + noise."""
    ys, xs = _pixel_grid(h, w)
    c0, c1 = _colour(rng), _colour(rng)
    a = math.radians(_uniform(rng, 0.0, 360.0))
    c, s = _q(math.cos(a)), _q(math.sin(a))
    t = xs * c + ys * s
    t = (t - t.min()) / float(t.max() - t.min())
    img = c0 + (c1 - c0) * t[:, :, None]

    # Low-frequency blotches: a coarse random grid, bilinearly upsampled (rows, then columns).
    gh, gw = int(rng.integers(3, 7)), int(rng.integers(3, 7))
    grid = rng.integers(-40, 41, size=(gh, gw, 3)).astype(np.float64)
    gy = ys[:, 0] / h * (gh - 1)
    gx = xs[0, :] / w * (gw - 1)
    y0, x0 = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    fy, fx = (gy - y0)[:, None, None], (gx - x0)[None, :, None]
    rows = grid[y0] * (1 - fy) + grid[y1] * fy  # (h, gw, 3)
    img += rows[:, x0] * (1 - fx) + rows[:, x1] * fx

    amplitude = int(rng.integers(0, 13))
    if amplitude:
        img += rng.integers(-amplitude, amplitude + 1, size=(h, w, 3))
    return np.clip(img, 0.0, 255.0, out=img)


def _distractors(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Draw ``count`` unannotated distractors into ``img`` in place.

    None has the crisp closed outline of an object: polylines are open and thin, blobs have
    soft edges, confetti is smaller than any object.
    """
    h, w = img.shape[:2]
    ys, xs = _pixel_grid(h, w)
    for _ in range(count):
        kind = int(rng.integers(3))
        colour = _colour(rng)
        if kind == 0:  # open polyline of 1-4 segments, 1-3 px wide
            half_width = 0.5 * float(rng.integers(1, 4))
            ax, ay = _uniform(rng, 0.0, float(w)), _uniform(rng, 0.0, float(h))
            mask = np.zeros((h, w), dtype=bool)
            for _ in range(int(rng.integers(1, 5))):
                bx, by = _uniform(rng, 0.0, float(w)), _uniform(rng, 0.0, float(h))
                ex, ey = bx - ax, by - ay
                length2 = max(ex * ex + ey * ey, 1.0)
                t = np.clip(((xs - ax) * ex + (ys - ay) * ey) / length2, 0.0, 1.0)
                px, py = xs - (ax + t * ex), ys - (ay + t * ey)
                mask |= px * px + py * py <= half_width * half_width
                ax, ay = bx, by
            img[mask] = colour
        elif kind == 1:  # soft blob: opacity falls off smoothly to zero at its rim
            cx, cy = _uniform(rng, 0.0, float(w)), _uniform(rng, 0.0, float(h))
            rx, ry = _uniform(rng, 0.04, 0.2) * w, _uniform(rng, 0.04, 0.2) * h
            bx, by = (xs - cx) / rx, (ys - cy) / ry
            d2 = bx * bx + by * by
            alpha = (_uniform(rng, 0.3, 0.7) * np.clip(1.0 - d2, 0.0, 1.0))[:, :, None]
            img *= 1.0 - alpha
            img += colour * alpha
        else:  # confetti: tiny squares of random colours
            n = int(rng.integers(10, 41))
            left = rng.integers(0, w - 3, size=n)
            top = rng.integers(0, h - 3, size=n)
            sizes = rng.integers(2, 4, size=n)
            colours = rng.integers(0, 256, size=(n, 3)).astype(np.float64)
            for x, y, s, c in zip(left, top, sizes, colours):
                img[y : y + s, x : x + s] = c


# --------------------------------------------------------------------------- one image


def render_image(spec: SyntheticSpec, seed: int, split: str, index: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Image ``index`` of ``split``: uint8 ``(H, W, 3)`` RGB and its objects.

    Each object is ``{"label": int (index into spec.class_names), "bbox": [x, y, w, h] (ints),
    "area": int (w * h), "visible": float (fraction of its pixels not hidden)}``, in drawing order.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    pixels, _, objects = _render(spec, np.random.default_rng([seed, _SPLITS[split], index]))
    return pixels, objects


def _render(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """``render_image`` plus the (H, W) map of which object is on top of each pixel (-1: none)."""
    h, w = spec.image_size
    img = _background(rng, h, w)
    _distractors(rng, img, int(rng.integers(0, spec.max_distractors + 1)))

    owner = np.full((h, w), -1, dtype=np.int64)  # index of the object on top of each pixel
    labels: list[int] = []
    boxes: list[list[int]] = []
    full_area: list[int] = []
    visible: list[int] = []
    for _ in range(int(rng.integers(1, spec.max_objects + 1))):
        label = int(rng.integers(spec.num_classes))
        mask = _sample_shape(rng, SHAPE_NAMES[label], spec)
        mh, mw = mask.shape
        placed = None
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = int(rng.integers(0, w - mw + 1)), int(rng.integers(0, h - mh + 1))
            under = owner[y0 : y0 + mh, x0 : x0 + mw][mask]
            lost = np.bincount(under + 1, minlength=len(labels) + 1)[1:]
            still = np.asarray(visible, dtype=np.int64) - lost
            if np.all(still >= (1.0 - spec.max_occlusion) * np.asarray(full_area, dtype=np.float64)):
                placed = (x0, y0, still)
                break
        if placed is None:
            continue
        x0, y0, still = placed
        window = img[y0 : y0 + mh, x0 : x0 + mw]
        # Integer mean: exact, so the colour choice is the same on every machine.
        beneath = np.rint(window[mask]).astype(np.int64).sum(axis=0) // int(mask.sum())
        fill = _texture(rng, mh, mw, beneath.astype(np.float64))
        window[mask] = fill[mask]
        owner[y0 : y0 + mh, x0 : x0 + mw][mask] = len(labels)
        visible = [int(v) for v in still] + [int(mask.sum())]
        labels.append(label)
        boxes.append([x0, y0, mw, mh])
        full_area.append(int(mask.sum()))

    objects = [
        {"label": lab, "bbox": box, "area": box[2] * box[3], "visible": round(vis / full, 3)}
        for lab, box, full, vis in zip(labels, boxes, full_area, visible)
    ]
    return np.rint(img).astype(np.uint8), owner, objects


# --------------------------------------------------------------------------- writing a dataset


def _render_and_save(args: tuple[SyntheticSpec, int, str, int, str]) -> list[dict[str, Any]]:
    spec, seed, split, index, path = args
    pixels, objects = render_image(spec, seed, split, index)
    Image.fromarray(pixels).save(path, format="PNG", compress_level=1)
    return objects


def _generate_split(
    spec: SyntheticSpec, seed: int, split: str, num: int, image_dir: Path, ann_path: Path, workers: int
) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(spec, seed, split, i, str(image_dir / f"{i + 1:06d}.png")) for i in range(num)]
    # Images left from an earlier, larger run would sit unannotated next to the new ones.
    names = {Path(job[4]).name for job in jobs}
    for old in image_dir.glob("*.png"):
        if old.stem.isdigit() and old.name not in names:
            old.unlink()
    if workers > 1 and num > 1:
        # Each image has its own seed, so the output does not depend on the worker count.
        # fork where there is one: spawn would re-import a __main__ that may not be a file.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
            per_image = list(pool.map(_render_and_save, jobs, chunksize=max(1, num // (4 * workers))))
    else:
        per_image = [_render_and_save(job) for job in jobs]

    h, w = spec.image_size
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i, objects in enumerate(per_image):
        image_id = _SPLITS[split] * _SPLIT_ID_BASE + i + 1
        images.append({"id": image_id, "file_name": f"{i + 1:06d}.png", "width": w, "height": h})
        for obj in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": spec.category_ids[obj["label"]],
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                    "visible": obj["visible"],
                }
            )
    categories = [
        {"id": cid, "name": name, "supercategory": "shape"} for cid, name in zip(spec.category_ids, spec.class_names)
    ]
    write_json_atomic({"images": images, "annotations": annotations, "categories": categories}, ann_path, indent=None)


def generate_dataset(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    image_size: int | tuple[int, int] = 256,
    seed: int = 0,
    num_classes: int = len(SHAPE_NAMES),
    max_objects: int = 6,
    workers: int = 1,
    overwrite: bool = False,
    min_size: float = SyntheticSpec.min_size,
) -> SyntheticDataset:
    """Write a synthetic COCO-format dataset under ``out_dir`` (layout in the module docstring).

    ``image_size``: an int (square) or ``(H, W)``. The same arguments always give the same
    pixels and annotations; if ``out_dir`` already holds exactly this dataset it is returned
    without work unless ``overwrite``. ``workers > 1`` renders in that many processes
    (the files do not depend on it).
    """
    if not (0 <= num_train < _SPLIT_ID_BASE and 0 <= num_val < _SPLIT_ID_BASE):
        raise ValueError(f"image counts must be in 0..{_SPLIT_ID_BASE - 1}, got {num_train}, {num_val}")
    size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    spec = SyntheticSpec(image_size=size, num_classes=num_classes, max_objects=max_objects, min_size=min_size)
    root = Path(out_dir)
    result = SyntheticDataset(
        root=root,
        train_images=root / "train",
        val_images=root / "val",
        train_annotations=root / "annotations" / "instances_train.json",
        val_annotations=root / "annotations" / "instances_val.json",
        spec=spec,
    )
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "spec": {**asdict(spec), "image_size": list(spec.image_size)},
    }
    manifest_path = root / "synthetic.json"
    complete = manifest_path.is_file() and result.train_annotations.is_file() and result.val_annotations.is_file()
    if complete and not overwrite:
        try:
            if json.loads(manifest_path.read_text()) == manifest:
                return result
        except json.JSONDecodeError:
            pass  # a damaged manifest: regenerate

    manifest_path.unlink(missing_ok=True)  # written last: its presence means "complete"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    _generate_split(spec, seed, "train", num_train, result.train_images, result.train_annotations, workers)
    _generate_split(spec, seed, "val", num_val, result.val_images, result.val_annotations, workers)
    write_json_atomic(manifest, manifest_path, indent=None)
    return result


def dataset_stats(annotations: str | Path | dict[str, Any]) -> dict[str, Any]:
    """Summary of a COCO box annotation file: images, objects per image, box sizes, classes.

    Box side is ``sqrt(w * h)``; the size bands are COCO's (area < 32^2, < 96^2, larger).
    """
    data = json.loads(Path(annotations).read_text()) if isinstance(annotations, (str, Path)) else annotations
    anns = data["annotations"]
    per_image = Counter(a["image_id"] for a in anns)
    counts = np.array([per_image[img["id"]] for img in data["images"]], dtype=np.int64)
    sides = np.array([math.sqrt(a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float64)
    areas = np.array([a["area"] for a in anns], dtype=np.float64)
    names = {c["id"]: c["name"] for c in data["categories"]}
    per_class = dict.fromkeys(names.values(), 0)
    for a in anns:
        per_class[names[a["category_id"]]] += 1
    visible = np.array([a.get("visible", 1.0) for a in anns], dtype=np.float64)
    n = max(len(anns), 1)

    def stat(values: np.ndarray, fn: Any) -> float:
        return float(fn(values)) if values.size else 0.0

    return {
        "images": len(data["images"]),
        "objects": len(anns),
        "objects_per_image": {
            "min": int(stat(counts, np.min)),
            "mean": stat(counts, np.mean),
            "max": int(stat(counts, np.max)),
            "histogram": {k: int(v) for k, v in enumerate(np.bincount(counts)) if v},
        },
        "box_side_px": {
            "min": stat(sides, np.min),
            "p10": stat(sides, lambda x: np.percentile(x, 10)),
            "median": stat(sides, np.median),
            "p90": stat(sides, lambda x: np.percentile(x, 90)),
            "max": stat(sides, np.max),
        },
        "coco_area_fraction": {
            "small": float((areas < 32**2).sum() / n),
            "medium": float(((areas >= 32**2) & (areas < 96**2)).sum() / n),
            "large": float((areas >= 96**2).sum() / n),
        },
        "occluded_fraction": float((visible < 1.0).sum() / n),
        "min_visible": float(visible.min()) if visible.size else 1.0,
        "per_class": per_class,
    }
