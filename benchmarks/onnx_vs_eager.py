"""ONNX Runtime vs eager PyTorch on CPU: latency of one 640x640 image through the whole detector.

    python benchmarks/onnx_vs_eager.py                      # both seed models, 2 threads, batch 1
    python benchmarks/onnx_vs_eager.py --results benchmarks/RESULTS.md

For each model: eager PyTorch (network, then ``models/postprocess.py``; also through
``nasfpn.deploy.fast.optimize_for_inference``: BN folded, channels-last), the ONNX ``end2end``
file (network + NMS in one onnxruntime call) and the ONNX ``raw`` file (network in onnxruntime,
post-processing in PyTorch). Weights are random with the class bias shifted so that about
``--pairs`` (anchor, class) pairs pass the 0.05 score threshold, as a trained model's few
thousand candidates do (with the focal prior alone nothing passes and NMS costs nothing). Every
timing is the wall clock of one call on the pre-processed input, after ``--warmup`` untimed calls;
p50 / p90 over ``--iters`` calls; the variants take turns call by call, so that on a shared
machine they all see the same load. The detections of the ONNX files are checked against eager ones.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nasfpn.apps.bench import calibrate_scores
from nasfpn.core.presets import PRESETS
from nasfpn.deploy import export as ex
from nasfpn.deploy.check import sample_images, verify_export
from nasfpn.deploy.contract import export_input_hw, prepare_inputs
from nasfpn.deploy.onnx_runtime import ort_session
from nasfpn.deploy.predictor import Detector
from nasfpn.models import build_model
from nasfpn.models.postprocess import postprocess

SECTION = "## ONNX Runtime vs eager PyTorch (CPU)"
MODELS = ("retinanet_r50_fpn_crop640_50e", "retinanet_r50_nasfpn_crop640_50e")


def _time_interleaved(fns: dict, warmup: int, iters: int) -> dict[str, tuple[float, float]]:
    """p50 / p90 ms of each function; the functions take turns (in rotating order), so that all
    of them see the same machine load."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for it in range(iters):
        for name in names[it % len(names) :] + names[: it % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            seconds[name].append(time.perf_counter() - t0)
    out = {}
    for name, values in seconds.items():
        values.sort()
        p90 = values[min(len(values) - 1, math.ceil(0.9 * len(values)) - 1)]
        out[name] = (statistics.median(values) * 1000, p90 * 1000)
    return out


def bench_model(
    name: str,
    workdir: Path,
    threads: int,
    warmup: int,
    iters: int,
    pairs: int,
    reuse: bool = False,
    model: torch.nn.Module | None = None,
    strict: bool = True,
) -> dict:
    """Timings of the preset ``name`` at its input size: random weights (or ``model``, built from the
    preset) with the class bias calibrated to ``pairs`` candidates. ``strict``: stop if an exported
    file disagrees with PyTorch (else the comparison is only reported)."""
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = (model if model is not None else build_model(cfg.model, pretrained_backbone=False)).eval()
    hw = export_input_hw(cfg)
    image = sample_images(cfg, 3)[2]  # square: no padding, the same input for every runtime
    batch, info, metas = prepare_inputs([image], cfg, hw)
    assert tuple(batch.shape[-2:]) == tuple(hw), (batch.shape, hw)
    calibrate_scores(model, batch, cfg.model.test.score_thr, pairs)
    det = Detector(model, cfg)

    files = {}
    for contract in ("end2end", "raw"):
        path = workdir / f"{name}_{contract}.onnx"
        t0 = time.perf_counter()
        exported = not (reuse and path.is_file())
        if exported:
            ex.export(det, path, contract=contract, dynamic_size=False, verify=False)
        report = verify_export(path, model, cfg, images=[image])
        if strict and not report.ok:
            raise SystemExit(f"{path} disagrees with PyTorch:\n{report.summary()}")
        files[contract] = (path, time.perf_counter() - t0, report, exported)

    test_cfg = cfg.model.test
    anchors = model.anchors(model(batch))

    def eager_network():
        with torch.inference_mode():
            return model(batch)

    outputs = eager_network()

    def eager_post():
        with torch.inference_mode():
            return postprocess(outputs[0], outputs[1], anchors, metas, model.num_classes, test_cfg)

    def eager_total():
        with torch.inference_mode():
            out = model(batch)
            return postprocess(out[0], out[1], anchors, metas, model.num_classes, test_cfg)

    from nasfpn.deploy.fast import optimize_for_inference

    fast = optimize_for_inference(model)  # BN folded into convs, channels-last

    def eager_fast_total():
        with torch.inference_mode():
            return fast.postprocess(fast(batch), metas, test_cfg)

    e2e = ort_session(files["end2end"][0], threads)
    raw = ort_session(files["raw"][0], threads)
    feed = {"images": batch.numpy(), "image_info": info.numpy(), "score_thr": np.array(0.05, np.float32)}
    raw_feed = {"images": batch.numpy()}
    raw_outputs = raw.run(None, raw_feed)

    def raw_post():
        maps = [torch.from_numpy(m) for m in raw_outputs[:10]]
        return postprocess(maps[:5], maps[5:], anchors, metas, model.num_classes, test_cfg)

    def raw_total():
        maps = [torch.from_numpy(m) for m in raw.run(None, raw_feed)[:10]]
        return postprocess(maps[:5], maps[5:], anchors, metas, model.num_classes, test_cfg)

    num = int(e2e.run(None, feed)[3][0])
    with torch.inference_mode():
        candidates = int(sum((m.sigmoid() > test_cfg.score_thr).sum() for m in outputs[0]))
    timings = _time_interleaved(
        {
            "eager_network": eager_network,
            "eager_post": eager_post,
            "eager_total": eager_total,
            "eager_fast_total": eager_fast_total,
            "ort_network": lambda: raw.run(None, raw_feed),
            "ort_raw_total": raw_total,
            "ort_end2end": lambda: e2e.run(None, feed),
        },
        warmup,
        iters,
    )
    return {
        "name": name,
        "timings": timings,
        "detections": num,
        "pairs_above_thr": candidates,
        "export_s": {c: (round(v[1], 1), v[3]) for c, v in files.items()},
        "mb": {c: round(v[0].stat().st_size / 2**20, 1) for c, v in files.items()},
        "parity": {c: v[2] for c, v in files.items()},
    }


def environment(threads: int) -> str:
    import onnx
    import onnxruntime
    import torchvision

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}; "
        f"load average at the end {load} (shared machine).  \n"
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, torchvision "
        f"{torchvision.__version__}, onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}.  \n"
        f"Settings: batch 1, 640x640 input, fp32, {threads} threads "
        f"(torch.set_num_threads({threads}); onnxruntime intra_op_num_threads={threads}, inter_op 1, "
        f"default graph optimisations, CPUExecutionProvider), ONNX opset 18 via torch.onnx.export(dynamo=True)."
    )


