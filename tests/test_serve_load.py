"""``nasfpn serve`` (the tiny model, in a subprocess) under a small version of
``benchmarks/load_test.py``, then stopped with SIGTERM while requests are in flight."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from benchmark_scripts import load_benchmark
from deploy_helpers import save_tiny_weights

ROOT = Path(__file__).resolve().parents[1]


def _load_test():
    return load_benchmark("load_test")


def _multipart(name: str, data: bytes, boundary: str = "nasfpnload") -> tuple[bytes, bytes, str]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + data[: len(data) // 2], data[len(data) // 2 :] + f"\r\n--{boundary}--\r\n".encode(), boundary


@pytest.mark.slow  # hundreds of requests (~7 s); test_serve covers batching and shutdown
def test_load_invariants_then_graceful_shutdown(tmp_path):
    lt = _load_test()
    weights = save_tiny_weights(tmp_path / "tiny.safetensors", ["data.image_size=128"])  # 4x less compute
    port = lt.free_port()
    log = tmp_path / "server.log"
    args = ["--max-queue", "8", "--max-batch", "4", "--timeout", "20", "--max-upload-mb", "1"]
    proc = lt.start_server(weights, port, log, args, threads=1)
    url = f"http://127.0.0.1:{port}"
    try:
        cfg = lt.LoadConfig(
            requests=100,
            concurrency=16,
            burst_factor=4,
            max_seconds=120,
            max_upload_mb=1,
            pictures_per_size=1,
            backoff_s=0.2,
        )
        report = lt.run_load(url, proc.pid, cfg)
        soak, burst = report["phases"]["soak"], report["phases"]["burst"]
        assert report["failures"] == [], report["failures"][:5]
        assert soak["requests"] == 100 and burst["requests"] == 32 and not report["stopped_early"]
        # The queue limit was reached (503s), good requests were answered, bad ones got their 4xx.
        statuses = {**soak["by_status"]}
        for k, v in burst["by_status"].items():
            statuses[k] = statuses.get(k, 0) + v
        assert statuses.get("503", 0) > 0 and statuses.get("200", 0) >= 10, statuses
        assert {"400", "413", "415", "422"} & set(soak["by_status"]), soak["by_status"]
        assert "500" not in statuses and "0" not in statuses

        # Graceful stop: three uploads held half-sent, SIGTERM, then they finish and are answered.
        pic = lt.pictures(per_size=1)[1]

        async def held_uploads():
            release = asyncio.Event()

            async def one(client: httpx.AsyncClient):
                first, rest, boundary = _multipart(pic.name, pic.data)

                async def body():
                    yield first
                    await release.wait()
                    yield rest

                return await client.post(
                    "/predict", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
                )

            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                reference = (await client.post("/predict", files={"file": (pic.name, pic.data, "image/png")})).json()
                tasks = [asyncio.create_task(one(client)) for _ in range(3)]
                deadline = time.monotonic() + 30
                while (await client.get("/health")).json()["in_flight"] < 3:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.5)
                with pytest.raises(httpx.ConnectError):  # no new connections once stopping
                    await httpx.AsyncClient(timeout=5).get(f"{url}/health")
                release.set()
                return reference, await asyncio.gather(*tasks)

        reference, answers = asyncio.run(held_uploads())
        for r in answers:
            assert r.status_code == 200, r.text
            assert lt.same_detections(r.json()["detections"], reference["detections"]) == ""
        assert proc.wait(timeout=60) == 0
        text = log.read_text()
        # 3 uploads, and maybe the /health call just answered (the server counts it down after sending).
        signalled = re.search(r"SIGTERM received: accepting no new connections, answering the (\d+) requests", text)
        assert signalled and int(signalled.group(1)) >= 3, text[-2000:]
        stopped = re.search(r"stopped: (\d+) requests in flight at the signal, (\d+) answered since", text)
        assert stopped and stopped.group(1) == stopped.group(2) == signalled.group(1), text[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    if proc.returncode != 0:
        pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
