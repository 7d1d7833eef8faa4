"""Parity with MMDetection 3.3 on deterministic synthetic weights (tests/fixtures/mmdet/README.md).

The weights are filled by the reference rule on MMDetection's key names, loaded through our
MMDetection converter, and the head outputs and final detections must agree with what
MMDetection itself produced, within the tolerances the reference states.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from mmdet_reference import filled_state_dict, state_dict_sha256
from nasfpn.core.presets import PRESETS
from nasfpn.core.weights import load_into_model
from nasfpn.data.transforms import preprocess_batch
from nasfpn.models import build_model
from nasfpn.models.postprocess import class_aware_nms

MODELS = {"r50_fpn": "retinanet_r50_fpn_crop640_50e", "r50_nasfpn": "retinanet_r50_nasfpn_crop640_50e"}
IMAGES = ["img_640x640.png", "img_640x480.png"]


@pytest.fixture(scope="module", params=list(MODELS))
def parity_model(request, reference_dir):
    short = request.param
    filled = filled_state_dict(short, reference_dir)
    expected_sha = json.loads((reference_dir / f"detections_{short}.json").read_text())["state_dict_sha256"]
    assert state_dict_sha256(filled) == expected_sha
    cfg = PRESETS[MODELS[short]]
    model = build_model(cfg.model, pretrained_backbone=False).eval()
    load_into_model(model, filled, "mmdet")
    return short, cfg, model


_RUNS: dict = {}


def _run(model, cfg, reference_dir, image):
    """Outputs of every stage for one reference image (computed once per model and image)."""
    key = (cfg.name, image)
    if key not in _RUNS:
        _RUNS[key] = _forward(model, cfg, reference_dir, image)
    return _RUNS[key]


def _forward(model, cfg, reference_dir, image):
    rgb = np.array(Image.open(reference_dir / image).convert("RGB"))
    batch, metas = preprocess_batch([rgb], cfg.data.image_size, cfg.data.pad_divisor, cfg.data.mean, cfg.data.std)
    with torch.no_grad():
        feats = model.backbone(batch)
        pyramid = model.neck(feats)
        outputs = model.head(pyramid)
        dets = model.postprocess(outputs, metas)[0]
    return batch, feats, pyramid, outputs, dets


def _close(name, mine, ref, atol=1e-4, rtol=1e-4):
    mine = np.asarray(mine, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    assert mine.shape == ref.shape, f"{name}: shape {mine.shape} vs reference {ref.shape}"
    bad = np.abs(mine - ref) > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{name}: {bad.sum()} values off, max abs diff {np.abs(mine - ref).max():.3g}"


def test_head_outputs_match_mmdet(parity_model, reference_dir):
    short, cfg, model = parity_model
    ref = np.load(reference_dir / f"head_{short}.npz")
    batch, feats, pyramid, (cls_maps, reg_maps), _ = _run(model, cfg, reference_dir, "img_640x480.png")
    assert tuple(batch.shape) == (1, 3, 512, 640)
    _close("input_rows", batch[0][:, ref["input_rows_idx"]], ref["input_rows"])
    for i, name in enumerate(["c3", "c4", "c5"]):
        _close(f"backbone {name}", feats[i][0, :8], ref[f"backbone_first8_{name}"])
    for lvl in range(5):
        _close(f"neck P{lvl + 3}", pyramid[lvl][0, :8], ref[f"neck_first8_l{lvl}"])
        _close(f"bbox P{lvl + 3}", reg_maps[lvl][0], ref[f"bbox_l{lvl}"])
        _close(
            f"cls subset P{lvl + 3}", cls_maps[lvl][0, :160], ref[f"cls_subset_l{lvl}"].astype(np.float32), 1e-4, 1e-3
        )
    _close("cls P6", cls_maps[3][0], ref["cls_full_l3"])
    _close("cls P7", cls_maps[4][0], ref["cls_full_l4"])
    # Statistics of the complete maps, not only the stored subsets.
    stats = json.loads((reference_dir / f"detections_{short}.json").read_text())["head_stats"]
    maps = {f"backbone_c{i + 3}": f for i, f in enumerate(feats)}
    maps.update({f"neck_l{i}": p for i, p in enumerate(pyramid)})
    maps.update({f"cls_l{i}": c for i, c in enumerate(cls_maps)})
    maps.update({f"bbox_l{i}": r for i, r in enumerate(reg_maps)})
    for key, tensor in maps.items():
        t = tensor[0].double()
        assert list(t.shape) == stats[key]["shape_chw"], key
        for stat, value in (("mean", t.mean()), ("std", t.std()), ("abs_mean", t.abs().mean())):
            assert abs(float(value) - stats[key][stat]) <= 1e-4 * max(1.0, abs(stats[key][stat])), (
                key,
                stat,
                float(value),
            )


def test_nms_matches_mmcv(parity_model, reference_dir):
    short = parity_model[0]
    ref = np.load(reference_dir / f"head_{short}.npz")
    boxes = torch.from_numpy(ref["nms_in_bboxes"])
    scores = torch.from_numpy(ref["nms_in_scores"])
    labels = torch.from_numpy(ref["nms_in_labels"])
    keep = class_aware_nms(boxes, scores, labels, 0.5)
    assert set(keep.tolist()) == set(ref["nms_keep"].tolist())
    np.testing.assert_array_equal(scores[keep].numpy(), ref["nms_in_scores"][ref["nms_keep"]])


def _assert_matches_mmdet(dets, entry) -> int:
    """Match our detections to MMDetection's (IoU > 0.99, same label, score within 1e-4); returns
    the count. Every detection before the first fragile NMS decision must match; 90/100 overall."""
    ref_dets = entry["detections"]
    assert len(dets["boxes"]) == len(ref_dets) == entry["num_detections"]
    ious = box_iou(torch.tensor([d["bbox"] for d in ref_dets]), torch.as_tensor(dets["boxes"]))
    used: set[int] = set()
    matched = []
    for i, d in enumerate(ref_dets):
        hit = None
        for j in ious[i].argsort(descending=True).tolist():
            if ious[i, j] <= 0.99:
                break
            if (
                j not in used
                and int(dets["labels"][j]) == d["label"]
                and abs(float(dets["scores"][j]) - d["score"]) <= 1e-4
            ):
                hit = j
                break
        if hit is not None:
            used.add(hit)
        matched.append(hit is not None)
    fragile = [
        i
        for i, d in enumerate(ref_dets)
        if (d["iou_margin"] is not None and d["iou_margin"] < 1e-4)
        or (d["logit_gap"] is not None and d["logit_gap"] < 1e-4)
    ]
    stable = fragile[0] if fragile else len(ref_dets)
    assert all(matched[:stable]), f"unmatched stable detections: {[i for i in range(stable) if not matched[i]]}"
    assert sum(matched) >= 90
    return sum(matched)


def _reference_entry(reference_dir, short, image):
    ref_all = json.loads((reference_dir / f"detections_{short}.json").read_text())
    return next(e for e in ref_all["images"] if e["image"] == image)


@pytest.mark.parametrize("image", IMAGES)
def test_detections_match_mmdet(parity_model, reference_dir, image):
    short, cfg, model = parity_model
    *_, dets = _run(model, cfg, reference_dir, image)
    _assert_matches_mmdet(dets, _reference_entry(reference_dir, short, image))


def test_mixed_folder_at_default_batch_matches_mmdet(parity_model, reference_dir):
    """The 640x480 reference image predicted in one call with neighbours of other padded shapes (a
    portrait image, a small one scaled up) still gets MMDetection's detections."""
    from nasfpn.deploy.predictor import Detector

    short, cfg, model = parity_model
    _, landscape = (np.array(Image.open(reference_dir / name).convert("RGB")) for name in IMAGES)
    portrait = np.ascontiguousarray(landscape[:, :400].transpose(1, 0, 2))  # 400x480: 640x533 after resize
    small = landscape[::4, ::4]  # 120x160: scaled up to 480x640
    results = Detector(model, cfg).predict([portrait, landscape, small])
    _assert_matches_mmdet(results[1], _reference_entry(reference_dir, short, IMAGES[1]))
