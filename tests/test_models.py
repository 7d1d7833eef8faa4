"""Model parts on tiny inputs: shapes, gradients, anchors and assignment against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from nasfpn.core.presets import PRESETS
from nasfpn.models import build_model
from nasfpn.models.anchors import AnchorGenerator
from nasfpn.models.boxes import BACKGROUND, IGNORE, MaxIoUAssigner, box_iou, decode, encode
from nasfpn.models.layers import output_conv
from nasfpn.models.summary import count_params


def _small(cfg, size=128):
    """The preset's architecture at reduced width and depth where that keeps the structure."""
    m = cfg.model
    return replace(
        cfg,
        model=replace(m, backbone=replace(m.backbone, depth=18, pretrained=None)),
        data=replace(cfg.data, image_size=size),
    )


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_builds_and_trains_one_step(name):
    torch.manual_seed(0)
    cfg = _small(PRESETS[name])
    m = cfg.model
    # Shrink widths: the structure (genotype, stacks, head layout) stays the preset's.
    m = replace(
        m,
        neck=replace(m.neck, channels=32, stacks=min(m.neck.stacks, 2)),
        head=replace(m.head, feat_channels=32, num_classes=5),
    )
    model = build_model(m, pretrained_backbone=False).train()
    images = torch.randn(2, 3, 128, 128)
    cls_maps, reg_maps = model(images)
    a = model.anchor_generator.num_anchors
    assert [tuple(c.shape) for c in cls_maps] == [(2, a * 5, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    assert [tuple(r.shape) for r in reg_maps] == [(2, a * 4, 128 // s, 128 // s) for s in (8, 16, 32, 64, 128)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [64.0, 64.0, 120.0, 100.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
    ]
    losses = model.loss((cls_maps, reg_maps), targets)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    # Some gradients are exactly zero by construction (box-branch BNs of levels without positives,
    # biases feeding a train-mode BN), but every part of the network must learn.
    moved = {n.split(".")[0] for n, p in trainable if float(p.grad.abs().sum()) > 0}
    assert moved == {"backbone", "neck", "head"}
    assert float(output_conv(model.head.retina_reg).weight.grad.abs().sum()) > 0


def test_image_without_boxes_has_zero_box_loss():
    cfg = _small(PRESETS["nasfpn_tiny"])
    model = build_model(replace(cfg.model, head=replace(cfg.model.head, num_classes=3)), pretrained_backbone=False)
    out = model(torch.randn(1, 3, 256, 256))  # P7 is 2x2: train-mode BN needs > 1 value
    losses = model.loss(out, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert float(losses["loss_bbox"]) == 0.0
    assert torch.isfinite(losses["loss_cls"]) and float(losses["loss_cls"]) > 0
    assert float(losses["avg_factor"]) == 1.0


def test_bad_input_is_refused_with_a_clear_error():
    model = build_model(_small(PRESETS["nasfpn_tiny"]).model, pretrained_backbone=False)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.zeros(3, 64, 64))
    out = model.eval()(torch.zeros(1, 3, 128, 128))
    with pytest.raises(ValueError, match="image 0: 2 boxes but 1 labels"):
        model.loss(out, [{"boxes": torch.zeros(2, 4), "labels": torch.zeros(1, dtype=torch.int64)}])


def test_shared_head_convs_count_once_and_separate_bn_per_level():
    model = build_model(PRESETS["retinanet_r50_fpn_crop640_50e"].model, pretrained_backbone=False)
    head = model.head
    assert len(head.cls_convs) == 4 and len(head.cls_norms) == 5 and len(head.cls_norms[0]) == 4
    assert count_params(head) == 6_481_652
    # Focal prior: sigmoid(bias) = 0.01.
    assert torch.allclose(torch.sigmoid(head.retina_cls.bias), torch.full((720,), 0.01), atol=1e-6)


def test_anchors_on_a_small_grid_by_hand():
    gen = AnchorGenerator(strides=(8,), octave_base_scale=4, scales_per_octave=1, ratios=(1.0,))
    (anchors,) = gen.grid_anchors([(3, 3)])
    # One 32x32 anchor centred on each cell corner (x*8, y*8), row-major over (y, x).
    expected = torch.tensor(
        [[x * 8 - 16, y * 8 - 16, x * 8 + 16, y * 8 + 16] for y in range(3) for x in range(3)], dtype=torch.float32
    )
    assert torch.equal(anchors, expected)
    gen = AnchorGenerator(strides=(16,), octave_base_scale=4, scales_per_octave=3, ratios=(0.5, 1.0, 2.0))
    (anchors,) = gen.grid_anchors([(1, 1)])
    wh = anchors[:, 2:] - anchors[:, :2]
    # Index = ratio * 3 + scale; ratio is h / w.
    for a in range(9):
        r, s = (0.5, 1.0, 2.0)[a // 3], 4 * 2 ** ((a % 3) / 3)
        assert math.isclose(float(wh[a, 0]), 16 * s / math.sqrt(r), rel_tol=1e-6)
        assert math.isclose(float(wh[a, 1]), 16 * s * math.sqrt(r), rel_tol=1e-6)
    assert gen.grid_anchors([(1, 1)])[0] is anchors  # cached per size


def test_valid_flags_follow_pad_shape():
    gen = AnchorGenerator(strides=(8, 16), octave_base_scale=4, scales_per_octave=1, ratios=(1.0,))
    flags = gen.valid_flags([(4, 4), (2, 2)], pad_hw=(17, 8))
    level0 = flags[:16].reshape(4, 4)
    assert level0[:3, :1].all() and not level0[3].any() and not level0[:, 1:].any()  # ceil(17/8)=3 rows, 1 col
    assert flags[16:].reshape(2, 2).tolist() == [[True, False], [True, False]]  # ceil(17/16)=2, ceil(8/16)=1


def test_assigner_on_two_boxes():
    anchors = torch.tensor(
        [[0, 0, 10, 10], [0, 0, 20, 20], [100, 100, 110, 110], [5, 5, 15, 15], [200, 200, 210, 210]],
        dtype=torch.float32,
    )
    gts = torch.tensor([[0, 0, 10, 10], [100, 100, 130, 130]], dtype=torch.float32)
    assigned = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.4)(anchors, gts)
    # anchor 0: IoU 1 with gt 0; anchor 1: IoU 0.25 -> ignored? no: < 0.4 -> background;
    # anchor 2: IoU 100/900 with gt 1, but it is gt 1's best anchor -> low-quality match;
    # anchor 3: IoU 25/175 -> background; anchor 4: no overlap -> background.
    assert assigned.tolist() == [0, BACKGROUND, 1, BACKGROUND, BACKGROUND]
    assigned = MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.2, match_low_quality=False)(anchors, gts)
    assert assigned.tolist() == [0, IGNORE, BACKGROUND, BACKGROUND, BACKGROUND]  # 0.25 is between 0.2 and 0.5
    valid = torch.tensor([True, True, False, True, True])
    assert MaxIoUAssigner()(anchors, gts, valid)[2] == IGNORE


def test_box_coder_round_trip_and_clamp():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 45.0, 25.0]])
    gt = torch.tensor([[1.0, 2.0, 9.0, 30.0], [0.0, 0.0, 50.0, 50.0]])
    deltas = encode(anchors, gt)
    assert torch.allclose(decode(anchors, deltas), gt, atol=1e-5)
    huge = decode(anchors[:1], torch.tensor([[0.0, 0.0, 100.0, 0.0]]))
    assert math.isclose(float(huge[0, 2] - huge[0, 0]), 10 * 1000 / 16, rel_tol=1e-5)  # dw clamped at log(1000/16)
    clipped = decode(anchors[:1], torch.tensor([[0.0, 0.0, 2.0, 2.0]]), max_shape=(15, 12))
    assert clipped.tolist() == [[0.0, 0.0, 12.0, 15.0]]
    assert torch.allclose(box_iou(gt, gt).diagonal(), torch.ones(2))
