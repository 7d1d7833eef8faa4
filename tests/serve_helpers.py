"""The serving tests' tools: a stand-in detector whose model call can be held, and an in-process server.

``StubDetector`` answers instantly with one detection per image computed from its pixels (so a
test can check every answer exactly), records which images the model ran, and blocks each model
call while its ``gate`` is closed: the tests then fill the queue or pass a deadline on purpose.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def solid(height: int, width: int, value: int) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


class StubDetector:
    """A ``Predictor`` without a network (see the module docstring)."""

    class_names = ("circle", "square", "triangle")
    category_ids = (1, 2, 3)

    def __init__(self, image_size: int = 256) -> None:
        self.config = SimpleNamespace(
            name="stub",
            model=SimpleNamespace(test=SimpleNamespace(score_thr=0.05)),
            data=SimpleNamespace(image_size=image_size),
        )
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[list[tuple[int, int]]] = []
        """``(H, W)`` of the images of each model call."""
        self.entered = threading.Event()
        """Set when a model call starts (cleared by the test)."""

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        return (-(-height // 32) * 32, -(-width // 32) * 32)

    def predict(self, images, score_thr=None, batch_size=8):
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("the test never opened the gate")
        self.calls.append([im.shape[:2] for im in images])
        return [self.expected(im) for im in images]

    @staticmethod
    def expected(image: np.ndarray) -> dict[str, np.ndarray]:
        h, w = image.shape[:2]
        mean = float(image.mean())
        return {
            "boxes": np.array([[0.0, 0.0, float(w), float(h)]], dtype=np.float32),
            "scores": np.array([0.5 + 0.4 * mean / 255], dtype=np.float32),
            "labels": np.array([int(mean) % 3]),
            "category_ids": np.array([int(mean) % 3 + 1]),
        }


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread on a free loopback port; yields the base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