def markdown(results: list[dict], threads: int, warmup: int, iters: int, pairs: int) -> str:
    def cell(key, r):
        p50, p90 = r["timings"][key]
        return f"{p50:.0f} / {p90:.0f}"

    lines = [
        SECTION,
        "",
        "`python benchmarks/onnx_vs_eager.py` — latency of one pre-processed 640x640 image, ms, p50 / p90 over "
        f"{iters} calls after {warmup} warm-up calls, variants interleaved call by call. Random weights with the class bias shifted so that "
        f"~{pairs} (anchor, class) pairs pass score 0.05 (what a trained model gives), so NMS does real work.",
        "",
        "| model | eager network | eager post-proc. | **eager total** | eager total, `optimize_for_inference` "
        "| ORT network (raw) | ORT raw + torch post-proc. | **ORT end2end** | end2end vs eager total |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        speed = r["timings"]["eager_total"][0] / r["timings"]["ort_end2end"][0]
        lines.append(
            f"| {r['name']} | {cell('eager_network', r)} | {cell('eager_post', r)} | {cell('eager_total', r)} "
            f"| {cell('eager_fast_total', r)} | {cell('ort_network', r)} | {cell('ort_raw_total', r)} "
            f"| {cell('ort_end2end', r)} | {speed:.2f}x faster |"
        )
    lines += ["", "Exported files and their check against eager PyTorch on the benchmark image:", ""]
    for r in results:
        for contract, rep in r["parity"].items():
            seconds, exported = r["export_s"][contract]
            lines.append(
                f"- {r['name']} {contract}: {r['mb'][contract]} MB, {'export + ' if exported else ''}check "
                f"{seconds} s; "
                f"{rep.matched}/{rep.eager_detections} detections matched, max |box diff| "
                f"{rep.max_box_abs:.2g} px, max |score diff| {rep.max_score_abs:.2g}"
                + (f", max |head output diff| {rep.max_map_abs:.2g}" if rep.max_map_abs is not None else "")
            )
    lines += ["", environment(threads), ""]
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        lines += [
            "The load average was above the CPU count: every timing is inflated, eager PyTorch (OpenMP "
            "threads waiting for each other) more than onnxruntime, so the speed-up is larger than on an "
            "idle machine.",
            "",
        ]
    return "\n".join(lines)


def update_results(path: Path, section: str) -> None:
    """Replace this benchmark's section of ``path`` (or append it), leaving other sections alone."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--pairs", type=int, default=1000, help="(anchor, class) pairs above the score threshold")
    p.add_argument("--workdir", help="where to write the ONNX files (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="keep ONNX files already in --workdir (still checked)")
    p.add_argument("--results", help="update this RESULTS.md section")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        results = []
        for name in args.models:
            results.append(bench_model(name, workdir, args.threads, args.warmup, args.iters, args.pairs, args.reuse))
            print(
                f"{name}: " + ", ".join(f"{k} {v[0]:.0f}/{v[1]:.0f} ms" for k, v in results[-1]["timings"].items()),
                flush=True,
            )
    section = markdown(results, args.threads, args.warmup, args.iters, args.pairs)
    print(section)
    if args.results:
        update_results(Path(args.results), section)
        print(f"updated {args.results}")


if __name__ == "__main__":
    main()
