"""Running an exported ONNX detector with onnxruntime, behind the ``Predictor`` interface of ``Detector``.

    det = OnnxDetector("model.onnx")             # the file carries its config
    results = det.predict([rgb_uint8_array])      # same inputs and dicts as Detector.predict

Both ONNX contracts work: ``end2end`` files run as they are (score threshold passed as the
``score_thr`` input); for ``raw`` files the head outputs go through ``models/postprocess.py``.
Pre-processing is ``nasfpn.data``'s, then zero padding to the file's fixed input size, so a
non-square image sees more padding than in ``Detector.predict`` (which pads to ``pad_divisor``);
detections of such images differ, those of square images agree. A file exported with
``dynamic_size`` is padded as ``Detector.predict`` pads (to at least its ``min_side``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from nasfpn.core.config import Config, config_from_dict
from nasfpn.core.presets import resolve_config
from nasfpn.deploy.contract import LEVEL_NAMES, end2end_detections, input_padding, metadata_from_props, prepare_inputs
from nasfpn.deploy.inputs import ImageInput, ImageList, image_batch

# Test-time settings fixed inside an end2end graph (score_thr is an input, so it may change).
_BAKED_TEST_FIELDS = ("nms_pre", "nms_iou", "max_per_img", "min_bbox_size", "wh_ratio_clip")


def _check_compatible(meta: dict[str, Any], config: Config) -> None:
    """Raise ``ValueError`` if ``config`` asks for something the exported graph cannot do."""
    stored = config_from_dict(meta["config"])
    problems = []
    # A dynamic-size graph runs at any input size: only its padding rule and normalisation are fixed.
    fixed = ("pad_divisor", "mean", "std") if meta.get("dynamic_size") else ("image_size", "pad_divisor", "mean", "std")
    for name in fixed:
        if getattr(config.data, name) != getattr(stored.data, name):
            problems.append(f"data.{name} {getattr(config.data, name)} (file: {getattr(stored.data, name)})")
    if config.model.head.num_classes != stored.model.head.num_classes:
        problems.append(
            f"model.head.num_classes {config.model.head.num_classes} (file: {stored.model.head.num_classes})"
        )
    if meta["contract"] == "end2end":
        for name in _BAKED_TEST_FIELDS:
            if getattr(config.model.test, name) != getattr(stored.model.test, name):
                problems.append(
                    f"model.test.{name} {getattr(config.model.test, name)} "
                    f"(fixed in the graph: {getattr(stored.model.test, name)})"
                )
    if problems:
        raise ValueError("the config does not fit the exported model: " + "; ".join(problems))


def ort_session(path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None):
    """An onnxruntime session; ``threads`` limits intra-op threads (default: onnxruntime's)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # The optional score_thr input is an initializer listed as an input; onnxruntime warns
    # about that at every load. It is intended, so only errors are logged.
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))


