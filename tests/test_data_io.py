"""Image decoding (modes, 16-bit, EXIF orientation, broken files) and image source expansion."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from nasfpn.data.io import ImageReadError, image_size, list_images, read_image


def _rgb(h: int = 20, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], gray)


def test_alpha_is_dropped_not_composited(tmp_path):
    rgb = _rgb()
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=2)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)

    gray = rgb[:, :, 0]
    Image.fromarray(np.stack([gray, np.full_like(gray, 7)], axis=2), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[:, :, 1], gray)


def test_palette_with_transparency(tmp_path):
    pal = Image.fromarray(_rgb()).convert("P")
    pal.save(tmp_path / "p.png", transparency=0)
    expected = np.asarray(pal.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when palette transparency is converted carelessly
        out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out, expected)


def test_16bit_png_uses_full_range(tmp_path):
    values = np.array([[0, 257, 32896, 65535, 128, 129]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    # round(v / 257): 128/257 = 0.498 -> 0, 129/257 = 0.502 -> 1
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255, 0, 1])
    assert (out[:, :, 0] == out[:, :, 2]).all()


def _write_png_rgb16(path, array: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16bit_rgb_png(tmp_path):
    values = np.array([[[0, 257, 65535], [32896, 65280, 300]]], dtype=np.uint16)
    _write_png_rgb16(tmp_path / "rgb16.png", values)
    out = read_image(tmp_path / "rgb16.png")
    assert out.dtype == np.uint8 and out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out, values >> 8)  # PIL keeps the high byte


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (20, 30, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 50  # pure red in CMYK


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:10, :10] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "r.jpg")
    assert out.shape == (60, 40, 3)
    assert image_size(tmp_path / "r.jpg") == (60, 40)
    # After a clockwise quarter turn the stored top-left corner is at the top-right.
    assert out[:8, -8:, 0].mean() > 200 and out[:8, :8, 0].mean() < 50


def test_broken_files_raise_naming_the_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"missing\.jpg"):
        read_image(tmp_path / "missing.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"text\.jpg"):
        read_image(tmp_path / "text.jpg")
    Image.fromarray(_rgb(200, 200)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")
    assert issubclass(ImageReadError, ValueError)


def test_list_images_files_folders_globs(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jpg").write_bytes(b"x")
    assert list_images([str(tmp_path)]) == [tmp_path / "a.PNG", tmp_path / "b.jpg"]
    assert list_images([str(tmp_path / "**" / "*.jpg")]) == [tmp_path / "b.jpg", tmp_path / "sub" / "d.jpg"]
    # Explicit files are taken as given, duplicates are dropped, source order is kept.
    assert list_images([str(tmp_path / "c.txt"), str(tmp_path / "b.jpg"), str(tmp_path)]) == [
        tmp_path / "c.txt",
        tmp_path / "b.jpg",
        tmp_path / "a.PNG",
    ]
    with pytest.raises(FileNotFoundError, match=r"nothing\.jpg"):
        list_images([str(tmp_path / "nothing.jpg")])
    with pytest.raises(FileNotFoundError, match=r"\*.gif"):
        list_images([str(tmp_path / "*.gif")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        list_images([str(tmp_path / "empty")])
