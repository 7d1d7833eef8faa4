"""Reading images from disk as RGB uint8 arrays, and expanding image sources into file lists.

Every decoded image goes through ``read_image``, so training, evaluation and prediction see the
same pixels: EXIF orientation applied (boxes are drawn on what viewers show), alpha dropped,
grayscale and CMYK converted to RGB, 16-bit samples reduced to 8 bits. 16-bit grayscale maps
0..65535 onto 0..255 as ``round(v / 257)``; 16-bit RGB PNGs are reduced by PIL's decoder itself,
which keeps the high byte (``v >> 8``, at most 1 below ``round(v / 257)``).
"""

from __future__ import annotations

import gc
import glob
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})

EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5..8 rotate by 90 or 270 degrees: width and height swap.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class JSONLimitError(json.JSONDecodeError):
    """JSON that Python refuses to parse: nested too deeply, or an integer of too many digits."""

    def __init__(self, msg: str) -> None:
        ValueError.__init__(self, msg)  # no "line 1 column 1": the limit is not at a position
        self.msg, self.doc, self.pos, self.lineno, self.colno = msg, "", 0, 1, 1

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.msg,)


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; raises ``OSError`` / ``json.JSONDecodeError`` / ``UnicodeDecodeError``.

    The garbage collector is paused while parsing: a COCO train2017 file creates millions of
    containers, and the collector's repeated passes over them make parsing about 1.5x slower.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except RecursionError:
        raise JSONLimitError("nested too deeply for the JSON parser") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError as e:  # Python's limit on the digits of an integer (4300 by default)
        raise JSONLimitError(str(e).split(";")[0]) from None
    finally:
        if enabled:
            gc.enable()


class ImageReadError(ValueError):
    """An image file is missing, truncated, corrupt or not an image; the message names the file."""


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 ``(H, W, 3)`` RGB; alpha is dropped, not composited."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (PIL reads 16-bit gray PNG/TIFF as I;16 or I): map the full 0..65535
        # range onto 0..255 with rounding (v / 257), so white stays white and black stays black.
        gray = np.asarray(img).astype(np.float64)
        gray = np.rint(np.clip(gray, 0, 65535) / 257.0).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        # Float images carry no standard range; assume 0..255 like an 8-bit image.
        gray = np.rint(np.clip(np.asarray(img, dtype=np.float64), 0, 255)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode in ("P", "PA") or (mode == "L" and "transparency" in img.info):
        # Through RGBA so that palette transparency is resolved (and PIL does not warn about it).
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, LA, RGBA, CMYK, YCbCr, 1, ...: PIL's standard conversions
    return np.asarray(img, dtype=np.uint8).copy()


def read_image(path: str | Path) -> np.ndarray:
    """Decode ``path`` to a uint8 ``(H, W, 3)`` RGB array with EXIF orientation applied.

    Raises ``ImageReadError`` naming the file for a missing, truncated, corrupt or non-image file.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            # load() raises on truncated data (PIL's LOAD_TRUNCATED_IMAGES is left False on
            # purpose: a half-grey image would train silently on wrong pixels).
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file (PIL cannot identify it)") from None
    except MemoryError:
        raise
    except Exception as e:
        # PIL raises OSError for truncated data, SyntaxError/ValueError for broken headers, and
        # struct.error and others from malformed EXIF blocks: all mean "this file is unusable".
        raise ImageReadError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` as ``read_image`` would return it, from the file header only (no decoding).

    Raises ``ImageReadError`` if the file is missing or its header is not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.format == "PNG":
                # PngImageFile.getexif() decodes the whole image when EXIF is not in the header.
                raw = img.info.get("exif")
                exif = Image.Exif()
                if raw:
                    exif.load(raw)
            else:
                exif = img.getexif()
            orientation = exif.get(EXIF_ORIENTATION_TAG, 1)
    except UnidentifiedImageError:
        raise ImageReadError(f"{path}: not an image file (PIL cannot identify it)") from None
    except MemoryError:
        raise
    except Exception as e:  # same reasons as in read_image
        raise ImageReadError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from None
    return (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def list_images(sources: list[str] | list[Path]) -> list[Path]:
    """Expand files, folders and glob patterns into image paths, in source order, without duplicates.

    A file is taken as given; a folder contributes its image files (by extension, sorted, not
    recursive); a glob pattern (``*``, ``?``, ``[``; ``**`` recurses) contributes its matching image
    files, sorted. A source that matches nothing raises ``FileNotFoundError`` naming it.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    for source in sources:
        text = str(source)
        path = Path(text).expanduser()
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_image_file(p))
            if not found:
                exts = ", ".join(sorted(IMAGE_EXTENSIONS))
                raise FileNotFoundError(f"folder {text!r} holds no image files ({exts})")
        elif any(c in text for c in "*?["):
            found = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if _is_image_file(p))
            if not found:
                raise FileNotFoundError(f"pattern {text!r} matches no image files")
        else:
            raise FileNotFoundError(f"image source {text!r}: no such file or folder")
        for p in found:
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out
