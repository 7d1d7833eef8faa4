"""HTTP serving of a detector: a FastAPI app that batches concurrent requests.

    nasfpn serve retinanet_r50_nasfpn_crop640_50e --weights model.safetensors --port 8000
    curl -F file=@street.jpg 'http://localhost:8000/predict?score_thr=0.3'

Endpoints (``docs/serving.md`` has the details and examples)

- ``POST /predict``: multipart form with ``file`` (an image) and optional ``score_thr`` (form
  field or query parameter, in [0, 1]; default: the config's). Returns::

      {"detections": [{"box": [x1, y1, x2, y2], "score", "label", "category_id", "name"}, ...],
       "image": {"width", "height"}, "score_thr", "model",
       "timing": {"decode_ms", "queue_ms", "inference_ms", "total_ms", "batch_size"}}

  Boxes are in original-image pixels, detections by descending score.
- ``GET /health``: status, model, backend, limits and batching counters.
- ``GET /metrics``: Prometheus text format (requests by endpoint and status, latency and batch
  size histograms, queue depth, requests in flight).
- ``GET /``: a web page to try the model (``/?demo=1`` runs it on the built-in ``/demo.png``).
- ``GET /openapi.json``: the API schema (the interactive docs are off: they load from a CDN).

Every error is JSON ``{"error": NAME, "detail": TEXT}``: 400 ``empty_upload`` /
``undecodable_image`` / ``bad_request``, 401 ``unauthorized``, 404 ``not_found``, 413
``upload_too_large`` (from Content-Length at once, else while reading) / ``image_too_large``
(``max_pixels``, from the header before decoding), 415 ``not_an_image``, 422 ``invalid_request``
(a missing ``file``, a bad ``score_thr``, a body that is not a form), 503
``overloaded`` (with ``Retry-After``), 504 ``deadline_exceeded``; 500 ``inference_failed`` /
``internal_error`` only for a fault of the server, never with a traceback.

Overload: at most ``max_queue`` ``/predict`` requests are in the server at once (being read,
decoded, waiting for a batch or in the model); the next one is refused at once with 503 and a
``Retry-After`` estimated from the recent batch times. Each request has ``timeout_s`` from its
arrival: past it the answer is 504, and work not started yet (decoding, the model) is dropped.

Batching: requests wait in an asyncio queue; a collector takes the first one, then whatever
arrives within ``batch_timeout_ms`` up to ``max_batch``, and runs the model once per group of
images that pre-process to the same padded size (so a batched image gets the same detections
as it would alone), in one worker thread. The model runs at the lowest ``score_thr`` of the
batch and each request keeps its detections above its own threshold: greedy NMS decides a box
only from higher-scored boxes, so this equals running at each threshold separately.

Shutdown: on SIGTERM or SIGINT the server stops accepting connections, answers the requests in
flight and exits with status 0 (a second SIGINT stops at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nasfpn.apps.serve_metrics import CONTENT_TYPE, LATENCY_BUCKETS, CounterVec, Gauge, HistogramVec, render
from nasfpn.apps.serve_page import CONTENT_SECURITY_POLICY, PAGE_HTML
from nasfpn.data.batching import group_by_shape
from nasfpn.data.io import to_rgb  # the RGB conversion of files read from disk

if TYPE_CHECKING:
    from nasfpn.deploy.predictor import Predictor

try:
    import anyio
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as e:  # pragma: no cover - depends on the installed extras
    raise ImportError("serving needs FastAPI and uvicorn: pip install 'nasfpn[serve]'") from e

log = logging.getLogger("uvicorn.error")  # uvicorn configures it: our lines come out with its own

API_KEY_ENV = "NASFPN_API_KEY"
OPEN_PATHS = frozenset({"/", "/health", "/demo.png"})
"""Paths served without the API key: nothing secret or costly behind them."""
ENDPOINTS = ("/", "/demo.png", "/health", "/metrics", "/openapi.json", "/predict")
"""The ``endpoint`` label of the metrics; any other path counts as ``other`` (bounded label values)."""


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
    max_queue: int = 64
    """Most ``/predict`` requests in the server at once (read, decoded, queued or in the model);
    the next one gets 503 with ``Retry-After``."""
    timeout_s: float = 30.0
    """Deadline of one request from its arrival: then 504, and its work not started is dropped."""
    api_key: str | None = field(default=None, repr=False)
    """When set, every endpoint but ``/``, ``/health`` and ``/demo.png`` needs it
    (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``)."""
    decode_threads: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    """Uploads decoded at once: each decoded image can take up to ``3 * max_pixels`` bytes."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.batch_timeout_ms < 0:
            raise ValueError(f"batch_timeout_ms must be >= 0, got {self.batch_timeout_ms}")
        if self.max_upload_mb <= 0:
            raise ValueError(f"max_upload_mb must be > 0, got {self.max_upload_mb}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.decode_threads < 1:
            raise ValueError(f"decode_threads must be >= 1, got {self.decode_threads}")
        if self.api_key is not None and not (
            self.api_key and self.api_key.isascii() and self.api_key.isprintable() and " " not in self.api_key
        ):
            raise ValueError(
                "the API key must be non-empty printable ASCII without spaces (it travels in an HTTP header)"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


class ApiError(Exception):
    """An error answer: HTTP ``status``, a stable ``error`` name and a ``detail`` for people."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


class ImageRejected(ApiError):
    """An upload that is not a usable image."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded bytes -> uint8 ``(H, W, 3)`` RGB, with the conversions of ``nasfpn.data.io.read_image``."""
    if not data:
        raise ImageRejected(400, "empty_upload", "the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageRejected(
                    413, "image_too_large", f"image of {w}x{h} pixels exceeds the limit of {max_pixels:,} pixels"
                )
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected(
            415, "not_an_image", "the uploaded file is not an image (supported: JPEG, PNG, BMP, GIF, TIFF, WebP)"
        ) from None
    except Image.DecompressionBombError as e:
        raise ImageRejected(413, "image_too_large", f"image too large: {e}") from None
    except Exception as e:  # any failure of a decoder on these bytes is a bad file, not a server fault
        raise ImageRejected(400, "undecodable_image", f"cannot decode the image ({type(e).__name__}: {e})") from None


def _error_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


async def _reply(send, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
    """A JSON error answer sent straight to the ASGI server; the connection closes after it (the
    request body may be unread)."""
    body = _error_body(error, detail)
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


@dataclass
class _Job:
    image: np.ndarray
    score_thr: float
    key: tuple[int, int]
    future: asyncio.Future
    queued: float
    deadline: float
    """Event-loop time after which the job is dropped if it has not started."""
    batch_size: int = 0
    inference_s: float = 0.0


class Batcher:
    """Collects queued requests into batches and runs the detector on them in one worker thread."""

    def __init__(self, detector: Predictor, settings: ServeSettings) -> None:
        self.detector = detector
        self.settings = settings
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=settings.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nasfpn-model")
        self.requests = 0
        self.batches = 0
        self.dropped = 0
        self.batch_sizes: Counter[int] = Counter()
        self.batch_seconds = 0.0
        """Moving average of the time one collected batch takes in the model."""
        self.on_model_call: Callable[[int, float], None] | None = None
        """Called on the event loop after each model call with ``(batch_size, seconds)``."""
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self.queue.empty():  # only after a forced stop: nobody waits for these any more
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)

    def input_key(self, image: np.ndarray) -> tuple[int, int]:
        """The padded input size ``image`` pre-processes to; images batch together only on equal keys."""
        return self.detector.input_shape(image.shape[0], image.shape[1])

    async def submit(self, image: np.ndarray, score_thr: float, deadline: float = math.inf) -> _Job:
        """Queue ``image`` and wait for its detections. Cancelling the caller (its deadline) cancels
        the job's future, and the collector then skips the job."""
        loop = asyncio.get_running_loop()
        job = _Job(image, score_thr, self.input_key(image), loop.create_future(), time.perf_counter(), deadline)
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise ApiError(503, "overloaded", "the request queue is full; retry later") from None
        await job.future
        return job

    def _live(self, job: _Job, now: float) -> bool:
        if job.future.done():  # the request timed out or its client left
            self.dropped += 1
            return False
        if now >= job.deadline:
            job.future.cancel()
            self.dropped += 1
            return False
        return True

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
            now = loop.time()
            live = [job for job in batch if self._live(job, now)]
            if not live:
                continue
            t0 = time.perf_counter()
            try:
                results, calls = await loop.run_in_executor(self.executor, self._run, live)
            except Exception as e:  # the model failed: every request of the batch gets the error
                log.exception("inference failed for a batch of %d images", len(live))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            seconds = time.perf_counter() - t0
            self.batch_seconds = seconds if self.batches == 0 else 0.8 * self.batch_seconds + 0.2 * seconds
            self.requests += len(live)
            for size, call_s in calls:
                self.batches += 1
                self.batch_sizes[size] += 1
                if self.on_model_call is not None:
                    self.on_model_call(size, call_s)
            for job, result in zip(live, results):
                if not job.future.done():
                    job.future.set_result(result)

    def _run(self, jobs: list[_Job]) -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
        """Model calls for one batch (worker thread): one per input size, at the lowest threshold.
        Returns the detections per job and ``(images, seconds)`` per model call."""
        results: list[dict[str, Any] | None] = [None] * len(jobs)
        calls = []
        for members in group_by_shape([job.key for job in jobs], len(jobs)):
            t0 = time.perf_counter()
            thr = min(jobs[i].score_thr for i in members)
            dets = self.detector.predict([jobs[i].image for i in members], score_thr=thr, batch_size=len(members))
            seconds = time.perf_counter() - t0
            calls.append((len(members), seconds))
            for i, det in zip(members, dets):
                keep = det["scores"] > jobs[i].score_thr
                results[i] = {k: v[keep] for k, v in det.items()}
                jobs[i].batch_size = len(members)
                jobs[i].inference_s = seconds
        done = [r for r in results if r is not None]
        assert len(done) == len(jobs)  # group_by_shape puts every job in exactly one group
        return done, calls

    def stats(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "max_batch_seen": max(self.batch_sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "queued": self.queue.qsize(),
            "dropped": self.dropped,
        }


class _Runtime:
    """What the middleware and the endpoints share: settings, batcher, metrics, live counters."""

    def __init__(self, detector: Predictor, settings: ServeSettings, name: str, backend: str) -> None:
        self.settings = settings
        self.batcher = Batcher(detector, settings)
        self.in_flight = 0
        """HTTP requests being handled (any endpoint)."""
        self.admitted = 0
        """``/predict`` requests in the server: the number ``max_queue`` bounds."""
        self.signalled_in_flight: int | None = None
        """Requests in flight when the stop signal came (None: no signal yet)."""
        self.answered_after_signal = 0
        self.requests = CounterVec(
            "nasfpn_http_requests_total", "HTTP requests answered, by endpoint and status.", ("endpoint", "status")
        )
        self.latency = HistogramVec(
            "nasfpn_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by endpoint.",
            LATENCY_BUCKETS,
            ("endpoint",),
        )
        sizes = sorted({1, *(2**i for i in range(1, settings.max_batch.bit_length())), settings.max_batch})
        self.batch_size = HistogramVec("nasfpn_batch_size", "Images per model call.", sizes)
        self.inference = HistogramVec(
            "nasfpn_inference_duration_seconds",
            "Time of one model call (a group of equal input size).",
            LATENCY_BUCKETS,
        )

        def observe_call(size: int, seconds: float) -> None:
            self.batch_size.observe(size)
            self.inference.observe(seconds)

        self.batcher.on_model_call = observe_call
        batcher = self.batcher
        self.metrics: list[CounterVec | HistogramVec | Gauge] = [
            Gauge("nasfpn_model_info", "The model served (always 1).", lambda: 1, {"model": name, "backend": backend}),
            self.requests,
            self.latency,
            self.batch_size,
            self.inference,
            Gauge("nasfpn_queue_depth", "Requests waiting for the model.", lambda: batcher.queue.qsize()),
            Gauge("nasfpn_requests_in_flight", "HTTP requests being handled.", lambda: self.in_flight),
            Gauge(
                "nasfpn_predict_admitted",
                "Prediction requests in the server (at most max_queue).",
                lambda: self.admitted,
            ),
            Gauge(
                "nasfpn_predict_max_queue",
                "The limit on prediction requests in the server.",
                lambda: settings.max_queue,
            ),
            Gauge(
                "nasfpn_dropped_jobs_total",
                "Queued images dropped before the model ran them (deadline passed or client gone).",
                lambda: batcher.dropped,
                kind="counter",
            ),
        ]

    def retry_after(self) -> int:
        """Seconds after which the queue now waiting has likely been served (1 to 60)."""
        per_batch = self.batcher.batch_seconds or 0.1
        waves = math.ceil(max(1, self.admitted) / self.settings.max_batch)
        return int(min(60, max(1, math.ceil(waves * per_batch))))


class _Body:
    """A request's ``receive``, noting when the body has been read to its end."""

    DRAIN_SECONDS = 2.0
    DRAIN_IDLE_SECONDS = 0.25
    """A client that sends nothing for this long is not waiting to finish its upload."""

    def __init__(self, receive) -> None:
        self._receive = receive
        self.done = False

    async def receive(self):
        message = await self._receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.done = True
        return message

    async def drain(self, max_bytes: int) -> None:
        """Read and drop the rest of the body (at most ``max_bytes``, ``DRAIN_SECONDS``) before an
        early answer: closing a connection with unread bytes resets it, and a client still
        sending would lose the answer with it."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.DRAIN_SECONDS
        read = 0
        with contextlib.suppress(asyncio.TimeoutError):
            while not self.done and read <= max_bytes and loop.time() < end:
                wait = min(self.DRAIN_IDLE_SECONDS, end - loop.time())
                message = await asyncio.wait_for(self.receive(), wait)
                read += len(message.get("body", b""))


class Gate:
    """ASGI middleware in front of every endpoint: metrics, API key, body size, admission and deadline.

    In order: a request without the API key (where one is set) gets 401; a POST whose declared
    Content-Length exceeds the limit gets 413 before the app sees it, and one whose body grows
    past it while read gets 413 then (the framework never holds more than the limit); a
    ``/predict`` beyond ``max_queue`` gets 503 with ``Retry-After``; one not answered within the
    deadline gets 504 and its pending work is cancelled. Before such an early answer the rest of
    the body is read and dropped, within bounds (``_Body.drain``).
    """

    class _TooLarge(Exception):
        pass

    def __init__(self, app, runtime: _Runtime) -> None:
        self.app = app
        self.rt = runtime
        self.settings = runtime.settings
        self.api_key = runtime.settings.api_key.encode() if runtime.settings.api_key else None
        self.drain_bytes = 4 * runtime.settings.max_upload_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        t0 = time.perf_counter()
        status = 0

        async def send_noting_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]}
            await send(message)

        self.rt.in_flight += 1
        try:
            await self._handle(scope, receive, send_noting_status, path)
        finally:
            self.rt.in_flight -= 1
            self.rt.requests.inc(endpoint, str(status or 500))  # no answer sent: the server failed
            if self.rt.signalled_in_flight is not None and status:
                self.rt.answered_after_signal += 1
            self.rt.latency.observe(time.perf_counter() - t0, endpoint)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        assert self.api_key is not None
        candidates = []
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer":
            candidates.append(token.strip())
        if b"x-api-key" in headers:
            candidates.append(headers[b"x-api-key"].strip())
        ok = False
        for candidate in candidates:  # constant-time comparison: the time taken tells nothing of the key
            ok |= hmac.compare_digest(candidate, self.api_key)
        return ok

    async def _handle(self, scope, receive, send, path: str) -> None:
        headers = dict(scope["headers"])
        body = _Body(receive)
        receive = body.receive
        if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(headers):
            await body.drain(self.drain_bytes)
            await _reply(
                send,
                401,
                "unauthorized",
                "this server needs an API key: send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                {"WWW-Authenticate": 'Bearer realm="nasfpn"'},
            )
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.settings.max_upload_bytes:
            if int(length) <= self.drain_bytes:  # a body too large to drain is refused at once
                await body.drain(self.drain_bytes)
            await self._too_large(send)
            return
        if path != "/predict":
            await self._limited(scope, body, send)
            return
        if self.rt.admitted >= self.settings.max_queue:
            await body.drain(self.drain_bytes)
            await _reply(
                send,
                503,
                "overloaded",
                f"the server is at its limit of {self.settings.max_queue} requests (--max-queue); retry later",
                {"Retry-After": str(self.rt.retry_after())},
            )
            return
        self.rt.admitted += 1
        try:
            await self._with_deadline(scope, body, send)
        finally:
            self.rt.admitted -= 1

    async def _with_deadline(self, scope, body: _Body, send) -> None:
        timeout = self.settings.timeout_s
        # The endpoint gives the deadline to its queued job, so that the collector skips it late.
        scope.setdefault("state", {})["nasfpn_deadline"] = asyncio.get_running_loop().time() + timeout
        started = False

        async def send_noting_start(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await asyncio.wait_for(self._limited(scope, body, send_noting_start), timeout)
        except asyncio.TimeoutError:
            if not started:
                await body.drain(self.drain_bytes)
                await _reply(
                    send,
                    504,
                    "deadline_exceeded",
                    f"no answer within the deadline of {timeout:g} s (--timeout): the server is busy; retry later",
                    {"Retry-After": str(self.rt.retry_after())},
                )

    async def _too_large(self, send) -> None:
        limit = self.settings.max_upload_bytes / 2**20
        await _reply(send, 413, "upload_too_large", f"upload larger than the limit of {limit:g} MB (--max-upload-mb)")

    async def _limited(self, scope, body: _Body, send) -> None:
        """The app with the body counted as it is read."""
        receive = body.receive
        max_bytes = self.settings.max_upload_bytes
        received = 0
        exceeded = False
        started = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    exceeded = True
                    raise Gate._TooLarge()
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if exceeded:
                # The framework turned the interrupted read into an error answer: answer 413 instead.
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await body.drain(self.drain_bytes)
                    await self._too_large(send)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Gate._TooLarge:
            if not started:
                await body.drain(self.drain_bytes)
                await self._too_large(send)


def _status_name(status: int) -> str:
    with contextlib.suppress(ValueError):
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    return "error"


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[dict[str, Any]]]:
    # Built by hand rather than echoing the inputs: those may be bytes that are not UTF-8.
    errors = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query")]
        errors.append({"loc": loc, "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))})
    text = "; ".join(f"{'.'.join(e['loc']) or 'request'}: {e['msg']}" for e in errors) or "invalid request"
    hint = " (send a multipart form with the image as field 'file', e.g. curl -F file=@photo.jpg)"
    return text + (hint if any(e["loc"][:1] == ["file"] for e in errors) else ""), errors


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, where the C library has it (Linux with glibc), else None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


async def _trim_when_idle(runtime: _Runtime, every_s: float = 1.0) -> None:
    """Give freed memory back to the OS once the server is idle after work.

    Decoding and batching allocate and free large buffers from several threads; glibc keeps what
    they freed in per-thread arenas, so without a trim the resident size stays at its peak after
    a burst of requests."""
    trim = _malloc_trim()
    if trim is None:
        return
    seen = -1
    while True:
        await asyncio.sleep(every_s)
        done = runtime.batcher.requests + runtime.batcher.dropped
        if runtime.in_flight == 0 and done != seen:
            seen = done
            await anyio.to_thread.run_sync(trim)


_demo_png: bytes | None = None


def demo_png() -> bytes:
    """The built-in test picture: a synthetic scene (``nasfpn.data.synthetic``), 320x240 PNG."""
    global _demo_png
    if _demo_png is None:
        from nasfpn.data.synthetic import SyntheticSpec, render_image

        image = render_image(SyntheticSpec(image_size=(240, 320), max_objects=8), seed=11, split="val", index=0)[0]
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        _demo_png = buf.getvalue()
    return _demo_png


def create_app(detector: Predictor, settings: ServeSettings | None = None, model_name: str | None = None):
    """The FastAPI app serving ``detector`` (a ``Predictor``: ``Detector`` or ``OnnxDetector``)."""
    settings = settings or ServeSettings()
    name = model_name or detector.config.name
    backend = "onnxruntime" if hasattr(detector, "session") else "pytorch"
    runtime = _Runtime(detector, settings, name, backend)
    batcher = runtime.batcher
    default_thr = float(detector.config.model.test.score_thr)
    limiter: list[anyio.CapacityLimiter] = []  # made on the event loop, at startup

    @asynccontextmanager
    async def lifespan(app):
        limiter.append(anyio.CapacityLimiter(settings.decode_threads))
        batcher.start()
        trimmer = asyncio.get_running_loop().create_task(_trim_when_idle(runtime))
        yield
        trimmer.cancel()
        if runtime.signalled_in_flight is not None:
            log.info(
                "nasfpn serve: stopped: %d requests in flight at the signal, %d answered since",
                runtime.signalled_in_flight,
                runtime.answered_after_signal,
            )
        await batcher.stop()

    # The interactive docs (Swagger UI, ReDoc) load their code from a CDN: off; the schema stays.
    app = FastAPI(title="nasfpn detector", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.runtime = runtime

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _validation_detail(exc)
        return JSONResponse({"error": "invalid_request", "detail": detail, "errors": errors}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = {400: "bad_request"}.get(exc.status_code, _status_name(exc.status_code))
        return JSONResponse({"error": error, "detail": str(exc.detail)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"error": "internal_error", "detail": f"the server failed: {type(exc).__name__}"}, 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})

    @app.get("/demo.png", include_in_schema=False)
    async def demo() -> Response:
        return Response(await anyio.to_thread.run_sync(demo_png), media_type="image/png")

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
            "max_queue": settings.max_queue,
            "timeout_s": settings.timeout_s,
            "auth": settings.api_key is not None,
            "in_flight": runtime.admitted,
            **batcher.stats(),
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(render(runtime.metrics), media_type=CONTENT_TYPE)

    @app.post("/predict")
    async def predict(
        request: Request,
        file: Annotated[UploadFile, File(description="an image file")],
        score_thr: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
        score_thr_query: Annotated[float | None, Query(alias="score_thr", ge=0.0, le=1.0)] = None,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        upload = file.filename or "upload"
        data = await file.read()
        try:
            image = await anyio.to_thread.run_sync(decode_image, data, settings.max_pixels, limiter=limiter[0])
        except ImageRejected as e:
            raise ImageRejected(e.status, e.error, f"{upload}: {e.detail}") from None
        h, w = image.shape[:2]
        thr = score_thr if score_thr is not None else score_thr_query if score_thr_query is not None else default_thr
        t1 = time.perf_counter()
        deadline = request.scope.get("state", {}).get("nasfpn_deadline", math.inf)
        try:
            job = await batcher.submit(image, thr, deadline)
        except ApiError:
            raise
        except Exception as e:
            raise ApiError(500, "inference_failed", f"inference failed: {type(e).__name__}: {e}") from None
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
            "image": {"width": int(w), "height": int(h)},
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

    app.add_middleware(Gate, runtime=runtime)
    return app


def _server_class() -> type:
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, saying what a stop signal does, and exiting 0 after a graceful stop
        (uvicorn re-raises the signal once stopped, which would end the process with 128 + signal)."""

        runtime: _Runtime | None = None

        def handle_exit(self, sig: int, frame) -> None:
            if not self.should_exit and self.runtime is not None:
                self.runtime.signalled_in_flight = self.runtime.in_flight
                log.info(
                    "nasfpn serve: %s received: accepting no new connections, answering the %d requests in "
                    "flight, then exiting (send SIGINT again to stop at once)",
                    signal.Signals(sig).name,
                    self.runtime.in_flight,
                )
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return GracefulServer


def run_server(
    detector: Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings | None = None,
    model_name: str | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``detector`` over HTTP until SIGTERM or SIGINT, then answer what is in flight and return."""
    import uvicorn

    settings = settings or ServeSettings()
    # Pillow warns of images over 89 Mpixel; the server refuses those over max_pixels itself.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    app = create_app(detector, settings, model_name)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        # In-flight requests end by their deadline; the margin covers a model call started just before it.
        timeout_graceful_shutdown=math.ceil(settings.timeout_s) + 30,
    )
    server = _server_class()(config)
    server.runtime = app.state.runtime
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "nasfpn serve: listening on %s without an API key: anyone who can reach this port can use the model "
            "(set %s or --api-key)",
            host,
            API_KEY_ENV,
        )
    server.run()
    log.info("nasfpn serve: exiting")
