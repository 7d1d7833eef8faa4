"""Accuracy against latency on the CPU: the mobile presets next to the ResNet-50 ones, in one run.

    python benchmarks/lite_table.py --data runs/demo/data --steps 1000 --out benchmarks/results/lite_table.json

Per model:
- parameters and FLOPs at the preset's input size (``nasfpn info``'s counters);
- latency of one pre-processed image at the preset's size, batch 1 (``onnx_vs_eager.bench_model``:
  the plain model, the fast path (BN folded, channels-last, fp32) and the ONNX ``end2end`` file in
  ONNX Runtime, interleaved call by call; the exported files checked against PyTorch) with random
  weights, the class bias calibrated so that ~1,000 candidates pass the score threshold as with a
  trained model, denormals flushed (random BN statistics shrink a MobileNetV2's activations into
  float32's denormal range, which trained weights do not, and which the fast path flushes anyway);
- with ``--data``: AP after the same short training on the demo data for every model (``--steps``
  steps of batch 16 at 128 px, the demo's recipe: AdamW 4e-3, warm-up, x0.1 for the last fifth,
  anchors from IoU 0.4 and 2 strides wide for the small shapes, bf16 autocast), from scratch:
  ImageNet weights cannot be downloaded here, so the mobile trunks start as untrained as the ResNet-10.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from nasfpn.apps.demo import demo_config
from nasfpn.core.machine import cpu_name
from nasfpn.core.presets import PRESETS
from nasfpn.engine.data_paths import DataPaths
from nasfpn.engine.trainer import train
from nasfpn.models import build_model
from nasfpn.models.summary import model_summary
from onnx_vs_eager import bench_model

LATENCY_MODELS = (
    "nasfpn_lite_mobilenetv2_320",
    "fpnlite_mobilenetv2_320",
    "nasfpn_mobilenetv2",
    "nasfpn_tiny",
    "retinanet_r50_fpn_crop640_50e",
    "retinanet_r50_nasfpn_crop640_50e",
)
TRAINED_MODELS = ("nasfpn_lite_mobilenetv2_320", "fpnlite_mobilenetv2_320", "nasfpn_mobilenetv2", "nasfpn_tiny")


def facts(name: str) -> dict:
    cfg = PRESETS[name]
    model = build_model(cfg.model, pretrained_backbone=False)
    s = model_summary(model, cfg.data.image_size)
    return {"size": cfg.data.image_size, "params_m": s["params_total"] / 1e6, "gflops": s["gflops"]}


def with_measured_bn_statistics(name: str) -> torch.nn.Module:
    """The preset's model with random weights and BN statistics measured on random images (train
    mode, 4 batches), as any training leaves them. With BN's initial (0, 1) statistics a random
    MobileNetV2 shrinks its activations layer by layer: the logits hardly depend on the image, the
    calibrated candidates tie at one score (no two runtimes order ties alike) and float32 denormals
    slow eager PyTorch down many times (the fast path flushes them; the plain model does not)."""
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_backbone=False)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average of the batches below
    model.train()
    size = cfg.data.image_size
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(2, 3, size, size))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def short_training(name: str, data: Path, steps: int, out: Path) -> dict:
    """AP of ``name``'s architecture after ``steps`` steps of the demo recipe on the demo data."""
    demo = demo_config()
    m = PRESETS[name].model
    model = replace(
        m,
        backbone=replace(m.backbone, pretrained=None, frozen_stages=0),
        anchors=replace(m.anchors, octave_base_scale=demo.model.anchors.octave_base_scale),
        loss=demo.model.loss,
    )
    epochs = max(1, round(steps / 250))  # 4,000 images at batch 16: 250 steps an epoch
    t = demo.train
    cfg = replace(
        demo,
        name=f"{name}_demo_{steps}",
        model=model,
        train=replace(t, epochs=epochs, milestones=(max(1, round(epochs * 0.8)),), eval_interval=epochs, amp="bf16"),
    )
    paths = DataPaths(
        data / "annotations/instances_train.json",
        data / "train",
        data / "annotations/instances_val.json",
        data / "val",
    )
    t0 = time.time()
    result = train(cfg, paths, out / name, device="cpu", progress=False, quiet=True)
    seconds = time.time() - t0
    metrics = result.last_metrics
    record = {
        "steps": result.steps,
        "AP": metrics.get("AP"),
        "AP50": metrics.get("AP50"),
        "train_s": seconds,
        "s_per_step": seconds / max(1, result.steps),
    }
    return record


def markdown(rows: list[dict], steps: int, threads: int) -> str:
    lines = [
        f"CPU: {cpu_name()}, {threads} threads, batch 1, fp32; latency in ms (p50 of interleaved calls).",
        "",
        "| model | input | params | GFLOPs | plain | fast path | ONNX Runtime end2end | export check "
        f"| AP / AP50 after {steps} demo steps | s / step (train, bf16) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r.get("timings", {})
        ap = r.get("train")
        check = r.get("check", "")
        lines.append(
            f"| {r['name']} | {r['size']} | {r['params_m']:.2f} M | {r['gflops']:.1f} "
            f"| {t.get('eager_total', [float('nan')])[0]:.1f} | {t.get('eager_fast_total', [float('nan')])[0]:.1f} "
            f"| {t.get('ort_end2end', [float('nan')])[0]:.1f} | {check} "
            + (f"| {ap['AP']:.3f} / {ap['AP50']:.3f} | {ap['s_per_step']:.3f} |" if ap else "| - | - |")
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(LATENCY_MODELS))
    p.add_argument("--trained", nargs="*", default=list(TRAINED_MODELS), help="models to train on --data")
    p.add_argument("--data", type=Path, help="the demo data (nasfpn demo's runs/demo/data); no training without it")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/lite_table.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    previous = {r["name"]: r for r in json.loads(args.out.read_text())} if args.out.is_file() else {}

    def save(row: dict) -> None:
        """Write ``row`` into ``--out`` at once (rows of other models kept): nothing measured is lost."""
        previous[row["name"]] = row
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(list(previous.values()), indent=1, default=str))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = {**previous.get(name, {}), "name": name, **facts(name)}
            if args.data and name in args.trained:
                row["train"] = short_training(name, args.data, args.steps, Path(tmp))
                save(row)
            if not args.no_latency:
                model = with_measured_bn_statistics(name)
                b = bench_model(name, Path(tmp), args.threads, 3, args.iters, 1000, model=model, strict=False)
                row["timings"] = b["timings"]
                rep = b["parity"]["end2end"]
                row["check"] = f"{rep.matched}/{rep.eager_detections} matched, boxes within {rep.max_box_abs:.1g} px"
            save(row)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    print(markdown(rows, args.steps, args.threads))


if __name__ == "__main__":
    main()
