"""Fixed-size vs dynamic-size ONNX end2end files on a landscape image, against eager PyTorch.

    python benchmarks/onnx_dynamic_size.py               # both seed models, CPU, 2 threads

A 4:3 picture resized to 640 px is 480 x 640; eager PyTorch pads it to 512 x 640 (a multiple of
64 / 128), a fixed-size file to 640 x 640, a ``--dynamic-size`` file to 512 x 640 like eager.
Random weights, class bias shifted so that ~1000 (anchor, class) pairs pass score 0.05. Prints
latency (median / p90 of interleaved rounds) and how many of eager's detections each file
reproduces within the export check's tolerances.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch

from harness import interleaved_with_load, median_ms
from nasfpn.apps.bench import calibrate_scores, environment, percentile
from nasfpn.core.presets import PRESETS
from nasfpn.deploy import export as ex
from nasfpn.deploy.check import ParityReport, match_detections, sample_images
from nasfpn.deploy.contract import input_padding, prepare_inputs
from nasfpn.deploy.onnx_runtime import ort_session
from nasfpn.deploy.predictor import Detector
from nasfpn.models import build_model

MODELS = ("retinanet_r50_fpn_crop640_50e", "retinanet_r50_nasfpn_crop640_50e")


def bench_model(name: str, workdir: Path, threads: int, rounds: int, pairs: int) -> dict:
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_backbone=False).eval()
    image = sample_images(cfg, 1)[0]  # 384 x 512: resized to 480 x 640
    eager_batch, _, metas = prepare_inputs([image], cfg, None)
    calibrate_scores(model, eager_batch, cfg.model.test.score_thr, pairs)
    det = Detector(model, cfg)
    with torch.inference_mode():
        ref = {k: v.numpy() for k, v in model.postprocess(model(eager_batch), metas)[0].items()}

    row = {"name": name, "eager_hw": tuple(eager_batch.shape[-2:])}
    fns = {"eager": functools.partial(det.predict, [image])}
    for kind, dynamic in (("fixed", False), ("dynamic", True)):
        path = workdir / f"{name}_{kind}.onnx"
        meta = ex.export_onnx(model, cfg, path, dynamic_size=dynamic)
        session = ort_session(path, threads)
        batch, info, _ = prepare_inputs([image], cfg, *input_padding(meta))
        feed = {"images": batch.numpy(), "image_info": info.numpy()}
        boxes, scores, labels, num = session.run(None, feed)
        report = ParityReport()
        n = int(num[0])
        match_detections(
            ref, {"boxes": boxes[0, :n], "scores": scores[0, :n], "labels": labels[0, :n]}, report.tolerances, report
        )
        row[kind] = {
            "hw": tuple(batch.shape[-2:]),
            "matched": report.matched,
            "eager": report.eager_detections,
            "max_box_px": report.max_box_abs,
        }
        fns[kind] = functools.partial(session.run, None, feed)
    times, load = interleaved_with_load(fns, rounds, warmup=2)
    for key in fns:
        row.setdefault(key, {})
        row[key]["ms"] = median_ms(times, key)
        row[key]["p90"] = percentile(times[key]["total"], 90) * 1e3
    row["load"] = load
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("cpu")
    print(
        f"# fixed vs dynamic-size ONNX end2end, landscape 640x480 image: cpu, {args.threads} threads, "
        f"{args.rounds} rounds; torch {env['torch']}, {env['cpu']}\n"
    )
    print(
        "| model | eager PyTorch ms (input) | fixed-size ONNX ms (input) | matched | dynamic-size ONNX ms (input) "
        "| matched |\n|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = bench_model(name, Path(tmp), args.threads, args.rounds, args.pairs)
            cells = [f"{r['eager']['ms']:.0f} / {r['eager']['p90']:.0f} ({r['eager_hw'][0]}x{r['eager_hw'][1]})"]
            for kind in ("fixed", "dynamic"):
                k = r[kind]
                cells += [
                    f"{k['ms']:.0f} / {k['p90']:.0f} ({k['hw'][0]}x{k['hw'][1]})",
                    f"{k['matched']}/{k['eager']} (max {k['max_box_px']:.2g} px)",
                ]
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
