"""A detection depends only on its own image: not on its batch neighbours, the batch size, the
dataset order or the number of processes (data/batching.py).

Images of one folder often differ in size; padded together, the smaller ones see padding that
changes their detections (NAS-FPN's global pooling averages over it). Every test here compares a
batched run with one-image runs of the same images, and one test shows that the comparison
catches the old behaviour (padding an image for a larger neighbour).
"""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from deploy_helpers import detections_by, tiny_model
from nasfpn.apps.evaluate import run_eval
from nasfpn.data.batching import ShapeBatchSampler, group_by_shape, padded_input_shape
from nasfpn.data.synthetic import SyntheticSpec, render_image
from nasfpn.data.transforms import preprocess_batch
from nasfpn.deploy.check import ParityReport, Tolerances, match_detections
from nasfpn.deploy.predictor import Detector, export_weights

# (H, W) at image_size 256 / pad 128: square, portrait and landscape that pad to other shapes,
# an upscaled small image, a downscaled large one, and extreme aspect ratios.
SIZES = [(256, 256), (256, 100), (90, 256), (50, 70), (600, 900), (1000, 300), (180, 256), (256, 120)]


def _images(sizes=SIZES, seed: int = 7) -> list[np.ndarray]:
    return [render_image(SyntheticSpec(image_size=hw, max_objects=6), seed, "val", i)[0] for i, hw in enumerate(sizes)]


def _matched(ref: list[dict], got: list[dict], tol: Tolerances | None = None) -> ParityReport:
    report = ParityReport(tolerances=tol or Tolerances())
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        match_detections(a, b, report.tolerances, report, where=f"image {i}: ")
    return report


