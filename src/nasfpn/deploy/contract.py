"""What an exported file promises: its metadata, inputs, padding rule and outputs.

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

    The graph runs the steps of ``models/postprocess.py`` (``nasfpn.deploy.graphs``): per level,
    sigmoid, the top ``nms_pre`` (anchor, class) pairs, score > score_thr; decode (dw, dh clamped),
    clip to (img_w, img_h), divide by the scale factors, drop boxes with width or height <=
    min_bbox_size; class-aware greedy NMS (ONNX NonMaxSuppression, one class per row: a box is
    suppressed by a higher-scored box of its class with IoU > nms_iou); keep the ``max_per_img`` best.

ONNX ``raw``: ``images`` (as above) in; per level l = 3..7 the head maps and anchors out.

      cls_logits_p{l}  float32 (B, A*C, H_l, W_l)   channel = anchor * C + class (before sigmoid)
      box_deltas_p{l}  float32 (B, A*4, H_l, W_l)   channel = anchor * 4 + (dx, dy, dw, dh)
      anchors_p{l}     float32 (H_l*W_l*A, 4)       xyxy input pixels, row = (y * W_l + x) * A + a

``torch-export``: ``images`` in, ``(cls_logits_p3..p7, box_deltas_p3..p7)`` out, as in ``raw``
without the anchors. Loads without this package: ``torch.export.load(path).module()(images)``.

``precision="fp16"`` runs the network in half precision; inputs, outputs and the post-processing
stay float32.

Every ONNX file carries its config in ``metadata_props["nasfpn"]`` (JSON: contract, input size,
batch, precision, mean/std, class names, category ids and the full model config), a ``.pt2``
file in its extra file ``nasfpn.json``; ``read_metadata`` reads either.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasfpn.core.config import Config, config_to_dict

FORMATS = ("onnx", "torch-export")
CONTRACTS = ("end2end", "raw")
EXPORT_PRECISIONS = ("fp32", "fp16")
METADATA_KEY = "nasfpn"
"""The ONNX ``metadata_props`` entry holding the metadata (JSON)."""
PROGRAM_METADATA_FILE = "nasfpn.json"
"""The extra file of a ``.pt2`` program holding the metadata (JSON)."""
METADATA_VERSION = 1
LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")

END2END_INPUTS = ("images", "image_info", "score_thr")
END2END_OUTPUTS = ("boxes", "scores", "labels", "num_detections")
RAW_INPUTS = ("images",)
RAW_OUTPUTS = tuple(f"{kind}_{level}" for kind in ("cls_logits", "box_deltas", "anchors") for level in LEVEL_NAMES)


def export_input_hw(config: Config) -> tuple[int, int]:
    """(H, W) of a fixed-size file's input: image_size rounded up to pad_divisor."""
    d = config.data
    side = int(math.ceil(d.image_size / d.pad_divisor) * d.pad_divisor) if d.pad_divisor > 1 else d.image_size
    return side, side


def min_input_side(config: Config) -> int:
    """Smallest side of a dynamic-size input: the first multiple of ``pad_divisor`` above the top
    level's stride (its map must be at least 2x2: the exported graph cannot take a 1-cell level)."""
    top = max(config.model.anchors.strides)
    d = max(1, config.data.pad_divisor)
    return (top // d + 1) * d


def default_dynamic_size(config: Config) -> bool:
    """Whether the file that reproduces eager padding best has a dynamic size: yes, unless the
    largest padded side (``image_size`` rounded up to ``pad_divisor``) is below ``min_side``.
    Then a dynamic graph would pad every image beyond what PyTorch uses, while a fixed square is
    what PyTorch pads every image to when ``image_size <= pad_divisor`` (e.g. ``nasfpn_tiny`` at
    128 px with divisor 128)."""
    return export_input_hw(config)[0] >= min_input_side(config)


def export_metadata(
    config: Config,
    contract: str,
    fmt: str,
    batch: int | None,
    precision: str,
    class_names: Sequence[str],
    category_ids: Sequence[int],
    opset: int | None,
    dynamic_size: bool = False,
) -> dict[str, Any]:
    """The metadata written into an exported file (see the module docstring)."""
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


def metadata_from_props(props: Mapping[str, str], path: str | Path) -> dict[str, Any]:
    """The metadata among an ONNX file's ``metadata_props`` (as a mapping); ``ValueError`` if absent."""
    stored = props.get(METADATA_KEY)
    if stored is None:
        raise ValueError(f"{path} was not exported by nasfpn (no '{METADATA_KEY}' entry in its metadata)")
    return json.loads(stored)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata (contract, input size, config, ...) of an exported ONNX or ``.pt2`` file."""
    path = Path(path)
    if path.suffix == ".pt2":
        extra = {PROGRAM_METADATA_FILE: ""}
        torch.export.load(str(path), extra_files=extra)
        if not extra[PROGRAM_METADATA_FILE]:
            raise ValueError(f"{path} was not exported by nasfpn (no {PROGRAM_METADATA_FILE} inside)")
        return json.loads(extra[PROGRAM_METADATA_FILE])
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return metadata_from_props({p.key: p.value for p in proto.metadata_props}, path)


def input_padding(meta: dict[str, Any]) -> tuple[tuple[int, int] | None, int]:
    """``(input_hw, min_side)`` of an exported file's metadata for ``prepare_inputs``: its fixed
    input size, or None and the smallest side for a dynamic-size file."""
    if meta.get("dynamic_size"):
        return None, int(meta["min_side"])
    return (int(meta["input_hw"][0]), int(meta["input_hw"][1])), 0


def prepare_inputs(
    images: Sequence[np.ndarray | torch.Tensor], config: Config, input_hw: tuple[int, int] | None, min_side: int = 0
):
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
    info = torch.tensor(
        [[m.img_shape[0], m.img_shape[1], m.scale_factor[0], m.scale_factor[1]] for m in metas], dtype=torch.float32
    )
    return batch, info, metas


def end2end_detections(
    boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, num_detections: np.ndarray
) -> list[dict[str, np.ndarray]]:
    """The outputs of an ``end2end`` run as one dict per image, the padding rows dropped."""
    return [
        {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
        for i, n in enumerate(np.asarray(num_detections).tolist())
    ]