class OnnxDetector:
    """An exported ONNX detector with the ``predict`` contract and ``class_names`` of ``Detector``.

    ``model`` (a preset name or config file), ``overrides`` and ``config_file`` may refine the
    config stored in the file, within what the graph allows (e.g. ``model.test.score_thr``);
    anything else raises ``ValueError``.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        model: str | Config | None = None,
        overrides: list[str] | None = None,
        config_file: str | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX file {self.path} does not exist")
        self.session = ort_session(self.path, threads, providers)
        meta = metadata_from_props(self.session.get_modelmeta().custom_metadata_map, self.path)
        self.metadata = meta
        config = resolve_config(model, overrides, config_file, file_config=meta["config"])
        _check_compatible(meta, config)
        self.config = config
        self.contract: str = meta["contract"]
        self.input_hw: tuple[int, int] | None
        """The file's fixed input size, or None for a dynamic-size file."""
        self.input_hw, self.min_side = input_padding(meta)
        self.batch: int | None = meta["batch"]
        """Images per run fixed in the file, or None for any batch."""
        self.class_names: tuple[str, ...] = tuple(config.data.class_names) or tuple(meta["class_names"])
        self.category_ids: tuple[int, ...] = tuple(config.data.category_ids) or tuple(meta["category_ids"])

    def _run_end2end(self, batch: np.ndarray, info: np.ndarray, score_thr: float) -> list[dict[str, np.ndarray]]:
        outputs = self.session.run(
            None, {"images": batch, "image_info": info, "score_thr": np.array(score_thr, dtype=np.float32)}
        )
        return end2end_detections(*outputs)

    def _run_raw(self, batch: np.ndarray, metas, score_thr: float) -> list[dict[str, np.ndarray]]:
        from nasfpn.models.postprocess import postprocess

        outputs = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, {"images": batch})))
        cls_maps = [torch.from_numpy(outputs[f"cls_logits_{n}"]) for n in LEVEL_NAMES]
        reg_maps = [torch.from_numpy(outputs[f"box_deltas_{n}"]) for n in LEVEL_NAMES]
        anchors = [torch.from_numpy(outputs[f"anchors_{n}"]) for n in LEVEL_NAMES]
        cfg = replace(self.config.model.test, score_thr=score_thr)
        dets = postprocess(cls_maps, reg_maps, anchors, metas, self.config.model.head.num_classes, cfg)
        return [{k: v.numpy() for k, v in d.items()} for d in dets]

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The padded ``(H, W)`` input of an image of ``height x width``: the file's fixed size, or
        as ``Detector.input_shape`` (at least ``min_side``) for a dynamic-size file."""
        if self.input_hw is not None:
            return self.input_hw
        from nasfpn.data.batching import padded_input_shape

        d = self.config.data
        return padded_input_shape(height, width, d.image_size, d.pad_divisor, self.min_side)

    @overload
    def predict(self, images: ImageInput, score_thr: float | None = None, batch_size: int = 8) -> dict[str, Any]: ...
    @overload
    def predict(
        self, images: ImageList, score_thr: float | None = None, batch_size: int = 8
    ) -> list[dict[str, Any]]: ...
    def predict(
        self, images: ImageInput | Sequence[ImageInput], score_thr: float | None = None, batch_size: int = 8
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Detect objects in one RGB image or a list of them, in the forms ``Detector.predict`` takes
        (paths, PIL images, uint8 ``HxWx3`` arrays, ``CxHxW`` / ``HxWx3`` tensors; ``deploy.inputs``).

        One image gives one dict, a list one dict per image in input order: ``boxes`` float ``(D, 4)``
        xyxy in original pixels, ``scores``, ``labels`` (0-based) and ``category_ids``, all numpy
        arrays. As in ``Detector.predict``, images run together only when they pad to the same input shape.
        """
        from nasfpn.data.batching import group_by_shape
        from nasfpn.data.transforms import to_uint8_chw

        thr = self.config.model.test.score_thr if score_thr is None else float(score_thr)
        arrays, single = image_batch(images)
        chw = [to_uint8_chw(image, i) for i, image in enumerate(arrays)]
        keys = [self.input_shape(*im.shape[-2:]) for im in chw]
        cat_ids = np.asarray(self.category_ids, dtype=np.int64)
        out: list[dict[str, Any]] = [{}] * len(chw)
        for members in group_by_shape(keys, self.batch or max(1, batch_size)):
            batch, info, metas = prepare_inputs([chw[i] for i in members], self.config, self.input_hw, self.min_side)
            real = len(members)
            if self.batch is not None and real < self.batch:
                # A fixed-batch file: fill the batch with blank images, drop their results.
                fill = self.batch - real
                batch = torch.cat([batch, batch.new_zeros((fill, *batch.shape[1:]))])
                info = torch.cat([info, info[-1:].expand(fill, -1)])
                metas = metas + [metas[-1]] * fill
            if self.contract == "end2end":
                dets = self._run_end2end(batch.numpy(), info.numpy(), thr)
            else:
                dets = self._run_raw(batch.numpy(), metas, thr)
            for i, d in zip(members, dets[:real]):
                labels = d["labels"].astype(np.int64)
                out[i] = {
                    "boxes": d["boxes"].astype(np.float32),
                    "scores": d["scores"].astype(np.float32),
                    "labels": labels,
                    "category_ids": cat_ids[labels],
                }
        return out[0] if single else out

    __call__ = predict
