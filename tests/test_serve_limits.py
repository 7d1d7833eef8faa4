"""The server under overload, past deadlines and with an API key: a stand-in detector whose model call
the test holds (``serve_helpers.StubDetector``), served in-process by uvicorn, called over HTTP."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from nasfpn.apps.serve import ServeSettings, create_app
from nasfpn.apps.serve_metrics import CounterVec, Gauge, HistogramVec, render
from serve_helpers import StubDetector, png, serving, solid


def _files(image: np.ndarray, name: str = "a.png") -> dict:
    return {"file": (name, png(image), "image/png")}


def _check(body: dict, image: np.ndarray) -> None:
    want = StubDetector.expected(image)
    (d,) = body["detections"]
    assert d["box"] == [round(float(v), 3) for v in want["boxes"][0]]
    assert d["label"] == int(want["labels"][0]) and d["name"] == StubDetector.class_names[d["label"]]
    assert abs(d["score"] - float(want["scores"][0])) < 1e-5


async def _wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_full_server_refuses_with_503_and_answers_what_it_took():
    stub = StubDetector()
    stub.gate.clear()  # the model call blocks: admitted requests stay in the server
    app = create_app(stub, ServeSettings(max_queue=2, batch_timeout_ms=0, max_batch=1, timeout_s=20))
    runtime = app.state.runtime
    images = [solid(64, 96, 40), solid(64, 96, 200)]

    async def scenario(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            held = [asyncio.create_task(client.post("/predict", files=_files(im))) for im in images]
            await _wait_for(lambda: runtime.admitted == 2)
            refused = await client.post("/predict", files=_files(images[0]))
            health = (await client.get("/health")).json()
            metrics = (await client.get("/metrics")).text
            stub.gate.set()
            answered = await asyncio.gather(*held)
            after = await client.post("/predict", files=_files(images[1]))
            return refused, health, metrics, answered, after

    with serving(app) as url:
        refused, health, metrics, answered, after = asyncio.run(scenario(url))
    assert refused.status_code == 503 and refused.json()["error"] == "overloaded"
    assert "--max-queue" in refused.json()["detail"] and int(refused.headers["retry-after"]) >= 1
    assert health["in_flight"] == 2 and health["max_queue"] == 2
    assert "nasfpn_predict_admitted 2" in metrics.splitlines()
    for r, im in zip(answered, images):
        assert r.status_code == 200, r.text
        _check(r.json(), im)
    assert after.status_code == 200 and runtime.admitted == 0


def test_a_request_past_its_deadline_gets_504_and_its_queued_work_is_dropped():
    stub = StubDetector()
    stub.gate.clear()
    app = create_app(stub, ServeSettings(max_batch=1, batch_timeout_ms=0, timeout_s=0.4))
    running, queued, later = solid(32, 32, 10), solid(64, 64, 20), solid(96, 96, 30)

    async def scenario(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = asyncio.create_task(client.post("/predict", files=_files(running)))
            await asyncio.to_thread(stub.entered.wait, 10)  # the model is busy with `running`
            second = await client.post("/predict", files=_files(queued))  # waits in the queue
            first_r = await first
            stub.gate.set()
            await _wait_for(lambda: app.state.batcher.dropped == 1)
            third = await client.post("/predict", files=_files(later))
            metrics = (await client.get("/metrics")).text
            return first_r, second, third, metrics

    with serving(app) as url:
        first, second, third, metrics = asyncio.run(scenario(url))
    for r in (first, second):
        assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded", r.text
        assert "--timeout" in r.json()["detail"]
    assert third.status_code == 200
    _check(third.json(), later)
    # The queued image never reached the model; the one already running finished (it could not be stopped).
    assert stub.calls == [[(32, 32)], [(96, 96)]]
    assert "nasfpn_dropped_jobs_total 1" in metrics.splitlines()
    assert 'nasfpn_http_requests_total{endpoint="/predict",status="504"} 2' in metrics.splitlines()


def test_api_key():
    with pytest.raises(ValueError, match="printable ASCII"):
        ServeSettings(api_key="two words")
    app = create_app(StubDetector(), ServeSettings(api_key="s3cret-key"))
    image = solid(40, 60, 90)
    with serving(app) as url:
        open_paths = [httpx.get(f"{url}{p}") for p in ("/health", "/", "/demo.png")]
        without = httpx.post(f"{url}/predict", files=_files(image))
        wrong = httpx.post(f"{url}/predict", files=_files(image), headers={"Authorization": "Bearer s3cret-kez"})
        bearer = httpx.post(f"{url}/predict", files=_files(image), headers={"Authorization": "bearer s3cret-key"})
        header = httpx.post(f"{url}/predict", files=_files(image), headers={"X-API-Key": "s3cret-key"})
        metrics_closed = httpx.get(f"{url}/metrics")
        metrics_open = httpx.get(f"{url}/metrics", headers={"X-API-Key": "s3cret-key"})
    assert [r.status_code for r in open_paths] == [200, 200, 200] and open_paths[0].json()["auth"] is True
    for r in (without, wrong, metrics_closed):
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    for r in (bearer, header):
        assert r.status_code == 200, r.text
        _check(r.json(), image)
    assert metrics_open.status_code == 200
    assert 'nasfpn_http_requests_total{endpoint="/predict",status="401"} 2' in metrics_open.text


def test_errors_page_and_schema():
    app = create_app(StubDetector(image_size=256), ServeSettings(max_pixels=10_000))
    with serving(app) as url:
        page = httpx.get(f"{url}/")
        docs = [httpx.get(f"{url}{p}").status_code for p in ("/docs", "/redoc")]
        schema = httpx.get(f"{url}/openapi.json")
        missing = httpx.get(f"{url}/nothing")
        method = httpx.get(f"{url}/predict")
        thin = httpx.post(f"{url}/predict", files=_files(solid(1, 2000, 5), "line.png"))
        big = httpx.post(f"{url}/predict", files=_files(solid(101, 100, 5), "big.png"))
        demo = httpx.get(f"{url}/demo.png")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    # Self-contained: no external script, style, font or image.
    assert "<script src" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    assert docs == [404, 404] and "/predict" in schema.json()["paths"]
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    assert method.status_code == 405 and method.json()["error"] == "method_not_allowed"
    assert thin.status_code == 200, thin.text  # a 1 x 2000 sliver resizes to at least 1 px: detected, not refused
    assert big.status_code == 413 and big.json()["error"] == "image_too_large"
    assert demo.status_code == 200 and demo.content.startswith(b"\x89PNG")


def test_metrics_exposition_format():
    counter = CounterVec("x_requests_total", "Requests.", ("endpoint", "status"))
    counter.inc("/a", "200")
    counter.inc("/a", "200")
    counter.inc('/q"\\\n', "500")
    hist = HistogramVec("x_seconds", "Latency.", (0.1, 1.0), ("endpoint",))
    for v in (0.05, 0.5, 0.7, 5.0):
        hist.observe(v, "/a")
    text = render([counter, hist, Gauge("x_depth", "Depth.", lambda: 3)])
    lines = text.splitlines()
    assert text.endswith("\n")
    assert lines[:2] == ["# HELP x_requests_total Requests.", "# TYPE x_requests_total counter"]
    assert 'x_requests_total{endpoint="/a",status="200"} 2' in lines
    assert 'x_requests_total{endpoint="/q\\"\\\\\\n",status="500"} 1' in lines
    assert [line for line in lines if line.startswith("x_seconds")] == [
        'x_seconds_bucket{endpoint="/a",le="0.1"} 1',
        'x_seconds_bucket{endpoint="/a",le="1.0"} 3',
        'x_seconds_bucket{endpoint="/a",le="+Inf"} 4',
        'x_seconds_sum{endpoint="/a"} 6.25',
        'x_seconds_count{endpoint="/a"} 4',
    ]
    assert lines[-3:] == ["# HELP x_depth Depth.", "# TYPE x_depth gauge", "x_depth 3"]
    with pytest.raises(ValueError, match="label values"):
        counter.inc("/a")

    parser = pytest.importorskip("prometheus_client.parser")  # the reference parser, where installed
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert families["x_requests"].type == "counter" and families["x_seconds"].type == "histogram"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in families["x_seconds"].samples}
    assert samples[("x_seconds_bucket", (("endpoint", "/a"), ("le", "+Inf")))] == 4
    assert families["x_requests"].samples[-1].labels["endpoint"] == '/q"\\\n'