def test_group_by_shape_hand_computed():
    keys = ["a", "b", "a", "a", "c", "b", "a"]
    assert group_by_shape(keys, 2) == [[0, 2], [1, 5], [3, 6], [4]]
    assert group_by_shape(keys, 8) == [[0, 2, 3, 6], [1, 5], [4]]
    assert group_by_shape(keys, 1) == [[i] for i in range(7)]
    assert group_by_shape([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        group_by_shape(keys, 0)


def test_padded_input_shape_and_sampler():
    # 480x640 at 640: resized as is, height padded to 512 (pad 128); 100x50 scaled up 6.4x -> 640x320.
    assert padded_input_shape(480, 640, 640, 128) == (512, 640)
    assert padded_input_shape(100, 50, 640, 64) == (640, 320)
    assert padded_input_shape(100, 50, 640, 128, min_side=512) == (640, 512)
    sampler = ShapeBatchSampler([(480, 640), (640, 480), (480, 640), (640, 640)], 8, 640, 128)
    assert list(sampler) == [[0, 2], [1], [3]] and len(sampler) == 3


@pytest.fixture(scope="module")
def tiny_detector():
    cfg, model = tiny_model()
    return Detector(model, cfg)


def test_mixed_batch_equals_one_image_calls(tiny_detector):
    images = _images()
    single = [tiny_detector.predict([im])[0] for im in images]
    assert all(len(d["scores"]) > 0 for d in single)
    for batch_size in (8, 3):
        batched = tiny_detector.predict(images, batch_size=batch_size)
        report = _matched(single, batched)
        assert report.ok, report.summary()
    # Reversed order: same per-image results, in the caller's order.
    reversed_out = tiny_detector.predict(images[::-1], batch_size=8)[::-1]
    assert _matched(single, reversed_out).ok


def test_the_comparison_catches_padding_for_a_neighbour(tiny_detector):
    """Padding the portrait image to its square neighbour's shape (the old batching) changes its
    detections: the comparison above would fail."""
    det = tiny_detector
    square, portrait = _images([(256, 256), (256, 100)])
    d = det.config.data
    batch, metas = preprocess_batch([square, portrait], d.image_size, d.pad_divisor, d.mean, d.std)
    with torch.no_grad():
        padded_together = det.model.postprocess(det.model(batch), metas)[1]
    old = {k: v.numpy() for k, v in padded_together.items()}
    alone = det.predict([portrait])[0]
    report = _matched([alone], [old])
    assert not report.ok and report.matched < len(alone["scores"]), report.summary()


def test_fast_path_bf16_is_batch_invariant_too():
    cfg, model = tiny_model()
    det = Detector(model, cfg, optimize={"precision": "bf16"})
    images = _images(SIZES[:5])
    single = [det.predict([im])[0] for im in images]
    batched = det.predict(images, batch_size=8)
    # bf16 rounds differently for another batch size far less often than it moves boxes by 1e-2.
    report = _matched(single, batched, Tolerances.for_precision("fp16"))
    assert report.ok, report.summary()


# --------------------------------------------------------------------------- dataset evaluation


def _mixed_coco(root, sizes=SIZES, seed: int = 3):
    """A COCO-format dataset of synthetic shapes in images of the sizes above."""
    from nasfpn.core.classes import COCO_CATEGORY_IDS, COCO_CLASSES

    (root / "images").mkdir(parents=True)
    images, anns = [], []
    for i, hw in enumerate(sizes):
        pixels, objects = render_image(SyntheticSpec(image_size=hw, max_objects=6), seed, "val", i)
        name = f"{i:03d}.png"
        Image.fromarray(pixels).save(root / "images" / name)
        images.append({"id": i + 1, "file_name": name, "height": hw[0], "width": hw[1]})
        for obj in objects:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": COCO_CATEGORY_IDS[obj["label"]],
                    "bbox": obj["bbox"],
                    "area": obj["area"],
                    "iscrowd": 0,
                }
            )
    # The tiny preset has COCO's 80 classes; the shapes take the first ids.
    cats = [{"id": c, "name": n} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "ann.json", root / "images"


@pytest.fixture(scope="module")
def eval_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    ann, images = _mixed_coco(root / "data")
    cfg, model = tiny_model()
    weights = root / "tiny.safetensors"
    export_weights(model, cfg, weights)
    return ann, images, weights


def _results_by_image(path) -> dict[int, dict[str, np.ndarray]]:
    return detections_by(json.loads(path.read_text()), "image_id")


def _assert_same_results(a, b):
    ra, rb = _results_by_image(a), _results_by_image(b)
    assert sorted(ra) == sorted(rb)
    report = _matched([ra[k] for k in sorted(ra)], [rb[k] for k in sorted(rb)])
    assert report.ok, report.summary()


def _eval_worker(rank: int, world: int, port: int, ann, images, weights, out) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    _run_eval((ann, images, weights), out, 8)


def _run_eval(case, out, batch_size: int, **kwargs):
    ann, images, weights = case
    return run_eval(
        None,
        weights,
        ann,
        images,
        out,
        device="cpu",
        batch_size=batch_size,
        progress=False,
        print_fn=lambda *a: None,
        **kwargs,
    )


def test_eval_results_do_not_depend_on_batch_size_or_process_count(eval_case, tmp_path):
    ann, images, weights = eval_case
    metrics = {}
    for bs in (1, 8):
        metrics[bs] = _run_eval(eval_case, tmp_path / f"bs{bs}", bs).metrics
    _assert_same_results(tmp_path / "bs1" / "results.json", tmp_path / "bs8" / "results.json")
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert metrics[1][key] == pytest.approx(metrics[8][key], abs=1e-9)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_eval_worker, args=(2, port, ann, images, weights, tmp_path / "two"), nprocs=2, join=True)
    _assert_same_results(tmp_path / "bs1" / "results.json", tmp_path / "two" / "results.json")
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["AP"] == pytest.approx(metrics[1]["AP"], abs=1e-9)


def test_eval_bf16_fast_path_does_not_depend_on_batch_size(eval_case, tmp_path):
    for bs in (1, 8):
        _run_eval(eval_case, tmp_path / f"bs{bs}", bs, optimize={"precision": "bf16"})
    ra, rb = (_results_by_image(tmp_path / f"bs{bs}" / "results.json") for bs in (1, 8))
    assert sorted(ra) == sorted(rb)
    report = _matched([ra[k] for k in sorted(ra)], [rb[k] for k in sorted(rb)], Tolerances.for_precision("fp16"))
    assert report.ok, report.summary()


def test_predict_cli_mixed_folder_equals_batch_size_1(eval_case, tmp_path):
    """`nasfpn predict` of a folder of mixed sizes at its default batch size, against --batch-size 1."""
    from nasfpn.cli import main

    _, images, weights = eval_case
    for args, out in (([], "default"), (["--batch-size", "1"], "one")):
        assert (
            main(
                [
                    "predict",
                    "-",
                    str(images),
                    "--weights",
                    str(weights),
                    "--out",
                    str(tmp_path / out),
                    "--no-vis",
                    *args,
                ]
            )
            == 0
        )

    def by_file(path):
        out = detections_by(json.loads(path.read_text()), "file_name")
        return [out[f] for f in sorted(out)]

    default, one = by_file(tmp_path / "default" / "predictions.json"), by_file(tmp_path / "one" / "predictions.json")
    assert len(default) == len(SIZES)
    report = _matched(one, default)
    assert report.ok and report.matched > 0, report.summary()
