"""The check of an exported file against eager PyTorch (``verify_export``).

The file runs behind the runtime users run: ``end2end`` and ``raw`` ONNX files through
``OnnxDetector.predict`` (pre-processing, padding, batching and, for ``raw``, post-processing
included); a ``.pt2`` program, which holds the network only, on the same input, its head maps
post-processed by ``models/postprocess.py``. Eager PyTorch runs the model on the input the file
got (for a fixed-size file: padded to its square). Detections are matched one by one: same
label, boxes within ``box_rtol`` (relative, at least 1 px scale), scores within ``score_atol``.
For ``raw`` and ``.pt2`` files the head maps (and ``raw``'s anchors) are compared too.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasfpn.core.config import Config, TestConfig
from nasfpn.core.structures import ImageMeta
from nasfpn.deploy.contract import input_padding, prepare_inputs, read_metadata
from nasfpn.deploy.onnx_runtime import OnnxDetector
from nasfpn.models.detector import RetinaNet


@dataclass(frozen=True)
class Tolerances:
    """How close an exported file's outputs must be to eager PyTorch's."""

    box_rtol: float = 1e-3
    box_atol: float = 0.0
    """A box coordinate matches when |box - reference| <= box_atol + box_rtol * max(|reference|, 1)."""
    score_atol: float = 1e-4
    map_atol: float = 1e-3
    """Raw head outputs: |value - reference| <= map_atol * max(1, max |reference|)."""
    min_matched: float = 1.0
    """Fraction of eager detections that must find their match."""

    @staticmethod
    def for_precision(precision: str) -> Tolerances:
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
    """Eager network and post-processing."""
    seconds_exported: float = 0.0
    """The exported file: ``OnnxDetector.predict`` (pre-processing included), or a program's run
    and post-processing."""

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


def match_detections(
    ref: dict[str, np.ndarray], got: dict[str, np.ndarray], tol: Tolerances, report: ParityReport, where: str = ""
) -> None:
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
        fits = (
            (
                (np.abs(gb - rb[i]) <= tol.box_atol + tol.box_rtol * scale).all(axis=1)
                & (gl == rl[i])
                & (np.abs(gs - rs[i]) <= tol.score_atol)
                & ~used
            )
            if len(gs)
            else np.zeros(0, dtype=bool)
        )
        if not fits.any():
            report.unmatched.append(
                f"{where}eager #{i} label {int(rl[i])} score {rs[i]:.5f} box [{', '.join(f'{v:.1f}' for v in rb[i])}]"
            )
            continue
        j = int(np.flatnonzero(fits)[np.argmin(diff[fits])])
        used[j] = True
        report.matched += 1
        report.max_box_abs = max(report.max_box_abs, float(np.abs(gb[j] - rb[i]).max()))
        report.max_box_rel = max(report.max_box_rel, float((np.abs(gb[j] - rb[i]) / scale).max()))
        report.max_score_abs = max(report.max_score_abs, float(abs(gs[j] - rs[i])))
    for k in np.flatnonzero(~used):
        report.unmatched.append(f"{where}exported #{k} label {int(gl[k])} score {gs[k]:.5f}")


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


def _eager(model: RetinaNet, batch: torch.Tensor, metas: list[ImageMeta], test_cfg: TestConfig):
    with torch.no_grad():
        outputs = model(batch)
        dets = model.postprocess(outputs, metas, test_cfg)
    maps = [m.numpy() for m in outputs[0]] + [m.numpy() for m in outputs[1]]
    return maps, [{k: v.numpy() for k, v in d.items()} for d in dets]


def _program_detections(
    maps: Sequence[np.ndarray], model: RetinaNet, metas: list[ImageMeta], test_cfg: TestConfig
) -> list[dict[str, np.ndarray]]:
    """Our post-processing applied to a program's head maps (cls p3..p7, deltas p3..p7)."""
    levels = len(model.anchor_generator.strides)
    tensors = [torch.from_numpy(np.ascontiguousarray(m)) for m in maps[: 2 * levels]]
    dets = model.postprocess((tensors[:levels], tensors[levels:]), metas, test_cfg)
    return [{k: v.numpy() for k, v in d.items()} for d in dets]


