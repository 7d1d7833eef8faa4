"""A real annotated dataset for search studies: NEON tree crowns from the ``deepforest`` wheel.

    python benchmarks/trees_dataset.py --out runs/trees            # pip-downloads deepforest 2.1.0
    python benchmarks/trees_dataset.py --out runs/trees --wheel deepforest-2.1.0-py3-none-any.whl

The ``deepforest`` package (MIT; imagery: NEON airborne RGB, 10 cm per pixel, open data) ships two
large, fully annotated aerial crops from Yellowstone (site YELL): 2299 x 2472 px with 574 tree
boxes and 1249 x 1035 px with 279, Pascal VOC files, one class "Tree", boxes of 8-106 px. Written
here as COCO folders of square tiles at the native resolution (``--tile`` px):

- ``train``: the upper band of the large crop, tiles every ``--stride`` px;
- ``heldout``: the band below it, ``--heldout-frac`` of the crop's height (the search's rewards:
  a separate band of the ground, so no tile shares pixels with a training tile);
- ``val``: untouched until the end of a search. With ``--val-frac F``, the bottom band of the large
  crop, ``F`` of its height (the same stand as the training band), and the other crop is written
  as ``other`` (another stand, for the domain gap); without it, the other crop.

Evaluation tiles (``heldout``, ``val``, ``other``) are cut every ``--eval-stride`` px (default: the
tile, no overlap); a smaller stride shows every tree in several tiles, at other positions and cut
by other borders, so an AP over them depends less on a few boxes.
A box is kept in a tile when at least ``--min-visible`` of its area lies inside (clipped to the
tile); tiles without a box are dropped from ``train``, kept in ``heldout`` and ``val``. Layout:
``annotations/instances_{split}.json`` + ``{split}/`` (``nasfpn search --data OUT
--heldout-ann OUT/annotations/instances_heldout.json --heldout-images OUT/heldout
--val-split val``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from nasfpn.data.voc import read_voc_objects

WHEEL = "deepforest==2.1.0"
TRAIN_CROP = "2019_YELL_2_528000_4978000_image_crop2"
VAL_CROP = "2019_YELL_2_541000_4977000_image_crop"


def read_voc_boxes(xml_path: Path) -> np.ndarray:
    """``(N, 4)`` float boxes ``x0, y0, x1, y1`` of a Pascal VOC file (pixel corners as written)."""
    boxes = [box for _, box, _ in read_voc_objects(xml_path, ("Tree",))]
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if (out[:, 2:] <= out[:, :2]).any():
        raise ValueError(f"{xml_path}: a box with an empty extent")
    return out


def tile_origins(length: int, tile: int, stride: int, lo: int = 0, hi: int | None = None) -> list[int]:
    """Tile starts along one axis inside ``[lo, hi)``, every ``stride``, the last one flush with ``hi``."""
    hi = length if hi is None else hi
    if hi - lo < tile:
        return []
    starts = list(range(lo, hi - tile + 1, stride))
    if starts[-1] != hi - tile:
        starts.append(hi - tile)
    return starts


def boxes_in_tile(boxes: np.ndarray, x: int, y: int, tile: int, min_visible: float) -> np.ndarray:
    """The boxes with at least ``min_visible`` of their area inside the tile at ``(x, y)``,
    clipped to it, in tile coordinates."""
    clipped = np.clip(boxes - [x, y, x, y], 0, tile)
    inside = np.prod(np.clip(clipped[:, 2:] - clipped[:, :2], 0, None), axis=1)
    area = np.prod(boxes[:, 2:] - boxes[:, :2], axis=1)
    keep = inside >= min_visible * area
    return clipped[keep & (inside > 0)]


def write_split(
    out: Path,
    split: str,
    image: np.ndarray,
    boxes: np.ndarray,
    origins: list[tuple[int, int]],
    tile: int,
    min_visible: float,
    keep_empty: bool,
    stem: str,
) -> dict[str, int]:
    """Tiles of ``image`` at ``origins`` as ``out/{split}/*.png`` + ``annotations/instances_{split}.json``."""
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for x, y in origins:
        inside = boxes_in_tile(boxes, x, y, tile, min_visible)
        if len(inside) == 0 and not keep_empty:
            continue
        image_id = len(images) + 1
        name = f"{stem}_x{x:04d}_y{y:04d}.png"
        Image.fromarray(image[y : y + tile, x : x + tile]).save(out / split / name)
        images.append({"id": image_id, "file_name": name, "width": tile, "height": tile})
        for x0, y0, x1, y1 in inside.tolist():
            w, h = x1 - x0, y1 - y0
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)],
                    "area": round(w * h, 2),
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"NEON tree crowns (deepforest package), {split} tiles of {tile} px"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "tree"}],
    }
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
    return {"images": len(images), "boxes": len(annotations)}


def data_dir(wheel: str | None, work: Path) -> Path:
    """The ``deepforest/data`` folder: from ``wheel``, else from a wheel pip downloads into ``work``."""
    if wheel is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL, "-d", str(work)],
            check=True,
        )
        wheels = sorted(work.glob("deepforest-*.whl"))
        if not wheels:
            raise SystemExit(f"pip download {WHEEL} gave no wheel in {work}")
        wheel = str(wheels[0])
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.startswith("deepforest/data/")]
        z.extractall(work, names)
    return work / "deepforest" / "data"


def build(
    out: Path,
    source: Path,
    tile: int = 128,
    stride: int = 64,
    heldout_frac: float = 0.3,
    min_visible: float = 0.6,
    val_frac: float = 0.0,
    eval_stride: int = 0,
) -> dict[str, dict[str, int]]:
    """Write the splits (module docstring) from the ``deepforest/data`` folder ``source``."""
    if not 0 < heldout_frac + val_frac < 1 or heldout_frac <= 0 or val_frac < 0:
        raise SystemExit(f"--heldout-frac {heldout_frac} and --val-frac {val_frac} must leave a training band")
    eval_stride = eval_stride or tile
    big = np.asarray(Image.open(source / f"{TRAIN_CROP}.png").convert("RGB"))
    big_boxes = read_voc_boxes(source / f"{TRAIN_CROP}.xml")
    small = np.asarray(Image.open(source / f"{VAL_CROP}.png").convert("RGB"))
    small_boxes = read_voc_boxes(source / f"{VAL_CROP}.xml")
    h, w = big.shape[:2]
    cut = round(h * (1.0 - heldout_frac - val_frac))
    cut_val = round(h * (1.0 - val_frac))

    def band(y0: int, y1: int, step: int) -> list[tuple[int, int]]:
        return [(x, y) for y in tile_origins(h, tile, step, y0, y1) for x in tile_origins(w, tile, step)]

    sh, sw = small.shape[:2]
    other = [(x, y) for y in tile_origins(sh, tile, eval_stride) for x in tile_origins(sw, tile, eval_stride)]
    counts = {
        "train": write_split(out, "train", big, big_boxes, band(0, cut, stride), tile, min_visible, False, "yell528"),
        "heldout": write_split(
            out, "heldout", big, big_boxes, band(cut, cut_val, eval_stride), tile, min_visible, True, "yell528"
        ),
    }
    if val_frac > 0:
        counts["val"] = write_split(
            out, "val", big, big_boxes, band(cut_val, h, eval_stride), tile, min_visible, True, "yell528"
        )
        counts["other"] = write_split(out, "other", small, small_boxes, other, tile, min_visible, True, "yell541")
    else:
        counts["val"] = write_split(out, "val", small, small_boxes, other, tile, min_visible, True, "yell541")
    return counts


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--wheel", help=f"a downloaded deepforest wheel (default: pip download {WHEEL})")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--stride", type=int, default=64, help="training tiles' step (tile: no overlap)")
    p.add_argument("--heldout-frac", type=float, default=0.3, help="band of the large crop held out for rewards")
    p.add_argument("--val-frac", type=float, default=0.0, help="bottom band of the large crop kept as val")
    p.add_argument("--eval-stride", type=int, default=0, help="evaluation tiles' step (default: the tile)")
    p.add_argument("--min-visible", type=float, default=0.6, help="kept box area inside a tile, at least")
    args = p.parse_args(argv)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        counts = build(
            out,
            data_dir(args.wheel, Path(tmp)),
            args.tile,
            args.stride,
            args.heldout_frac,
            args.min_visible,
            args.val_frac,
            args.eval_stride,
        )
    (out / "counts.json").write_text(json.dumps(counts, indent=1))
    for split, c in counts.items():
        print(f"{split}: {c['images']} tiles, {c['boxes']} boxes -> {out / split}")
    return counts


if __name__ == "__main__":
    main()
