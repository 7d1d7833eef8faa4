"""The HTTP server, started for real (``nasfpn serve`` in a subprocess) and called with httpx; its
web page in a headless browser where one is installed."""

from __future__ import annotations

import asyncio
import html.parser
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from deploy_helpers import save_tiny_weights
from nasfpn.data.synthetic import SyntheticSpec, render_image
from nasfpn.deploy.predictor import load

MAX_UPLOAD_MB = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    spec = SyntheticSpec(image_size=(240, 320), max_objects=8)
    return [render_image(spec, seed=11, split="val", index=i)[0] for i in range(4)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("serve") / "tiny.safetensors")


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nasfpn",
                "serve",
                "-",
                "--weights",
                str(weights),
                "--port",
                str(port),
                "--max-batch",
                "8",
                "--batch-timeout-ms",
                "100",
                "--max-upload-mb",
                str(MAX_UPLOAD_MB),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
        # Ctrl+C: a graceful stop, exit status 0 (not 130: nothing was interrupted).
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert "SIGINT received" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)


def _post(url: str, payload: bytes, name: str = "image.png", content_type: str = "image/png", **kw) -> httpx.Response:
    return httpx.post(f"{url}/predict", files={"file": (name, payload, content_type)}, timeout=120, **kw)


def _assert_close(a: dict, b: dict) -> None:
    da, db = a["detections"], b["detections"]
    assert len(da) == len(db)
    for x, y in zip(sorted(da, key=lambda d: -d["score"]), sorted(db, key=lambda d: -d["score"])):
        assert x["label"] == y["label"] and x["name"] == y["name"] and x["category_id"] == y["category_id"]
        assert abs(x["score"] - y["score"]) <= 2e-5
        assert np.allclose(x["box"], y["box"], atol=2e-3)


def test_health(server):
    body = httpx.get(f"{server}/health").json()
    assert body["status"] == "ok" and body["model"] == "nasfpn_tiny" and body["backend"] == "pytorch"
    assert body["max_batch"] == 8 and body["classes"] == 80


