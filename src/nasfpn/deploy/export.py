"""Export a detector for deployment, and check the exported file against eager PyTorch.

Formats
-------
``onnx`` with one of two contracts, and ``torch-export`` (a ``torch.export`` program, ``.pt2``).
By default (``dynamic_size``) H and W are any multiples of ``pad_divisor`` from ``min_side`` up
(the smallest such multiple above the top level's stride, 128: P7 must be at least 2x2 cells)
and the anchors are computed in the graph, so an image is padded exactly as in eager PyTorch and
detections agree for every aspect ratio. A fixed-size file (``dynamic_size=False``) has H = W =
``image_size`` rounded up to ``pad_divisor`` (640 for both crop-640 presets): a non-square image
is padded to that square, more than in PyTorch, and its detections differ. B is the batch given
at export, or any batch with ``dynamic_batch``. ``docs/deployment.md`` states the whole contract.

ONNX ``end2end`` (default): pre-processed images in, final detections out, NMS in the graph.

    inputs
      images          float32 (B, 3, H, W)  RGB, (pixel - mean) / std in 0..255 units, of the image
                                            resized with kept aspect ratio to fit image_size x
                                            image_size, placed top-left; the rest is 0 (padding).
      image_info      float32 (B, 4)        (img_h, img_w, scale_x, scale_y) per image: the resized
                                            size before padding (boxes are clipped to it) and
                                            resized / original size along x and y.
      score_thr       float32 ()            optional; defaults to the config's test score_thr.
    outputs (K = max_per_img, 100 for the presets)
      boxes           float32 (B, K, 4)     xyxy in original-image pixels, by descending score
      scores          float32 (B, K)
      labels          int64   (B, K)        0-based class index
      num_detections  int64   (B,)          rows past it are padding: boxes 0, scores 0, labels -1

    The graph runs the steps of ``models/postprocess.py``: per level, sigmoid, the top ``nms_pre``
    (anchor, class) pairs, score > score_thr; decode (dw, dh clamped), clip to (img_w, img_h),
    divide by the scale factors, drop boxes with width or height <= min_bbox_size; class-aware
    greedy NMS (ONNX NonMaxSuppression, one class per row: a box is suppressed by a higher-scored
    box of its class with IoU > nms_iou); keep the ``max_per_img`` best.

ONNX ``raw``: ``images`` (as above) in; per level l = 3..7 the head maps and anchors out.

      cls_logits_p{l}  float32 (B, A*C, H_l, W_l)   channel = anchor * C + class (before sigmoid)
      box_deltas_p{l}  float32 (B, A*4, H_l, W_l)   channel = anchor * 4 + (dx, dy, dw, dh)
      anchors_p{l}     float32 (H_l*W_l*A, 4)       xyxy input pixels, row = (y * W_l + x) * A + a

``torch-export``: ``images`` in, ``(cls_logits_p3..p7, box_deltas_p3..p7)`` out, as in ``raw``
without the anchors. Loads without this package: ``torch.export.load(path).module()(images)``.

``precision="fp16"`` runs the network in half precision; inputs, outputs and the post-processing
stay float32. The check then uses looser tolerances (``Tolerances.for_precision``).

Every ONNX file carries its config in ``metadata_props["nasfpn"]`` (JSON: contract, input size,
batch, precision, mean/std, class names, category ids and the full model config), so
``nasfpn.deploy.onnx_runtime.OnnxDetector`` needs nothing else.

The check (``verify_export``) runs the file (onnxruntime, or the loaded program) and eager
PyTorch on the same input and matches detections one by one: same label, boxes within
``box_rtol`` (relative, at least 1 px scale), scores within ``score_atol``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision
from torch import nn

from nasfpn.core.config import Config, TestConfig, config_to_dict
from nasfpn.core.fileio import atomic_path
from nasfpn.models.anchors import level_anchors
from nasfpn.models.boxes import decode
from nasfpn.models.detector import RetinaNet

FORMATS = ("onnx", "torch-export")
CONTRACTS = ("end2end", "raw")
EXPORT_PRECISIONS = ("fp32", "fp16")
METADATA_KEY = "nasfpn"
METADATA_VERSION = 1
LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")


class ExportError(RuntimeError):
    """The export failed, or the exported file disagrees with eager PyTorch."""


# --------------------------------------------------------------------------- NMS as one ONNX op


@torch.library.custom_op("nasfpn::multiclass_nms", mutates_args=())
def multiclass_nms(boxes: torch.Tensor, scores: torch.Tensor, score_thr: torch.Tensor, max_per_class: int,
                   iou_threshold: float) -> torch.Tensor:
    """ONNX ``NonMaxSuppression`` (center_point_box=0) in PyTorch.

    ``boxes`` float ``(B, M, 4)`` xyxy, ``scores`` float ``(B, C, M)``. Per image and class, the
    boxes with score > ``score_thr`` go through greedy NMS (suppressed at IoU > ``iou_threshold``);
    at most ``max_per_class`` survive. Returns int64 ``(S, 3)`` rows ``(image, class, box index)``,
    by image, then class, then descending score.
    """
    out = []
    for b in range(scores.shape[0]):
        for c in range(scores.shape[1]):
            s = scores[b, c].float()
            idx = (s > score_thr).nonzero().squeeze(1)
            keep = idx[torchvision.ops.nms(boxes[b, idx].float(), s[idx], iou_threshold)[:max_per_class]]
            out.append(torch.stack([torch.full_like(keep, b), torch.full_like(keep, c), keep], dim=1))
    return torch.cat(out) if out else boxes.new_zeros((0, 3), dtype=torch.int64)


@multiclass_nms.register_fake
def _multiclass_nms_fake(boxes, scores, score_thr, max_per_class, iou_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def _multiclass_nms_onnx(boxes, scores, score_thr, max_per_class: int, iou_threshold: float):
    """The translation of ``nasfpn::multiclass_nms`` for the dynamo ONNX exporter."""
    from onnxscript import opset18 as op

    return op.NonMaxSuppression(
        boxes,
        scores,
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Reshape(score_thr, op.Constant(value_ints=[1])),
        center_point_box=0,
    )


# --------------------------------------------------------------------------- graph post-processing


def postprocess_fixed(cls_maps: Sequence[torch.Tensor], reg_maps: Sequence[torch.Tensor],
                      anchors: Sequence[torch.Tensor], image_info: torch.Tensor, score_thr: torch.Tensor,
                      num_classes: int, cfg: TestConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``models.postprocess.postprocess`` with fixed-size outputs, for export.

    ``image_info`` float ``(B, 4)`` = (img_h, img_w, scale_x, scale_y); ``score_thr`` a 0-d float
    tensor. Returns ``boxes (B, K, 4)``, ``scores (B, K)``, ``labels (B, K)`` int64 and
    ``num_detections (B,)`` int64, K = ``min(max_per_img, candidates)``; rows past
    ``num_detections`` are 0 (labels -1).
    """
    if cfg.max_per_img <= 0:
        raise ValueError("export needs test.max_per_img > 0 (the outputs have a fixed size)")
    n = cls_maps[0].shape[0]
    scores_all, labels_all, deltas_all, anchors_all = [], [], [], []
    for cls, reg, anc in zip(cls_maps, reg_maps, anchors):
        logits = cls.float().permute(0, 2, 3, 1).reshape(n, -1)  # (B, HWA*C)
        deltas = reg.float().permute(0, 2, 3, 1).reshape(n, -1, 4)  # (B, HWA, 4)
        # sym_min: with a dynamic input size the level's length is only known at run time.
        k = logits.shape[1] if cfg.nms_pre <= 0 else torch.sym_min(cfg.nms_pre, logits.shape[1])
        # Ranked by logit (sigmoid is monotonic), only the k selected go through the sigmoid.
        top, idx = logits.topk(k, dim=1)
        anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
        scores_all.append(top.sigmoid())
        labels_all.append(idx % num_classes)
        deltas_all.append(torch.gather(deltas, 1, anchor_idx[..., None].expand(-1, -1, 4)))
        anchors_all.append(anc[anchor_idx])
    scores = torch.cat(scores_all, 1)  # (B, M)
    labels = torch.cat(labels_all, 1)
    boxes = decode(torch.cat(anchors_all, 1), torch.cat(deltas_all, 1), image_info[:, None, :2], cfg.wh_ratio_clip)
    inv = 1.0 / image_info[:, 2:4]  # (B, 2): 1/sx, 1/sy
    boxes = boxes * torch.cat([inv, inv], dim=1)[:, None, :]
    wh = boxes[..., 2:] - boxes[..., :2]
    valid = (scores > score_thr) & (wh > cfg.min_bbox_size).all(dim=-1)
    scores = torch.where(valid, scores, -1.0)

    # Class-aware NMS as NMS over classes: row c of (B, C, M) holds the scores of class-c boxes only.
    m = scores.shape[1]
    classes = torch.arange(num_classes, device=labels.device)
    per_class = torch.where(labels[:, None, :] == classes[None, :, None], scores[:, None, :], -1.0)
    # Each class keeps at most max_per_img: the image keeps only its max_per_img best anyway.
    selected = torch.ops.nasfpn.multiclass_nms(boxes, per_class, score_thr, cfg.max_per_img, cfg.nms_iou)
    flat = selected[:, 0] * m + selected[:, 2]
    kept = torch.zeros(n * m, dtype=torch.bool, device=scores.device).index_fill(0, flat, True).view(n, m)

    k = torch.sym_min(cfg.max_per_img, m)
    top, order = torch.where(kept, scores, -1.0).topk(k, dim=1)  # (B, K)
    num = kept.sum(dim=1).clamp(max=k)
    row_valid = torch.arange(k, device=num.device)[None, :] < num[:, None]
    out_boxes = torch.gather(boxes, 1, order[..., None].expand(-1, -1, 4))
    out_boxes = torch.where(row_valid[..., None], out_boxes, 0.0)
    out_scores = torch.where(row_valid, top, 0.0)
    out_labels = torch.where(row_valid, torch.gather(labels, 1, order), -1)
    return out_boxes, out_scores, out_labels, num


