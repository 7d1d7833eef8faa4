"""benchmarks/gpu_check.sh without a GPU: it must fail clearly, plan without running, and read
only result keys that ``nasfpn bench`` really writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gpu_check():
    yield load_benchmark("gpu_check")
    sys.modules.pop("gpu_check", None)


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


def test_without_cuda_fails_clearly(tmp_path, gpu_check):
    # An empty CUDA_VISIBLE_DEVICES hides any GPU, so this also holds on a GPU machine.
    proc = _run(str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 2, proc.stderr
    assert gpu_check.NO_CUDA_MESSAGE in proc.stderr
    assert "gpu_check: no CUDA device (torch.cuda.is_available() is False); this check needs a GPU" in proc.stderr
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert record["status"] == "no_cuda"


def test_plan_lists_sections_and_limits(gpu_check):
    proc = _run("--plan")
    assert proc.returncode == 0, proc.stderr
    for s in gpu_check.plan():
        assert f"{s.name} " in proc.stdout and f"{s.timeout_s} s" in proc.stdout
    assert "global budget 450 s" in proc.stdout


def test_plan_covers_the_brief(gpu_check):
    sections = gpu_check.plan()
    names = [s.name for s in sections]
    assert len(set(names)) == len(names)
    infer = {
        (s.params["model"], s.params["batch"], s.params["precision"], s.params["compile"])
        for s in sections
        if s.kind == "infer"
    }
    for model in (gpu_check.FPN, gpu_check.NASFPN):
        for batch in (1, 32):
            for precision in ("bf16", "fp32"):
                assert (model, batch, precision, False) in infer
    assert {(gpu_check.NASFPN, b, "bf16", True) for b in (1, 32)} <= infer
    assert sorted(s.params["batch"] for s in sections if s.kind == "train") == [8, 16]
    assert {"env", "torchvision", "tests", "ddp"} <= {s.kind for s in sections}
    assert names.index("torchvision") < names.index("infer_nasfpn_eager_bf16_b1")


def test_planned_bench_commands_parse(gpu_check):
    from nasfpn.cli import build_parser
    from nasfpn.core.presets import PRESETS

    parser = build_parser()
    for s in gpu_check.plan():
        if s.kind in ("infer", "train"):
            args = parser.parse_args(s.params["argv"])
            assert args.model in PRESETS and args.device == "cuda" and args.json and args.size == 640
            assert args.mode == s.kind and args.batch == s.params["batch"]
            assert args.compile == s.params.get("compile", False)


def test_bench_results_have_the_keys_read(gpu_check, one_thread):
    from nasfpn.apps.bench import bench_infer, bench_train
    from nasfpn.core.presets import get_config

    # The smallest NAS-FPN (the keys do not depend on the model's size), on one thread: two
    # threads on a loaded small machine wait on each other for seconds.
    cfg = get_config(
        "nasfpn_tiny",
        ["model.neck.stacks=1", "model.neck.channels=16", "model.head.stacked_convs=1", "model.head.feat_channels=16"],
    )
    infer = bench_infer(cfg, "cpu", batch=1, size=128, warmup=1, iters=1, pairs_per_image=50)
    train = bench_train(cfg, "cpu", batch=2, size=128, warmup=1, iters=1)
    assert set(gpu_check.INFER_KEYS) <= set(infer)
    assert set(gpu_check.TRAIN_KEYS) <= set(train)
    # nasfpn bench --json prints json.dumps(result, indent=2): the parser reads it back.
    assert (
        gpu_check.parse_bench_json("log line\n" + json.dumps(infer, indent=2))["images_per_s"] == infer["images_per_s"]
    )

    # The reports from these results, a failed torchvision run and a skipped DDP section.
    def section(name, kind, status, params, result=None, reason=""):
        return {
            "name": name,
            "kind": kind,
            "title": name,
            "status": status,
            "seconds": 1.0,
            "timeout_s": 60,
            "params": params,
            "command": None,
            "returncode": 0,
            "reason": reason,
            "error_tail": "" if status == "ok" else "Traceback ...\nRuntimeError: boom",
            "result": result,
        }

    nas = gpu_check.NASFPN
    record = {
        "status": "completed",
        "started": "now",
        "budget_s": 450,
        "git": {"commit": None},
        "host": {},
        "environment": {},
        "iterations": {
            "infer": {"1": {"warmup": 10, "iters": 50}, "32": {"warmup": 3, "iters": 10}},
            "infer_compiled": {"1": {"warmup": 5, "iters": 50}, "32": {"warmup": 3, "iters": 10}},
            "train": {"warmup": 3, "iters": 10},
        },
        "sections": [
            section("torchvision", "torchvision", "failed", {"batches": [1, 32]}, reason="exit code 1"),
            section(
                "infer_nasfpn_eager_bf16_b1",
                "infer",
                "ok",
                {"model": nas, "batch": 1, "precision": "bf16", "compile": False},
                infer,
            ),
            section("train_nasfpn_bf16_b8", "train", "ok", {"model": nas, "batch": 8, "precision": "bf16"}, train),
            section(
                "cuda_tests",
                "tests",
                "ok",
                {},
                {"passed": 1, "failed": 0, "errors": 0, "skipped": 0, "total": 1, "tests": []},
            ),
            section("ddp_nccl", "ddp", "skipped", {}, reason="needs >= 2 GPUs, found 1"),
        ],
    }
    record.update(gpu_check.summarise(record))
    status = {t["check"]: t["status"] for t in record["targets"]}
    assert status["R50-NAS-FPN inference, bf16, batch 1, 640x640"] == "missed"  # 128 px on a CPU
    assert status["R50-NAS-FPN bf16 vs torchvision eager fp32, batch 1"] == "not measured"
    assert status["CUDA-only tests"] == "met"
    assert status["2-process NCCL DDP step"] == "not measured"
    md = gpu_check.markdown(record)
    assert "| torchvision | failed |" in md and "RuntimeError: boom" in md and "needs >= 2 GPUs" in md


def test_cuda_test_selection(tmp_path, gpu_check, monkeypatch):
    files = gpu_check.cuda_test_files()
    assert ROOT / "tests" / "test_fast.py" in files and Path(__file__) not in files

    class Mark(SimpleNamespace):
        pass

    def item(name, *marks):
        return SimpleNamespace(name=name, iter_markers=lambda: iter(marks))

    cuda = item("test_step", Mark(name="skipif", args=(False,), kwargs={"reason": "needs CUDA"}))
    named = item("test_x[cuda]")
    cpu = item("test_y", Mark(name="skipif", args=(True,), kwargs={"reason": "slow"}))
    about = item("test_without_cuda_fails_clearly")  # names CUDA, needs none
    items = [cuda, named, cpu, about]
    deselected = []
    config = SimpleNamespace(hook=SimpleNamespace(pytest_deselected=lambda items: deselected.extend(items)))
    monkeypatch.setenv("GPU_CHECK_SELECT_CUDA", "1")
    gpu_check.pytest_collection_modifyitems(config, items)
    assert items == [cuda, named] and deselected == [cpu, about]

    xml = tmp_path / "r.xml"
    suite = ET.Element("testsuite")
    for name, child in (("a", None), ("b", "failure"), ("c", "skipped")):
        case = ET.SubElement(suite, "testcase", classname="tests.test_fast", name=name, time="0.5")
        if child:
            ET.SubElement(case, child, message="why")
    ET.ElementTree(suite).write(xml)
    counts = gpu_check.parse_junit(xml)
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["total"]) == (1, 1, 1, 3)
