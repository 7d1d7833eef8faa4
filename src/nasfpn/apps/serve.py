"""HTTP serving of a detector: a FastAPI app that batches concurrent requests.

    nasfpn serve retinanet_r50_nasfpn_crop640_50e --weights model.safetensors --port 8000
    curl -F file=@street.jpg 'http://localhost:8000/predict?score_thr=0.3'

Endpoints

- ``POST /predict``: multipart form with ``file`` (an image) and optional ``score_thr`` (form
  field or query parameter, in [0, 1]; default: the config's). Returns::

      {"detections": [{"box": [x1, y1, x2, y2], "score", "label", "category_id", "name"}, ...],
       "image": {"width", "height"}, "score_thr", "model",
       "timing": {"decode_ms", "queue_ms", "inference_ms", "total_ms", "batch_size"}}

  Boxes are in original-image pixels, detections by descending score. Errors: 413 for a body
  over ``max_upload_mb`` (checked from Content-Length before reading, and while reading) or an
  image over ``max_pixels``; 415 for a file that is not an image; 400 for an image that cannot
  be decoded; 422 for a missing ``file`` or a bad ``score_thr``.
- ``GET /health``: status, model, backend and batching counters (requests, batches, the
  largest batch so far, a histogram of batch sizes).

Batching: requests wait in an asyncio queue; a collector takes the first one, then whatever
arrives within ``batch_timeout_ms`` up to ``max_batch``, and runs the model once per group of
images that pre-process to the same padded size (so a batched image gets the same detections
as it would alone), in one worker thread. The model runs at the lowest ``score_thr`` of the
batch and each request keeps its detections above its own threshold: greedy NMS decides a box
only from higher-scored boxes, so this equals running at each threshold separately.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nasfpn.data.batching import group_by_shape
from nasfpn.data.io import to_rgb  # the RGB conversion of files read from disk

if TYPE_CHECKING:
    from nasfpn.deploy.predictor import Predictor

try:
    from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
    from fastapi.concurrency import run_in_threadpool
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError("serving needs FastAPI and uvicorn: pip install 'nasfpn[serve]'") from e


@dataclass(frozen=True)
class ServeSettings:
    max_batch: int = 8
    """Most images in one model call."""
    batch_timeout_ms: float = 10.0
    """How long the first request of a batch waits for others."""
    max_upload_mb: float = 20.0
    """Largest accepted request body."""
    max_pixels: int = 40_000_000
    """Largest accepted image (width x height), checked from the header before decoding."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batch_timeout_ms < 0:
            raise ValueError(f"batch_timeout_ms must be >= 0, got {self.batch_timeout_ms}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ImageRejected(Exception):
    """An upload that is not a usable image: ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> uint8 ``(H, W, 3)`` RGB, with the conversions of ``nasfpn.data.io.read_image``."""
    if not data:
        raise ImageRejected(400, "the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRejected(413, f"image of {w}x{h} pixels exceeds the limit of {max_pixels:,} pixels")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except UnidentifiedImageError:
        raise ImageRejected(
            415, "the uploaded file is not an image (supported: JPEG, PNG, BMP, GIF, TIFF, WebP)"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageRejected(413, f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected(400, f"cannot decode the image ({type(e).__name__}: {e})") from None


class BodyLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``.

    A declared Content-Length over the limit is refused before any byte is read; otherwise the
    bytes are counted as they arrive and reading stops at the limit (the framework never holds
    more than ``max_bytes`` of the body).
    """

    class _TooLarge(Exception):
        pass

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reply(self, send) -> None:
        body = json.dumps({"detail": f"upload larger than the limit of {self.max_bytes / 2**20:g} MB"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reply(send)
            return
        received = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise BodyLimit._TooLarge()
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if exceeded:
                # The framework turned the interrupted read into an error response: answer 413.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._reply(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyLimit._TooLarge:
            if not started:
                await self._reply(send)


@dataclass
class _Job:
    image: np.ndarray
    score_thr: float
    key: tuple[int, int]
    future: asyncio.Future
    queued: float
    batch_size: int = 0
    inference_s: float = 0.0


class Batcher:
    """Collects queued requests into batches and runs the detector on them in one worker thread."""

    def __init__(self, detector: Predictor, settings: ServeSettings) -> None:
        self.detector = detector
        self.settings = settings
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nasfpn-model")
        self.requests = 0
        self.batches = 0
        self.batch_sizes: Counter[int] = Counter()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.executor.shutdown(wait=True, cancel_futures=True)

    def input_key(self, image: np.ndarray) -> tuple[int, int]:
        """The padded input size ``image`` pre-processes to; images batch together only on equal keys."""
        return self.detector.input_shape(image.shape[0], image.shape[1])

    async def submit(self, image: np.ndarray, score_thr: float) -> _Job:
        loop = asyncio.get_running_loop()
        job = _Job(image, score_thr, self.input_key(image), loop.create_future(), time.perf_counter())
        await self.queue.put(job)
        await job.future
        return job

    async def _collect_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.settings.batch_timeout_ms / 1000
            while len(batch) < self.settings.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            live = [job for job in batch if not job.future.done()]  # skip requests whose client left
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self._run, live)
            except Exception as e:  # the model failed: every request of the batch gets the error
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            for job, result in zip(live, results):
                if not job.future.done():
                    job.future.set_result(result)

    def _run(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        """Model calls for one batch (worker thread): one per input size, at the lowest threshold."""
        self.requests += len(jobs)
        self.batches += 1
        self.batch_sizes[len(jobs)] += 1
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        for members in group_by_shape([job.key for job in jobs], len(jobs)):
            t0 = time.perf_counter()
            thr = min(jobs[i].score_thr for i in members)
            dets = self.detector.predict([jobs[i].image for i in members], score_thr=thr, batch_size=len(members))
            seconds = time.perf_counter() - t0
            for i, det in zip(members, dets):
                keep = det["scores"] > jobs[i].score_thr
                results[i] = {k: v[keep] for k, v in det.items()}
                jobs[i].batch_size = len(members)
                jobs[i].inference_s = seconds
        done = [r for r in results if r is not None]
        assert len(done) == len(jobs)  # group_by_shape puts every job in exactly one group
        return done

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "max_batch_seen": max(self.batch_sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "queued": self.queue.qsize(),
        }


def create_app(detector: Predictor, settings: ServeSettings | None = None, model_name: str | None = None):
    """The FastAPI app serving ``detector`` (a ``Predictor``: ``Detector`` or ``OnnxDetector``)."""
    settings = settings or ServeSettings()
    batcher = Batcher(detector, settings)
    name = model_name or detector.config.name
    backend = "onnxruntime" if hasattr(detector, "session") else "pytorch"
    default_thr = float(detector.config.model.test.score_thr)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="nasfpn detector", lifespan=lifespan)
    app.state.batcher = batcher

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "backend": backend,
            "classes": len(detector.class_names),
            "max_batch": settings.max_batch,
            "batch_timeout_ms": settings.batch_timeout_ms,
            "max_upload_mb": settings.max_upload_mb,
            **batcher.stats(),
        }

    @app.post("/predict")
    async def predict(
        file: Annotated[UploadFile, File(description="an image file")],
        score_thr: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
        score_thr_query: Annotated[float | None, Query(alias="score_thr", ge=0.0, le=1.0)] = None,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        data = await file.read()
        try:
            image = await run_in_threadpool(decode_image, data, settings.max_pixels)
        except ImageRejected as e:
            raise HTTPException(status_code=e.status, detail=f"{file.filename or 'upload'}: {e.message}") from None
        thr = score_thr if score_thr is not None else score_thr_query if score_thr_query is not None else default_thr
        t1 = time.perf_counter()
        try:
            job = await batcher.submit(image, thr)
        except Exception as e:
            raise HTTPException(status_code=500, detail=f"inference failed: {type(e).__name__}: {e}") from None
        det = job.future.result()
        t2 = time.perf_counter()
        detections = [
            {
                "box": [round(float(v), 3) for v in box],
                "score": round(float(score), 5),
                "label": int(label),
                "category_id": int(cat),
                "name": detector.class_names[int(label)],
            }
            for box, score, label, cat in zip(det["boxes"], det["scores"], det["labels"], det["category_ids"])
        ]
        return {
            "detections": detections,
            "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
            "score_thr": thr,
            "model": name,
            "timing": {
                "decode_ms": round((t1 - t0) * 1000, 2),
                "queue_ms": round(max(0.0, (t2 - t1) - job.inference_s) * 1000, 2),
                "inference_ms": round(job.inference_s * 1000, 2),
                "total_ms": round((t2 - t0) * 1000, 2),
                "batch_size": job.batch_size,
            },
        }

    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)
    return app


def run_server(
    detector: Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``detector`` over HTTP until interrupted."""
    import uvicorn

    app = create_app(detector, settings, model_name)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