# --------------------------------------------------------------------------- exported modules


class NetworkGraph(nn.Module):
    """Backbone + neck + head: ``images (B, 3, H, W)`` -> ``(cls_p3..p7, reg_p3..p7)``."""

    def __init__(self, model: RetinaNet, half: bool = False) -> None:
        super().__init__()
        self.model = model
        self.half = half

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.half() if self.half else images
        cls_maps, reg_maps = self.model(x)
        return tuple(m.float() for m in cls_maps) + tuple(m.float() for m in reg_maps)


class GraphAnchors(nn.Module):
    """The anchors of every level inside a graph: constants for a fixed input size
    (``input_hw``), or computed from the head maps' sizes (``input_hw=None``, dynamic size)."""

    def __init__(self, model: RetinaNet, input_hw: tuple[int, int] | None) -> None:
        super().__init__()
        gen = model.anchor_generator
        self.strides = gen.strides
        self.fixed = input_hw is not None
        device = next(model.parameters()).device
        tensors = _anchors(model, input_hw) if self.fixed else [b.to(device) for b in gen.base_anchors]
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t.clone(), persistent=False)

    def forward(self, cls_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        tensors = [getattr(self, f"t{i}") for i in range(len(self.strides))]
        if self.fixed:
            # "+ 0": an output must be computed, not an initializer.
            return [t + 0 for t in tensors]
        return [level_anchors(base, m.shape[-2], m.shape[-1], s) for base, m, s in zip(tensors, cls_maps, self.strides)]


class RawGraph(NetworkGraph):
    """``NetworkGraph`` plus the anchors of every level as outputs."""

    def __init__(self, model: RetinaNet, input_hw: tuple[int, int] | None, half: bool = False) -> None:
        super().__init__(model, half)
        self.anchors = GraphAnchors(model, input_hw)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = super().forward(images)
        return maps + tuple(self.anchors(maps[:len(maps) // 2]))


class EndToEndGraph(nn.Module):
    """``(images, image_info, score_thr)`` -> ``(boxes, scores, labels, num_detections)``."""

    def __init__(self, model: RetinaNet, input_hw: tuple[int, int] | None, test_cfg: TestConfig,
                 half: bool = False) -> None:
        super().__init__()
        self.network = NetworkGraph(model, half)
        self.num_classes = model.num_classes
        self.test_cfg = test_cfg
        self.anchors = GraphAnchors(model, input_hw)

    def forward(self, images: torch.Tensor, image_info: torch.Tensor, score_thr: torch.Tensor):
        maps = self.network(images)
        levels = len(maps) // 2
        return postprocess_fixed(maps[:levels], maps[levels:], self.anchors(maps[:levels]), image_info, score_thr,
                                 self.num_classes, self.test_cfg)


def _anchors(model: RetinaNet, input_hw: tuple[int, int]) -> list[torch.Tensor]:
    with torch.no_grad():
        device = next(model.parameters()).device
        probe = torch.zeros((1, 3, *input_hw), device=device, dtype=next(model.parameters()).dtype)
        outputs = model(probe)
    return [a.clone() for a in model.anchors(outputs)]


# --------------------------------------------------------------------------- export


def export_input_hw(config: Config) -> tuple[int, int]:
    """(H, W) of the exported input: image_size rounded up to pad_divisor."""
    d = config.data
    side = int(math.ceil(d.image_size / d.pad_divisor) * d.pad_divisor) if d.pad_divisor > 1 else d.image_size
    return side, side


def min_input_side(config: Config) -> int:
    """Smallest side of a dynamic-size input: the first multiple of ``pad_divisor`` above the top
    level's stride (its map must be at least 2x2: the exported graph cannot take a 1-cell level)."""
    top = max(config.model.anchors.strides)
    d = max(1, config.data.pad_divisor)
    return (top // d + 1) * d


def export_metadata(config: Config, contract: str, fmt: str, batch: int | None, precision: str,
                    class_names: Sequence[str], category_ids: Sequence[int], opset: int | None,
                    dynamic_size: bool = False) -> dict[str, Any]:
    d = config.data
    return {
        "format": "nasfpn-onnx" if fmt == "onnx" else "nasfpn-torch-export",
        "version": METADATA_VERSION,
        "contract": contract if fmt == "onnx" else "network",
        "input_hw": None if dynamic_size else list(export_input_hw(config)),
        "dynamic_size": dynamic_size,
        "min_side": min_input_side(config) if dynamic_size else None,
        "batch": batch,
        "precision": precision,
        "opset": opset,
        "image_size": d.image_size,
        "pad_divisor": d.pad_divisor,
        "mean": list(d.mean),
        "std": list(d.std),
        "class_names": list(class_names),
        "category_ids": list(category_ids),
        "max_detections": config.model.test.max_per_img,
        "config": config_to_dict(config),
    }


def _example_inputs(config: Config, contract: str, batch: int, device: torch.device,
                    dynamic_size: bool = False) -> tuple[torch.Tensor, ...]:
    h, w = export_input_hw(config)
    if dynamic_size:
        # Traced at a small non-square size: torch.export would take equal H and W for a rule.
        d = max(1, config.data.pad_divisor)
        h, w = min_input_side(config) + d, min_input_side(config) + 2 * d
    images = torch.zeros((batch, 3, h, w), device=device)
    if contract != "end2end":
        return (images,)
    info = torch.tensor([[h, w, 1.0, 1.0]] * batch, device=device)
    return images, info, torch.tensor(config.model.test.score_thr, device=device)


def _image_dims(config: Config, dynamic_batch: bool, dynamic_size: bool) -> dict[int, Any] | None:
    """torch.export's dynamic dimensions of the ``images`` input (None: all fixed)."""
    dims: dict[int, Any] = {}
    if dynamic_batch:
        dims[0] = torch.export.Dim("batch", min=1, max=1024)
    if dynamic_size:
        d = max(1, config.data.pad_divisor)
        low = min_input_side(config) // d
        dims[2] = d * torch.export.Dim("height_blocks", min=low, max=max(low, 8192 // d))
        dims[3] = d * torch.export.Dim("width_blocks", min=low, max=max(low, 8192 // d))
    return dims or None


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the ONNX IR passes' notes (e.g. constant anchor outputs not deduplicated)."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(model: RetinaNet, config: Config, path: str | Path, *, contract: str = "end2end", batch: int = 1,
                dynamic_batch: bool = False, dynamic_size: bool = True, opset: int = 18, precision: str = "fp32",
                class_names: Sequence[str] = (), category_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Write ``model`` as ONNX (see the module docstring for the contracts); returns the metadata."""
    import onnx

    if contract not in CONTRACTS:
        raise ValueError(f"unknown contract {contract!r}; choose from {CONTRACTS}")
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {EXPORT_PRECISIONS}")
    if opset < 18:
        raise ValueError(f"opset {opset} is not supported: the exporter writes opset 18 or newer")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    path = Path(path)
    graph_model = _prepared_copy(model, precision)
    hw = None if dynamic_size else export_input_hw(config)
    if contract == "end2end":
        module: nn.Module = EndToEndGraph(graph_model, hw, config.model.test, precision == "fp16")
        input_names = ["images", "image_info", "score_thr"]
        output_names = ["boxes", "scores", "labels", "num_detections"]
    else:
        module = RawGraph(graph_model, hw, precision == "fp16")
        input_names = ["images"]
        output_names = ([f"cls_logits_{n}" for n in LEVEL_NAMES] + [f"box_deltas_{n}" for n in LEVEL_NAMES]
                        + [f"anchors_{n}" for n in LEVEL_NAMES])
    module.eval()
    device = next(graph_model.parameters()).device
    # A dynamic batch is traced at 2: torch.export specialises dimensions of size 1.
    args = _example_inputs(config, contract, 2 if dynamic_batch else batch, device, dynamic_size)
    dims = _image_dims(config, dynamic_batch, dynamic_size)
    dynamic_shapes = None
    if dims is not None:
        info_dims = {0: dims[0]} if dynamic_batch else None
        dynamic_shapes = (dims, info_dims, None) if contract == "end2end" else (dims,)
    with atomic_path(path) as tmp:
        with torch.no_grad(), _quiet_exporter(), warnings.catch_warnings():
            # The exporter notes that the dynamic axis of both inputs gets one name: intended.
            warnings.filterwarnings("ignore", message=".*axis name.*will not be used")
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=input_names, output_names=output_names,
                dynamic_shapes=dynamic_shapes, opset_version=opset, verbose=False, external_data=False,
                custom_translation_table={torch.ops.nasfpn.multiclass_nms.default: _multiclass_nms_onnx},
            )
        program.save(str(tmp), external_data=False)
        proto = onnx.load(str(tmp))
        meta = export_metadata(config, contract, "onnx", None if dynamic_batch else batch, precision, class_names,
                               category_ids, opset, dynamic_size)
        _set_metadata(proto, meta)
        if contract == "end2end":
            _make_input_optional(proto, "score_thr", np.array(config.model.test.score_thr, dtype=np.float32))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return meta


def _prepared_copy(model: RetinaNet, precision: str) -> RetinaNet:
    import copy

    out = copy.deepcopy(model).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out.half() if precision == "fp16" else out.float()


def _set_metadata(proto, meta: dict[str, Any]) -> None:
    for prop in list(proto.metadata_props):
        if prop.key == METADATA_KEY:
            proto.metadata_props.remove(prop)
    entry = proto.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(meta)
    proto.producer_name = "nasfpn"


def _make_input_optional(proto, name: str, default: np.ndarray) -> None:
    """Give graph input ``name`` a default: an initializer of the same name (callers may omit it)."""
    from onnx import numpy_helper

    if not any(i.name == name for i in proto.graph.input):
        raise ExportError(f"exported graph has no input {name!r}")
    if proto.ir_version < 4:  # pragma: no cover - the exporter writes IR >= 8
        raise ExportError("an optional input needs ONNX IR version 4 or newer")
    proto.graph.initializer.append(numpy_helper.from_array(default, name))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``nasfpn`` metadata (contract, input size, config, ...) of an exported ONNX file."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} was not exported by nasfpn (no '{METADATA_KEY}' entry in its metadata)")


def export_torch_program(model: RetinaNet, config: Config, path: str | Path, *, batch: int = 1,
                         dynamic_batch: bool = False, dynamic_size: bool = True,
                         precision: str = "fp32") -> dict[str, Any]:
    """Save backbone + neck + head as a ``torch.export`` program (``.pt2``)."""
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {EXPORT_PRECISIONS}")
    path = Path(path)
    module = NetworkGraph(_prepared_copy(model, precision), precision == "fp16").eval()
    device = next(module.parameters()).device
    (images,) = _example_inputs(config, "raw", 2 if dynamic_batch else batch, device, dynamic_size)
    dims = _image_dims(config, dynamic_batch, dynamic_size)
    with torch.no_grad():
        program = torch.export.export(module, (images,), dynamic_shapes=(dims,) if dims else None, strict=False)
    meta = export_metadata(config, "network", "torch-export", None if dynamic_batch else batch, precision, (), (), None,
                           dynamic_size)
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp), extra_files={"nasfpn.json": json.dumps(meta)})
    return meta


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Tolerances:
    box_rtol: float = 1e-3
    box_atol: float = 0.0
    """A box coordinate matches when |box - reference| <= box_atol + box_rtol * max(|reference|, 1)."""
    score_atol: float = 1e-4
    map_atol: float = 1e-3
    """Raw head outputs: |value - reference| <= map_atol * max(1, max |reference|)."""
    min_matched: float = 1.0
    """Fraction of eager detections that must find their match."""

    @staticmethod
    def for_precision(precision: str) -> "Tolerances":
        if precision == "fp16":
            # Half-precision convolutions move logits by ~1e-2 and boxes by up to a pixel; near-ties
            # in the top-k and NMS then go the other way, so a few detections swap for neighbours.
            return Tolerances(box_rtol=1e-2, box_atol=1.0, score_atol=1e-2, map_atol=5e-2, min_matched=0.9)
        return Tolerances()

    def describe(self) -> str:
        box = f"{self.box_rtol:g} rel" + (f" + {self.box_atol:g} px" if self.box_atol else "")
        need = "all" if self.min_matched >= 1 else f"{self.min_matched:.0%}"
        return f"same label, boxes within {box}, scores within {self.score_atol:g}; {need} must match"


@dataclass
class ParityReport:
    """Exported file vs eager PyTorch on the same inputs."""

    images: int = 0
    eager_detections: int = 0
    exported_detections: int = 0
    matched: int = 0
    max_box_abs: float = 0.0
    max_box_rel: float = 0.0
    max_score_abs: float = 0.0
    max_map_abs: float | None = None
    """Raw contract / torch-export: largest head-output (and anchor) difference."""
    map_limit: float = 0.0
    unmatched: list[str] = field(default_factory=list)
    tolerances: Tolerances = field(default_factory=Tolerances)
    seconds_eager: float = 0.0
    seconds_exported: float = 0.0

    @property
    def ok(self) -> bool:
        t = self.tolerances
        if self.max_map_abs is not None and self.max_map_abs > self.map_limit:
            return False
        need = math.ceil(t.min_matched * self.eager_detections - 1e-9)
        if self.matched < need:
            return False
        return t.min_matched < 1.0 or self.exported_detections == self.eager_detections

    def summary(self) -> str:
        t = self.tolerances
        lines = [
            f"{self.images} image(s): {self.eager_detections} eager / {self.exported_detections} exported detections, "
            f"{self.matched} matched ({t.describe()})",
            f"max |box diff| {self.max_box_abs:.3g} px (rel {self.max_box_rel:.3g}), "
            f"max |score diff| {self.max_score_abs:.3g}",
        ]
        if self.max_map_abs is not None:
            lines.append(f"max |head output diff| {self.max_map_abs:.3g} (limit {self.map_limit:.3g})")
        if self.unmatched:
            more = f" (+{len(self.unmatched) - 8} more)" if len(self.unmatched) > 8 else ""
            lines.append("unmatched: " + "; ".join(self.unmatched[:8]) + more)
        return "\n".join(lines)


def match_detections(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: Tolerances,
                     report: ParityReport, where: str = "") -> None:
    """Pair each reference detection with an unused exported one of the same label within the
    tolerances (nearest box first), and add the outcome to ``report``."""
    rb, rs, rl = (np.asarray(ref[k], dtype=np.float64) for k in ("boxes", "scores", "labels"))
    gb, gs, gl = (np.asarray(got[k], dtype=np.float64) for k in ("boxes", "scores", "labels"))
    report.eager_detections += len(rs)
    report.exported_detections += len(gs)
    used = np.zeros(len(gs), dtype=bool)
    for i in range(len(rs)):
        diff = np.abs(gb - rb[i]).max(axis=1) if len(gs) else np.zeros(0)
        scale = np.maximum(np.abs(rb[i]), 1.0)
        fits = ((np.abs(gb - rb[i]) <= tol.box_atol + tol.box_rtol * scale).all(axis=1) & (gl == rl[i])
                & (np.abs(gs - rs[i]) <= tol.score_atol) & ~used) if len(gs) else np.zeros(0, dtype=bool)
        if not fits.any():
            report.unmatched.append(f"{where}eager #{i} label {int(rl[i])} score {rs[i]:.5f} box "
                                    f"[{', '.join(f'{v:.1f}' for v in rb[i])}]")
            continue
        j = int(np.flatnonzero(fits)[np.argmin(diff[fits])])
        used[j] = True
        report.matched += 1
        report.max_box_abs = max(report.max_box_abs, float(np.abs(gb[j] - rb[i]).max()))
        report.max_box_rel = max(report.max_box_rel, float((np.abs(gb[j] - rb[i]) / scale).max()))
        report.max_score_abs = max(report.max_score_abs, float(abs(gs[j] - rs[i])))
    for j in np.flatnonzero(~used):
        report.unmatched.append(f"{where}exported #{j} label {int(gl[j])} score {gs[j]:.5f}")


def sample_images(config: Config, count: int = 2) -> list[np.ndarray]:
    """Deterministic test pictures (shapes on clutter): a small landscape one (scaled up), a large
    portrait one (scaled down), then a square one, so that rescaling, padding and clipping to the
    unpadded image are exercised."""
    from nasfpn.data.synthetic import SyntheticSpec, render_image

    side = config.data.image_size
    sizes = [(side * 3 // 5, side * 4 // 5), (side * 3 // 2, side * 15 // 16), (side, side)]
    out = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        spec = SyntheticSpec(image_size=(max(h, 32), max(w, 32)), max_objects=8)
        out.append(render_image(spec, seed=2024, split="val", index=i)[0])
    return out


def input_padding(meta: dict[str, Any]) -> tuple[tuple[int, int] | None, int]:
    """``(input_hw, min_side)`` of an exported file's metadata for ``prepare_inputs``: its fixed
    input size, or None and the smallest side for a dynamic-size file."""
    if meta.get("dynamic_size"):
        return None, int(meta["min_side"])
    return (int(meta["input_hw"][0]), int(meta["input_hw"][1])), 0


def prepare_inputs(images: Sequence[np.ndarray | torch.Tensor], config: Config, input_hw: tuple[int, int] | None,
                   min_side: int = 0):
    """Pre-process ``images`` as ``nasfpn.data`` does and pad to ``input_hw`` (a fixed-size file),
    or, for a dynamic-size file (``input_hw=None``), to ``pad_divisor`` as eager PyTorch does and
    at least ``min_side``.

    Returns ``(batch float32 (N, 3, H, W), image_info float32 (N, 4), metas)``.
    """
    from nasfpn.data.transforms import preprocess_batch

    d = config.data
    batch, metas = preprocess_batch(list(images), d.image_size, d.pad_divisor, d.mean, d.std)
    h, w = input_hw or (max(batch.shape[-2], min_side), max(batch.shape[-1], min_side))
    if batch.shape[-2] > h or batch.shape[-1] > w:
        raise ValueError(f"pre-processed batch {tuple(batch.shape[-2:])} exceeds the model input {h}x{w}")
    batch = torch.nn.functional.pad(batch, (0, w - batch.shape[-1], 0, h - batch.shape[-2]))
    info = torch.tensor([[m.img_shape[0], m.img_shape[1], m.scale_factor[0], m.scale_factor[1]] for m in metas],
                        dtype=torch.float32)
    return batch, info, metas


def _eager(model: RetinaNet, batch: torch.Tensor, metas, test_cfg: TestConfig):
    with torch.no_grad():
        outputs = model(batch)
        dets = model.postprocess(outputs, metas, test_cfg)
    maps = [m.numpy() for m in outputs[0]] + [m.numpy() for m in outputs[1]]
    return maps, [{k: v.numpy() for k, v in d.items()} for d in dets]


def _raw_detections(maps: Sequence[np.ndarray], model: RetinaNet, metas, test_cfg: TestConfig):
    """Our post-processing applied to exported head maps (cls p3..p7, deltas p3..p7, anything after)."""
    levels = len(model.anchor_generator.strides)
    tensors = [torch.from_numpy(np.ascontiguousarray(m)) for m in maps[: 2 * levels]]
    dets = model.postprocess((tensors[:levels], tensors[levels:]), metas, test_cfg)
    return [{k: v.numpy() for k, v in d.items()} for d in dets]


def verify_export(path: str | Path, model: RetinaNet, config: Config, images: Sequence[np.ndarray] | None = None,
                  tolerances: Tolerances | None = None, score_thr: float | None = None) -> ParityReport:
    """Run the exported file and eager PyTorch on ``images`` (default: ``sample_images``) and compare.

    Returns the report; ``report.ok`` tells whether they agree.
    """
    from nasfpn.deploy.onnx_runtime import ort_session

    path = Path(path)
    fmt = "torch-export" if path.suffix == ".pt2" else "onnx"
    if fmt == "onnx":
        meta = read_metadata(path)
    else:
        meta = _read_program_metadata(path)
    tol = tolerances or Tolerances.for_precision(meta["precision"])
    batch_n = meta["batch"]
    hw, min_side = input_padding(meta)
    dynamic_size = hw is None
    if images is None:
        # A dynamic-size file is checked at three input shapes (one image per run).
        images = sample_images(config, max(3 if dynamic_size else 2, batch_n or 2))
    images = list(images)
    if batch_n is not None and len(images) % batch_n:
        # A fixed-batch file takes exactly ``batch`` images: repeat the last one to fill it up.
        images += [images[-1]] * (batch_n - len(images) % batch_n)
    test_cfg = config.model.test if score_thr is None else replace(config.model.test, score_thr=score_thr)
    model = model.eval()
    report = ParityReport(tolerances=tol)
    step = batch_n or (1 if dynamic_size else len(images))
    session = ort_session(path) if fmt == "onnx" else None
    program = torch.export.load(str(path)).module() if fmt == "torch-export" else None
    for start in range(0, len(images), step):
        chunk = images[start:start + step]
        batch, info, metas = prepare_inputs(chunk, config, hw, min_side)
        t0 = time.perf_counter()
        ref_maps, ref_dets = _eager(model, batch, metas, test_cfg)
        report.seconds_eager += time.perf_counter() - t0
        t0 = time.perf_counter()
        if fmt == "torch-export":
            with torch.no_grad():
                maps = [m.numpy() for m in program(batch)]
            got_dets = _raw_detections(maps, model, metas, test_cfg)
        elif meta["contract"] == "raw":
            maps = session.run(None, {"images": batch.numpy()})
            got_dets = _raw_detections(maps, model, metas, test_cfg)
        else:
            maps = None
            boxes, scores, labels, num = session.run(
                None, {"images": batch.numpy(), "image_info": info.numpy(),
                       "score_thr": np.array(test_cfg.score_thr, dtype=np.float32)})
            got_dets = [{"boxes": boxes[i, :num[i]], "scores": scores[i, :num[i]], "labels": labels[i, :num[i]]}
                        for i in range(len(chunk))]
        report.seconds_exported += time.perf_counter() - t0
        if maps is not None:
            diff = max(float(np.abs(a - b).max()) for a, b in zip(maps, ref_maps))  # head maps only
            scale = max(1.0, max(float(np.abs(b).max()) for b in ref_maps))
            report.max_map_abs = max(report.max_map_abs or 0.0, diff)
            report.map_limit = max(report.map_limit, tol.map_atol * scale)
            if fmt == "onnx" and meta["contract"] == "raw":
                levels = len(ref_maps) // 2
                anchors = model.anchors(([torch.from_numpy(m) for m in ref_maps[:levels]], []))
                for a, b in zip(maps[2 * levels:], anchors):
                    report.max_map_abs = max(report.max_map_abs, float(np.abs(a - b.numpy()).max()))
        for i, (ref, got) in enumerate(zip(ref_dets, got_dets)):
            match_detections(ref, got, tol, report, where=f"image {start + i}: ")
        report.images += len(chunk)
    return report


def _read_program_metadata(path: Path) -> dict[str, Any]:
    extra = {"nasfpn.json": ""}
    torch.export.load(str(path), extra_files=extra)
    if not extra["nasfpn.json"]:
        raise ValueError(f"{path} was not exported by nasfpn (no nasfpn.json inside)")
    return json.loads(extra["nasfpn.json"])


# --------------------------------------------------------------------------- one call


def export(detector, out: str | Path, fmt: str = "onnx", *, contract: str = "end2end", batch: int = 1,
           dynamic_batch: bool = False, dynamic_size: bool = True, opset: int = 18, precision: str = "fp32",
           verify: bool = True, images: Sequence[np.ndarray] | None = None) -> tuple[dict[str, Any], ParityReport | None]:
    """Export a ``nasfpn.deploy.predictor.Detector`` and check the file against eager PyTorch.

    Raises ``ExportError`` with the comparison if they disagree (the file is kept for inspection).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    model, config = detector.model.eval(), detector.config
    if fmt == "onnx":
        meta = export_onnx(model, config, out, contract=contract, batch=batch, dynamic_batch=dynamic_batch,
                           dynamic_size=dynamic_size, opset=opset, precision=precision, class_names=detector.class_names,
                           category_ids=detector.category_ids)
    else:
        meta = export_torch_program(model, config, out, batch=batch, dynamic_batch=dynamic_batch,
                                    dynamic_size=dynamic_size, precision=precision)
    if not verify:
        return meta, None
    report = verify_export(out, model, config, images)
    if not report.ok:
        raise ExportError(f"{out} disagrees with eager PyTorch:\n{report.summary()}")
    return meta, report
