"""Detect objects with an exported nasfpn ONNX file (end2end contract), using only onnxruntime,
numpy and Pillow: an independent client written from docs/deployment.md.

    python examples/onnx_client.py model.onnx photo.jpg [more.jpg ...] [--score-thr 0.3] [--json out.json]

Prints one line per detection (file, class, score, box in original pixels) or writes JSON records
``{"file_name", "bbox": [x, y, w, h], "score", "category_id", "category_name"}`` like
``nasfpn predict``'s predictions.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps


def read_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB with the EXIF orientation applied (what image viewers show)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resized_size(height: int, width: int, image_size: int) -> tuple[int, int]:
    """Keep-ratio resize to fit image_size x image_size; each side is int(side * factor + 0.5), at least 1."""
    factor = min(image_size / max(height, width), image_size / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def _source_index(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each output pixel: the two input pixels and their weights (half-pixel centres, float32)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = src.astype(np.int64)  # floor, src >= 0
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = src - i0.astype(np.float32)
    return i0, i1, np.float32(1.0) - w1, w1


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize without antialiasing, computed in float32 and rounded half up to uint8."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    y0, y1, wy0, wy1 = _source_index(h, height)
    x0, x1, wx0, wx1 = _source_index(w, width)
    f = image.astype(np.float32)
    wx0, wx1 = wx0[None, :, None], wx1[None, :, None]
    top = f[y0][:, x0] * wx0 + f[y0][:, x1] * wx1
    bottom = f[y1][:, x0] * wx0 + f[y1][:, x1] * wx1
    out = top * wy0[:, None, None] + bottom * wy1[:, None, None]
    return np.clip(np.floor(out + np.float32(0.5)), 0, 255).astype(np.uint8)


class Client:
    """One end2end ONNX file: its metadata, pre-processing and session."""

    def __init__(self, onnx_path: str) -> None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the optional score_thr input is reported at every load
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        meta = json.loads(self.session.get_modelmeta().custom_metadata_map["nasfpn"])
        if meta["contract"] != "end2end":
            raise SystemExit(f"{onnx_path}: this client reads end2end files, not {meta['contract']!r}")
        self.meta = meta
        self.mean = np.asarray(meta["mean"], dtype=np.float32)
        self.std = np.asarray(meta["std"], dtype=np.float32)

    def input_shape(self, h: int, w: int) -> tuple[int, int]:
        """Padded input (H, W) for a resized image of h x w."""
        if self.meta["input_hw"] is not None:
            return tuple(self.meta["input_hw"])
        d, least = self.meta["pad_divisor"], self.meta["min_side"]
        return max(math.ceil(h / d) * d, least), max(math.ceil(w / d) * d, least)

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images (1, 3, H, W) float32, image_info (1, 4) float32) for one RGB image."""
        h, w = rgb.shape[:2]
        new_h, new_w = resized_size(h, w, self.meta["image_size"])
        resized = resize_bilinear(rgb, new_h, new_w)
        normalised = (resized.astype(np.float32) - self.mean) / self.std
        pad_h, pad_w = self.input_shape(new_h, new_w)
        images = np.zeros((1, 3, pad_h, pad_w), dtype=np.float32)
        images[0, :, :new_h, :new_w] = normalised.transpose(2, 0, 1)
        info = np.array([[new_h, new_w, new_w / w, new_h / h]], dtype=np.float32)
        return images, info

    def detect(self, rgb: np.ndarray, score_thr: float | None = None) -> list[dict]:
        images, info = self.preprocess(rgb)
        batch = self.meta["batch"]
        if batch is not None and batch > 1:  # a fixed-batch file: fill with blank images
            images = np.concatenate([images, np.zeros((batch - 1, *images.shape[1:]), np.float32)])
            info = np.concatenate([info, np.repeat(info, batch - 1, axis=0)])
        feed = {"images": images, "image_info": info}
        if score_thr is not None:
            feed["score_thr"] = np.array(score_thr, dtype=np.float32)
        boxes, scores, labels, num = self.session.run(None, feed)
        out = []
        for k in range(int(num[0])):
            label = int(labels[0, k])
            out.append(
                {
                    "box": [float(v) for v in boxes[0, k]],
                    "score": float(scores[0, k]),
                    "label": label,
                    "category_id": int(self.meta["category_ids"][label]),
                    "category_name": self.meta["class_names"][label],
                }
            )
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--score-thr", type=float, default=None, help="default: the file's own threshold")
    parser.add_argument("--json", help="write the detections to this file instead of printing them")
    args = parser.parse_args(argv)
    client = Client(args.onnx)
    records = []
    for path in args.images:
        for d in client.detect(read_rgb(path), args.score_thr):
            x1, y1, x2, y2 = d["box"]
            records.append(
                {
                    "file_name": path,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": d["score"],
                    "category_id": d["category_id"],
                    "category_name": d["category_name"],
                }
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f)
    else:
        for r in records:
            x, y, w, h = r["bbox"]
            print(f"{r['file_name']}\t{r['category_name']}\t{r['score']:.3f}\t{x:.1f} {y:.1f} {x + w:.1f} {y + h:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
