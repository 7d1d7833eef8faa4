"""The benchmark module and ``nasfpn bench``: statistics, memory meter, score calibration, the three
modes on small inputs, and the command line; the scripts' harness in ``benchmarks/``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmark_scripts import load_benchmark
from nasfpn.apps import bench
from nasfpn.cli import main
from nasfpn.core.presets import get_config
from nasfpn.models import build_model

TINY = get_config("nasfpn_tiny")
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def harness():
    """``benchmarks/harness.py``, the module the scripts import as ``harness``."""
    return load_benchmark("harness")


def test_percentile_and_latency_stats():
    xs = [0.4, 0.1, 0.3, 0.2, 0.5]
    assert bench.percentile(xs, 50) == pytest.approx(0.3)
    assert bench.percentile(xs, 90) == pytest.approx(0.46)  # between 0.4 and 0.5
    assert bench.percentile(xs, 0) == 0.1 and bench.percentile(xs, 100) == 0.5
    stats = bench.latency_stats([0.1, 0.2, 0.3], batch=4)
    assert stats["p50_ms"] == pytest.approx(200) and stats["images_per_s"] == pytest.approx(20)
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_peak_memory_sees_a_large_allocation():
    with bench.PeakMemory("cpu") as small:
        time.sleep(0.02)
    with bench.PeakMemory("cpu") as big:
        x = torch.ones(64 * 1024 * 1024)  # 256 MB, touched
        time.sleep(0.05)
        del x
    assert "RSS" in big.source
    assert big.delta_mb > 200 and small.delta_mb < 50
    assert big.peak_mb >= big.delta_mb
    if big.alloc_peak_mb is not None:  # glibc: bytes in use by malloc, cache-independent
        assert 250 < big.alloc_delta_mb < 300 and small.alloc_delta_mb < 20
        with bench.PeakMemory("cpu") as again:  # freed memory the heap may keep does not count
            x = torch.ones(64 * 1024 * 1024)
            time.sleep(0.05)
            del x
        assert 250 < again.alloc_delta_mb < 300


def test_calibrate_scores_sets_candidate_count():
    torch.manual_seed(0)
    model = build_model(TINY.model, pretrained_backbone=False).eval()
    x = torch.randn(2, 3, 128, 128)
    thr = model.test_cfg.score_thr
    with torch.no_grad():
        before = sum(int((m.sigmoid() > thr).sum()) for m in model(x)[0])
    assert before == 0  # the focal prior keeps every score near 0.01
    bench.calibrate_scores(model, x, thr, 200)
    with torch.no_grad():
        cls_maps = model(x)[0]
    per_image = [sum(int((m[i].sigmoid() > thr).sum()) for m in cls_maps) for i in range(2)]
    assert all(100 <= n <= 400 for n in per_image), per_image


def test_synthetic_inputs():
    ims = bench.synthetic_images(2, 48, 64, seed=3)
    assert ims[0].shape == (48, 64, 3) and ims[0].dtype.name == "uint8"
    assert (ims[0] != ims[1]).any() and (bench.synthetic_images(1, 48, 64, seed=3)[0] == ims[0]).all()
    t = bench.synthetic_targets(3, 128, boxes_per_image=5)
    assert len(t) == 3 and t[0]["boxes"].shape == (5, 4) and t[0]["labels"].dtype == torch.int64
    b = t[0]["boxes"]
    assert (b[:, 2:] > b[:, :2]).all() and (b >= 0).all() and (b <= 128).all()


@pytest.mark.parametrize("plain", [False, True])
def test_bench_infer_small(plain):
    r = bench.bench_infer(TINY, batch=1, size=128, warmup=1, iters=2, plain=plain, pairs_per_image=300)
    assert r["mode"] == "infer" and r["plain"] == plain and r["channels_last"] == (not plain)
    assert r["p90_ms"] >= r["p50_ms"] > 0 and r["images_per_s"] > 0
    assert r["pre_ms"] > 0 and r["net_ms"] > 0 and r["post_ms"] > 0 and 0 < r["post_share"] < 1
    assert r["detections_per_image"] > 0  # calibration made scores pass the threshold
    assert r["peak_mb"] > 0 and "RSS" in r["memory_source"]
    json.dumps(r)
    assert "latency p50" in bench.format_result(r)


def test_bench_train_small():
    r = bench.bench_train(TINY, batch=2, size=128, warmup=1, iters=1, checkpoint_stacks=True)
    assert r["mode"] == "train" and r["checkpoint_stacks"] and not r["fused_sgd"]
    assert r["p50_ms"] > 0 and r["loss"] == r["loss"]  # finite, not NaN
    assert "checkpoint_stacks=True" in bench.format_result(r)


def test_bench_data_and_decoders(tmp_path):
    paths = bench.write_jpegs(tmp_path, count=2, height=60, width=80)
    a, b = bench.decode_pil(paths[0]), bench.decode_torchvision(paths[0])
    assert a.shape == b.shape == (3, 60, 80) and a.dtype == b.dtype == torch.uint8
    assert (a.float() - b.float()).abs().mean() < 2  # both libjpeg: at most rounding differences
    r = bench.bench_data(TINY, size=64, images=3, height=60, width=80, passes=1, decoder="torchvision")
    assert r["images_per_s"] > 0 and r["decode_ms"] > 0 and r["env"]["threads"] == 1
    with pytest.raises(ValueError, match="decoder"):
        bench.bench_data(TINY, decoder="nope")


def test_bench_data_restores_threads():
    threads = torch.get_num_threads()
    bench.bench_data(TINY, size=64, images=1, height=40, width=40, passes=1)
    assert torch.get_num_threads() == threads


def test_markdown_table(harness):
    table = harness.markdown_table([{"a": 1.23456, "b": "x"}, {"a": 12.0}], [("a", "A"), ("b", "B")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.2 | x |", "| 12.0 |  |"]


def test_interleaved_rounds_and_sub_timings(harness):
    calls = []

    def plain():
        calls.append("plain")
        return 123  # not a dict: ignored

    def split():
        calls.append("split")
        return {"net": 0.25}

    times = harness.interleaved({"plain": plain, "split": split}, rounds=3, warmup=1)
    assert calls == ["plain", "split"] * 4  # one warm-up round, then round-robin
    assert set(times["plain"]) == {"total"} and len(times["plain"]["total"]) == 3
    assert times["split"]["net"] == [0.25] * 3
    assert harness.median_ms({"x": {"total": [0.001, 0.003, 0.002]}}, "x") == pytest.approx(2.0)


def test_benchmark_script_runs_from_any_folder(tmp_path):
    # python benchmarks/<script>.py puts benchmarks/ on sys.path, whatever the current folder.
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_train.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--variants" in proc.stdout


def test_cli_bench_json(capsys):
    assert (
        main(
            [
                "bench",
                "nasfpn_tiny",
                "--size",
                "128",
                "--warmup",
                "1",
                "--iters",
                "1",
                "--json",
                "--no-channels-last",
                "--pairs-per-image",
                "100",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["mode"] == "infer" and r["size"] == 128 and not r["channels_last"] and r["fuse_bn"]


def test_cli_bench_modes(capsys):
    threads = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "bench",
                    "nasfpn_tiny",
                    "--mode",
                    "train",
                    "--size",
                    "128",
                    "--batch",
                    "2",
                    "--warmup",
                    "1",
                    "--iters",
                    "1",
                    "--threads",
                    "1",
                ]
            )
            == 0
        )
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "mode=train" in out and "latency p50" in out
    assert main(["bench", "nasfpn_tiny", "--mode", "data", "--size", "64", "--images", "2", "--iters", "1"]) == 0
    assert "images/s per worker" in capsys.readouterr().out
    assert main(["bench", "no_such_model"]) == 2