def _runs(images: Sequence[np.ndarray], batch: int | None, dynamic_size: bool) -> list[list[np.ndarray]]:
    """The images of each checked run. A fixed batch is filled with repeats of the last image.
    A dynamic-size file runs each image alone (repeated to fill a fixed batch): the runtime runs
    together only images of one padded shape."""
    if dynamic_size:
        return [[image] * (batch or 1) for image in images]
    images = list(images)
    step = batch or len(images)
    if len(images) % step:
        images += [images[-1]] * (step - len(images) % step)
    return [images[i : i + step] for i in range(0, len(images), step)]


def _add_map_difference(
    report: ParityReport,
    got: Sequence[np.ndarray],
    ref: Sequence[np.ndarray],
    extra: Sequence[tuple[np.ndarray, np.ndarray]] = (),
) -> None:
    """Largest head-map difference (and of ``extra`` pairs, e.g. anchors) into ``report``."""
    diff = max(float(np.abs(a - b).max()) for a, b in zip(got, ref))
    scale = max(1.0, max(float(np.abs(b).max()) for b in ref))
    report.max_map_abs = max(report.max_map_abs or 0.0, diff, *(float(np.abs(a - b).max()) for a, b in extra))
    report.map_limit = max(report.map_limit, report.tolerances.map_atol * scale)


def verify_export(
    path: str | Path,
    model: RetinaNet,
    config: Config,
    images: Sequence[np.ndarray] | None = None,
    tolerances: Tolerances | None = None,
    score_thr: float | None = None,
) -> ParityReport:
    """Run the exported file and eager PyTorch on ``images`` (default: ``sample_images``) and compare.

    Returns the report; ``report.ok`` tells whether they agree.
    """
    path = Path(path)
    meta = read_metadata(path)
    hw, min_side = input_padding(meta)
    dynamic_size = hw is None
    if images is None:
        # A dynamic-size file is checked at three input shapes.
        images = sample_images(config, 3 if dynamic_size else max(2, meta["batch"] or 2))
    test_cfg = config.model.test if score_thr is None else replace(config.model.test, score_thr=score_thr)
    model = model.eval()
    report = ParityReport(tolerances=tolerances or Tolerances.for_precision(meta["precision"]))
    exported = torch.export.load(str(path)).module() if path.suffix == ".pt2" else OnnxDetector(path, config)
    for chunk in _runs(list(images), meta["batch"], dynamic_size):
        batch, _, metas = prepare_inputs(chunk, config, hw, min_side)
        t0 = time.perf_counter()
        ref_maps, ref_dets = _eager(model, batch, metas, test_cfg)
        report.seconds_eager += time.perf_counter() - t0
        t0 = time.perf_counter()
        got_dets: list[dict[str, Any]]
        if isinstance(exported, OnnxDetector):
            got_dets = exported.predict(chunk, score_thr=test_cfg.score_thr, batch_size=len(chunk))
        else:  # a program: head maps out
            with torch.no_grad():
                maps = [m.numpy() for m in exported(batch)]
            got_dets = _program_detections(maps, model, metas, test_cfg)
        report.seconds_exported += time.perf_counter() - t0
        if not isinstance(exported, OnnxDetector):
            _add_map_difference(report, maps, ref_maps)
        elif exported.contract == "raw":
            # predict returns detections only: the maps come from a run of the runtime's session.
            outputs = exported.session.run(None, {"images": batch.numpy()})
            levels = len(ref_maps) // 2
            anchors = model.anchors(([torch.from_numpy(m) for m in ref_maps[:levels]], []))
            _add_map_difference(
                report,
                outputs[: 2 * levels],
                ref_maps,
                [(a, b.numpy()) for a, b in zip(outputs[2 * levels :], anchors)],
            )
        for i, (ref, got) in enumerate(zip(ref_dets, got_dets)):
            match_detections(ref, got, report.tolerances, report, where=f"image {report.images + i}: ")
        report.images += len(chunk)
    return report