def test_predict_returns_the_detector_output(server, weights, images):
    r = _post(server, _png(images[0]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["image"] == {"width": 320, "height": 240}
    assert set(body["timing"]) == {"decode_ms", "queue_ms", "inference_ms", "total_ms", "batch_size"}
    ref = load(None, weights=weights).predict([images[0]])[0]
    assert len(body["detections"]) == len(ref["scores"]) > 0
    for d, box, score, label, cat in zip(
        body["detections"], ref["boxes"], ref["scores"], ref["labels"], ref["category_ids"]
    ):
        assert d["label"] == int(label) and d["category_id"] == int(cat) and abs(d["score"] - float(score)) <= 1e-5
        assert np.allclose(d["box"], box, atol=1e-3)
    # A threshold as a query parameter or form field.
    for kw in ({"params": {"score_thr": 0.3}}, {"data": {"score_thr": "0.3"}}):
        high = _post(server, _png(images[0]), **kw).json()
        assert high["score_thr"] == 0.3
        assert [d for d in body["detections"] if d["score"] > 0.3] == high["detections"]


def test_rejects_bad_uploads(server, images):
    png = _png(images[1])
    corrupt = _post(server, png[: len(png) // 2])
    assert corrupt.status_code == 400 and "cannot decode" in corrupt.json()["detail"]
    assert corrupt.json()["error"] == "undecodable_image"
    text = _post(server, b"name,score\nfoo,1\n", name="table.csv", content_type="text/csv")
    assert text.status_code == 415 and "not an image" in text.json()["detail"]
    assert text.json()["error"] == "not_an_image" and "table.csv" in text.json()["detail"]
    empty = _post(server, b"")
    assert empty.status_code == 400 and "empty" in empty.json()["detail"] and empty.json()["error"] == "empty_upload"


def test_rejects_oversized_uploads(server):
    big = np.random.default_rng(0).integers(0, 256, (MAX_UPLOAD_MB * 2 * 2**20,), dtype=np.uint8).tobytes()
    r = _post(server, big, name="big.png")
    assert r.status_code == 413 and "limit" in r.json()["detail"] and r.json()["error"] == "upload_too_large"

    # Without a Content-Length (chunked): the body is counted while it is read.
    boundary = "nasfpnboundary"

    def chunks():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        for _ in range(8):
            yield big[: 2**19]
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(
        f"{server}/predict",
        content=chunks(),
        timeout=120,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code == 413


def test_rejects_malformed_requests(server, images):
    missing = httpx.post(f"{server}/predict", data={"score_thr": "0.2"}, timeout=60)
    assert missing.status_code == 422 and "file" in missing.text and missing.json()["error"] == "invalid_request"
    not_multipart = httpx.post(
        f"{server}/predict", content=b"\x89PNG", headers={"content-type": "image/png"}, timeout=60
    )
    assert not_multipart.status_code == 422
    for bad in ("abc", "1.5"):
        r = _post(server, _png(images[0]), params={"score_thr": bad})
        assert r.status_code == 422, r.text


def test_concurrent_requests_are_batched(server, images):
    singles = [_post(server, _png(im)).json() for im in images]
    singles_high = [_post(server, _png(im), params={"score_thr": 0.3}).json() for im in images]
    assert all(s["timing"]["batch_size"] == 1 for s in singles)

    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(i: int):
                params = {"score_thr": 0.3} if i % 5 == 4 else None
                r = await client.post(
                    f"{server}/predict", params=params, files={"file": (f"{i}.png", _png(images[i % 4]), "image/png")}
                )
                return i, r

            return await asyncio.gather(*(one(i) for i in range(20)))

    results = asyncio.run(burst())
    sizes = []
    for i, r in results:
        assert r.status_code == 200, r.text
        body = r.json()
        _assert_close(body, (singles_high if i % 5 == 4 else singles)[i % 4])
        sizes.append(body["timing"]["batch_size"])
    health = httpx.get(f"{server}/health").json()
    assert max(sizes) > 1 and health["max_batch_seen"] > 1, (sizes, health)
    assert health["requests"] >= 28


def test_metrics(server, images):
    assert _post(server, _png(images[2])).status_code == 200
    r = httpx.get(f"{server}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = r.text.splitlines()
    assert 'nasfpn_model_info{model="nasfpn_tiny",backend="pytorch"} 1' in lines
    ok = next(line for line in lines if line.startswith('nasfpn_http_requests_total{endpoint="/predict",status="200"}'))
    assert float(ok.split()[-1]) >= 1
    count = next(line for line in lines if line.startswith("nasfpn_batch_size_count"))
    assert float(count.split()[-1]) >= 1
    for name in ("nasfpn_queue_depth", "nasfpn_requests_in_flight", "nasfpn_predict_admitted"):
        assert any(line.startswith(f"{name} ") for line in lines), name
    # Every histogram's buckets are cumulative and end at +Inf = _count.
    parser = pytest.importorskip("prometheus_client.parser")
    families = {f.name: f for f in parser.text_string_to_metric_families(r.text)}
    latency = [
        s for s in families["nasfpn_http_request_duration_seconds"].samples if s.labels.get("endpoint") == "/predict"
    ]
    buckets = [s.value for s in latency if s.name.endswith("_bucket")]
    assert buckets == sorted(buckets) and buckets[-1] == next(s.value for s in latency if s.name.endswith("_count"))


def _browser() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class _Detections(html.parser.HTMLParser):
    """The state of the page and its ``tr.det`` rows, from the browser's DOM dump."""

    def __init__(self) -> None:
        super().__init__()
        self.state, self.rows = None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.state = a.get("data-state")
        if tag == "tr" and a.get("class") == "det":
            self.rows.append((a["data-name"], float(a["data-score"])))


@pytest.mark.skipif(_browser() is None, reason="no headless browser: none of chromium, chromium-browser, google-chrome")
def test_web_page_in_a_headless_browser(server, tmp_path):
    """``/?demo=1`` in headless Chromium: the page fetches /demo.png, posts it to /predict and draws the
    boxes; the DOM lists what the API answers for that picture, and the screenshot shows the drawing."""
    shot = tmp_path / "page.png"
    cmd = [
        _browser(),
        "--headless",
        "--no-sandbox",  # running as root (CI)
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=60000",  # virtual time waits for the page's fetches
        "--window-size=1000,900",
        f"--screenshot={shot}",
        "--dump-dom",
        f"{server}/?demo=1",
    ]
    for _ in range(3):
        # The browser's virtual time runs ahead while the page waits for anything but the network
        # (decoding the picture): on a loaded machine the DOM can be dumped before the page is done.
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        page = _Detections()
        page.feed(out.stdout)
        if page.state == "done":
            break
    assert page.state == "done", (out.returncode, page.state, out.stdout[-2000:], out.stderr[-2000:])
    demo = httpx.get(f"{server}/demo.png").content
    want = [(d["name"], d["score"]) for d in _post(server, demo, name="demo.png").json()["detections"]]
    assert page.rows == want and len(want) > 0
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    colourful = (pixels.max(axis=-1) - pixels.min(axis=-1)) > 100  # picture and boxes; the page itself is grey
    assert colourful.mean() > 0.01, colourful.mean()
