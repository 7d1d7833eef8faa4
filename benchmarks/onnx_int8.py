"""int8 inference on CPU: ONNX Runtime static quantization of a trained detector, its speed and AP.

    python benchmarks/onnx_int8.py --weights runs/demo/best.safetensors --data runs/demo/data

The network (raw contract: head maps out, our post-processing after it) is exported in fp32 at
the model's fixed input size, then quantized with ``onnxruntime.quantization.quantize_static``
(QDQ format, per-channel int8 weights, int8 activations, MinMax calibration on training images).
Both files are scored on the validation images with the COCO metrics (same post-processing,
``OnnxDetector``) and timed per image next to the eager fp32 fast path, interleaved.
Keep int8 only where it is faster at an AP drop under 0.5 points.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from harness import interleaved_with_load
from nasfpn.apps.bench import environment
from nasfpn.data.coco import load_coco_json
from nasfpn.data.io import read_image
from nasfpn.deploy.contract import prepare_inputs
from nasfpn.deploy.export import export_onnx
from nasfpn.deploy.onnx_runtime import OnnxDetector
from nasfpn.deploy.predictor import load
from nasfpn.engine.coco_metrics import evaluate_detections, results_from_predictions


class _Images(CalibrationDataReader):
    """Pre-processed training images, one batch of one per call."""

    def __init__(self, paths: list[Path], config, input_hw: tuple[int, int]) -> None:
        self._batches = iter([prepare_inputs([read_image(p)], config, input_hw)[0].numpy() for p in paths])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"images": batch}


def _files(ann: Path, images: Path, limit: int) -> tuple[list[int], list[Path]]:
    data = load_coco_json(ann)
    entries = sorted(data["images"], key=lambda e: e["id"])[:limit]
    return [e["id"] for e in entries], [images / e["file_name"] for e in entries]


def _ap(detector, ann: Path, ids: list[int], paths: list[Path]) -> dict[str, float]:
    preds = []
    for image_id, path in zip(ids, paths):
        d = detector.predict([read_image(path)])[0]
        preds.append({"image_id": image_id, "boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"]})
    scored = set(ids)
    gt = load_coco_json(ann)
    gt = {**gt, "images": [e for e in gt["images"] if e["id"] in scored]}
    gt["annotations"] = [a for a in gt["annotations"] if a["image_id"] in scored]
    metrics = evaluate_detections(gt, results_from_predictions(preds, detector.category_ids))
    return {k: float(metrics[k]) for k in ("AP", "AP50", "AP75")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="our .safetensors (it carries its config)")
    parser.add_argument("--data", required=True, help="the demo's data folder (train/ and val/ COCO files)")
    parser.add_argument("--images", type=int, default=500, help="validation images to score")
    parser.add_argument("--calibration", type=int, default=100, help="training images for calibration")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    det = load(None, weights=args.weights, optimize=True)
    cfg = det.config
    val_ids, val_paths = _files(data / "annotations" / "instances_val.json", data / "val", args.images)
    _, cal_paths = _files(data / "annotations" / "instances_train.json", data / "train", args.calibration)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        meta = export_onnx(
            det.model, cfg, fp32, contract="raw", dynamic_size=False,
            class_names=det.class_names, category_ids=det.category_ids,
        )  # fmt: skip
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))
        int8 = Path(tmp) / "int8.onnx"
        input_hw = tuple(meta["input_hw"])
        quantize_static(
            str(pre), str(int8), _Images(cal_paths, cfg, input_hw), quant_format=QuantFormat.QDQ,
            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
        )  # fmt: skip
        # Quantization drops the file's metadata: carry ours over so OnnxDetector reads it.
        proto = onnx.load(str(int8))
        del proto.metadata_props[:]
        proto.metadata_props.extend(onnx.load(str(fp32)).metadata_props)
        onnx.save(proto, str(int8))
        runtimes = {"eager fast fp32": det, "onnx fp32": OnnxDetector(fp32, threads=args.threads),
                    "onnx int8": OnnxDetector(int8, threads=args.threads)}  # fmt: skip
        scores = {
            name: _ap(d, data / "annotations" / "instances_val.json", val_ids, val_paths)
            for name, d in runtimes.items()
        }
        image = read_image(val_paths[0])
        fns = {name: functools.partial(d.predict, [image]) for name, d in runtimes.items()}
        times, load_avg = interleaved_with_load(fns, args.rounds, warmup=3)
        sizes = {name: p.stat().st_size / 2**20 for name, p in (("onnx fp32", fp32), ("onnx int8", int8))}
    env = environment()
    print(
        f"{cfg.name} at {input_hw[0]}x{input_hw[1]}, {len(val_ids)} validation images, {args.threads} threads, "
        f"{env['cpu']}, torch {env['torch']}, load {load_avg[0]:.2f} -> {load_avg[1]:.2f}"
    )
    rows = {}
    for name in runtimes:
        ms = statistics.median(times[name]["total"]) * 1e3
        rows[name] = {"ms": ms, **scores[name], "MB": sizes.get(name)}
        print(f"  {name:16s} {ms:7.2f} ms/image  AP {scores[name]['AP']:.4f}  AP50 {scores[name]['AP50']:.4f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
