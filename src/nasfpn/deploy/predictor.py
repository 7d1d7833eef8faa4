"""The Python entry point: ``nasfpn.load(...)`` returns a ready ``Detector``.

    det = nasfpn.load("retinanet_r50_nasfpn_crop640_50e", weights="model.safetensors")
    result = det("photo.jpg")                      # one image (path, PIL image, array, tensor): one dict
    results = det.predict([rgb_uint8_array, pil])  # a list: one dict per image

``Predictor`` is what the applications need of a detector, whichever runtime runs it:
``Detector`` (PyTorch) and ``nasfpn.deploy.onnx_runtime.OnnxDetector`` (onnxruntime) both are one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, overload, runtime_checkable

import numpy as np
import torch

from nasfpn.core.classes import label_category_ids, label_names
from nasfpn.core.config import Config, config_to_dict
from nasfpn.core.device import parse_device
from nasfpn.core.presets import resolve_config
from nasfpn.deploy.inputs import ImageInput, ImageList, image_batch
from nasfpn.models import RetinaNet, build_model

if TYPE_CHECKING:
    from nasfpn.deploy.autoprecision import PrecisionChoice

logger = logging.getLogger(__name__)


@runtime_checkable
class Predictor(Protocol):
    """A detector behind any runtime: its config and labels, its input padding and ``predict``."""

    config: Config
    class_names: tuple[str, ...]
    """Label i is ``class_names[i]``."""
    category_ids: tuple[int, ...]
    """Label i is the dataset's category ``category_ids[i]``."""

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The padded ``(H, W)`` input of an image of ``height x width``: images run together only
        when these agree."""
        ...

    @overload
    def predict(self, images: ImageInput, score_thr: float | None = None, batch_size: int = 8) -> dict[str, Any]: ...
    @overload
    def predict(
        self, images: ImageList, score_thr: float | None = None, batch_size: int = 8
    ) -> list[dict[str, Any]]: ...
    def predict(self, images, score_thr=None, batch_size=8):
        """One image (``deploy.inputs``) gives one dict, a list of images one dict per image, in input
        order: ``boxes`` float ``(D, 4)`` xyxy in original pixels, ``scores``, ``labels`` (0-based) and
        ``category_ids``, all numpy arrays."""
        ...


class Detector:
    """A RetinaNet with its config, pre-processing and label names.

    ``optimize`` (the default True, or ``optimize_for_inference`` keyword arguments, see
    ``nasfpn.deploy.fast``) makes ``predict`` run a BN-folded, channels-last fp32 copy built from the
    model's weights at that time (``refresh`` builds it again after they change); ``optimize=False``
    runs the plain model, the reference path. ``model`` stays the plain RetinaNet (for export and
    saving). ``{"precision": "auto", "batch_size": N}`` times fp32 and bf16 (CUDA: fp16 too) at
    the config's input size and batch N (default 1) once per machine and keeps the faster, never a
    path slower than fp32 (``nasfpn.deploy.autoprecision``); ``precision_choice`` then says what
    was chosen and why.
    """

    def __init__(
        self,
        model: RetinaNet,
        config: Config,
        device: str | torch.device = "cpu",
        optimize: bool | dict[str, Any] = True,
    ) -> None:
        self.model = model
        self.config = config
        self.device = parse_device(device)
        self.model.to(self.device).eval()
        self.optimize = optimize
        self.precision_choice: PrecisionChoice | None = None
        self._runner = self._make_runner()
        k = config.model.head.num_classes
        self.class_names = label_names(k, config.data.class_names)
        self.category_ids = label_category_ids(k, config.data.category_ids)
        if len(self.class_names) != k or len(self.category_ids) != k:
            raise ValueError(
                f"config names {len(self.class_names)} classes / {len(self.category_ids)} category ids "
                f"for a head with {k} classes"
            )

    def _make_runner(self):
        if not self.optimize:
            return self.model
        from nasfpn.deploy.fast import optimize_for_inference

        options = dict(self.optimize) if isinstance(self.optimize, dict) else {}
        batch_size = options.pop("batch_size", 1)  # what "auto" measures; not a fast-path option
        if options.get("precision") == "auto":
            from nasfpn.deploy.autoprecision import choose_precision

            choice = choose_precision(self.model, self.config, batch_size, options)
            self.precision_choice = replace(choice, runner=None)
            if choice.runner is not None and not options.get("compile"):
                return choice.runner
            options["precision"] = choice.precision
        return optimize_for_inference(self.model, **options)

    def refresh(self) -> Detector:
        """Build ``runner`` again from ``model``'s current weights (after training or loading them)."""
        self._runner = self._make_runner()
        return self

    @property
    def runner(self) -> torch.nn.Module:
        """The network ``predict`` runs: ``model``, or its optimised copy when ``optimize`` is set."""
        return self._runner

    def to(self, device: str | torch.device) -> Detector:
        self.device = parse_device(device)
        self.model.to(self.device)
        self._runner = self._make_runner()
        return self

    def input_shape(self, height: int, width: int) -> tuple[int, int]:
        """The padded ``(H, W)`` network input of an image of ``height x width``."""
        from nasfpn.data.batching import padded_input_shape

        d = self.config.data
        return padded_input_shape(height, width, d.image_size, d.pad_divisor)

    @overload
    def predict(self, images: ImageInput, score_thr: float | None = None, batch_size: int = 8) -> dict[str, Any]: ...
    @overload
    def predict(
        self, images: ImageList, score_thr: float | None = None, batch_size: int = 8
    ) -> list[dict[str, Any]]: ...
    @torch.no_grad()
    def predict(
        self, images: ImageInput | Sequence[ImageInput], score_thr: float | None = None, batch_size: int = 8
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Detect objects in one RGB image or a list of them: file paths, PIL images, uint8 ``HxWx3``
        arrays, or ``CxHxW`` / ``HxWx3`` tensors (uint8, or float in [0, 1]); see ``deploy.inputs``.

        One image gives one dict, a list one dict per image in input order: ``boxes`` float ``(D, 4)``
        xyxy in original pixels, ``scores``, ``labels`` (0-based) and ``category_ids`` (the dataset's
        ids), all numpy arrays. Images run together only when they pad to the same input shape, so
        each result depends on its own image alone, whatever its neighbours and ``batch_size``.
        """
        from nasfpn.data.batching import group_by_shape
        from nasfpn.data.transforms import preprocess_batch, to_uint8_chw

        data = self.config.data
        test_cfg = self.config.model.test
        if score_thr is not None:
            test_cfg = replace(test_cfg, score_thr=score_thr)
        self.model.eval()
        arrays, single = image_batch(images)
        chw = [to_uint8_chw(image, i) for i, image in enumerate(arrays)]
        keys = [self.input_shape(*im.shape[-2:]) for im in chw]
        cat_ids = np.asarray(self.category_ids, dtype=np.int64)
        out: list[dict[str, Any]] = [{}] * len(chw)
        for members in group_by_shape(keys, batch_size):
            batch, metas = preprocess_batch(
                [chw[i] for i in members], data.image_size, data.pad_divisor, data.mean, data.std, self.device
            )
            dets = self._runner.postprocess(self._runner(batch), metas, test_cfg)
            for i, d in zip(members, dets):
                labels = d["labels"].cpu().numpy()
                out[i] = {
                    "boxes": d["boxes"].cpu().numpy(),
                    "scores": d["scores"].cpu().numpy(),
                    "labels": labels,
                    "category_ids": cat_ids[labels],
                }
        return out[0] if single else out

    __call__ = predict


def load(
    name_or_config: str | Path | Config | None = None,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    overrides: list[str] | None = None,
    optimize: bool | dict[str, Any] = True,
    config_file: str | Path | None = None,
) -> Detector:
    """Build a detector from a preset name, config file or ``Config``, then load ``weights``.

    ``weights`` may be our ``.safetensors`` (then the config may be omitted: the file carries
    it), an MMDetection ``.pth`` checkpoint (converted on load), a training checkpoint, or an
    http(s) URL to any of these (downloaded once to the cache). A named config takes the classes
    of a file that carries its config (``core.weights.adopt_file_classes``). ``config_file`` and
    ``overrides`` refine the config (``resolve_config``). ``optimize``: see ``Detector`` (default: the
    BN-folded channels-last fp32 fast path; False: the plain model).
    """
    from nasfpn.core.weights import adopt_file_classes, load_into_model, read_weights

    state, file_config, kind = (None, None, None)
    if weights is not None:
        state, file_config, kind = read_weights(weights)
    # The classes are those the weights were trained for (a named preset's 80 or another dataset's),
    # unless ``overrides`` / ``config_file`` set them.
    named = adopt_file_classes(resolve_config(name_or_config, None, None, file_config), file_config)
    config = resolve_config(named, overrides, config_file)
    if file_config is not None and config.data.image_size == named.data.image_size:  # not set on purpose
        _warn_other_input_size(config, file_config, weights)
    # Trained weights replace everything: no need to fetch ImageNet backbone weights first.
    model = build_model(config.model, pretrained_backbone=state is None)
    if state is not None:
        load_into_model(model, state, kind or "state_dict", str(weights), config, file_config)
    return Detector(model, config, device, optimize)


def _warn_other_input_size(config: Config, file_config: dict[str, Any], weights: Any) -> None:
    """A named preset keeps its own input size; say so when the weights were trained at another
    one (their detections at the preset's size differ from those the training run evaluated)."""
    trained = file_config.get("data", {}).get("image_size") if isinstance(file_config.get("data"), dict) else None
    if isinstance(trained, int) and trained != config.data.image_size:
        logger.warning(
            "%s was trained at %d px input, the config given says %d px: predicting at %d. Give no "
            "config (or '-') to use the file's, or set data.image_size=%d",
            weights,
            trained,
            config.data.image_size,
            config.data.image_size,
            trained,
        )


def export_weights(detector_or_model: Detector | RetinaNet, config: Config, path: str | Path) -> None:
    """Save model weights in our format: safetensors with the resolved config as metadata."""
    from nasfpn.core.weights import save_safetensors

    model = detector_or_model.model if isinstance(detector_or_model, Detector) else detector_or_model
    save_safetensors(model.state_dict(), path, config_to_dict(config))
