"""Export a detector for deployment: ONNX (``end2end`` or ``raw``) or a ``torch.export`` program.

    meta, report = export(detector, "model.onnx")      # written, then checked against PyTorch

What a file holds and how it is called is ``nasfpn.deploy.contract``; the exported modules are
``nasfpn.deploy.graphs``; the check against eager PyTorch is ``nasfpn.deploy.check``.
``precision="fp16"`` exports a half-precision network, checked with looser tolerances
(``Tolerances.for_precision``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from nasfpn.core.config import Config
from nasfpn.core.fileio import atomic_path
from nasfpn.deploy.check import ParityReport, verify_export
from nasfpn.deploy.contract import (
    CONTRACTS,
    END2END_INPUTS,
    END2END_OUTPUTS,
    EXPORT_PRECISIONS,
    FORMATS,
    METADATA_KEY,
    PROGRAM_METADATA_FILE,
    RAW_INPUTS,
    RAW_OUTPUTS,
    default_dynamic_size,
    export_input_hw,
    export_metadata,
    min_input_side,
)
from nasfpn.deploy.graphs import EndToEndGraph, NetworkGraph, RawGraph, multiclass_nms_onnx
from nasfpn.models.detector import RetinaNet

if TYPE_CHECKING:
    from nasfpn.deploy.predictor import Detector


class ExportError(RuntimeError):
    """The export failed, or the exported file disagrees with eager PyTorch."""


def _example_inputs(
    config: Config, contract: str, batch: int, device: torch.device, dynamic_size: bool = False
) -> tuple[torch.Tensor, ...]:
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


def export_onnx(
    model: RetinaNet,
    config: Config,
    path: str | Path,
    *,
    contract: str = "end2end",
    batch: int = 1,
    dynamic_batch: bool = False,
    dynamic_size: bool | None = None,
    opset: int = 18,
    precision: str = "fp32",
    class_names: Sequence[str] = (),
    category_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """Write ``model`` as ONNX (``nasfpn.deploy.contract`` states the contracts); returns the metadata.

    ``dynamic_size`` None: ``default_dynamic_size(config)``, the size that reproduces PyTorch's padding."""
    import onnx

    if dynamic_size is None:
        dynamic_size = default_dynamic_size(config)

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
        input_names, output_names = list(END2END_INPUTS), list(END2END_OUTPUTS)
    else:
        module = RawGraph(graph_model, hw, precision == "fp16")
        input_names, output_names = list(RAW_INPUTS), list(RAW_OUTPUTS)
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
                module,
                args,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                verbose=False,
                external_data=False,
                custom_translation_table={torch.ops.nasfpn.multiclass_nms.default: multiclass_nms_onnx},
            )
        assert program is not None  # the dynamo exporter always returns one
        program.save(str(tmp), external_data=False)
        proto = onnx.load(str(tmp))
        meta = export_metadata(
            config,
            contract,
            "onnx",
            None if dynamic_batch else batch,
            precision,
            class_names,
            category_ids,
            opset,
            dynamic_size,
        )
        _set_metadata(proto, meta)
        if contract == "end2end":
            _make_input_optional(proto, "score_thr", np.array(config.model.test.score_thr, dtype=np.float32))
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return meta


def _prepared_copy(model: RetinaNet, precision: str) -> RetinaNet:
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


def export_torch_program(
    model: RetinaNet,
    config: Config,
    path: str | Path,
    *,
    batch: int = 1,
    dynamic_batch: bool = False,
    dynamic_size: bool | None = None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Save backbone + neck + head as a ``torch.export`` program (``.pt2``); ``dynamic_size`` as in
    ``export_onnx``."""
    if dynamic_size is None:
        dynamic_size = default_dynamic_size(config)
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {EXPORT_PRECISIONS}")
    path = Path(path)
    module = NetworkGraph(_prepared_copy(model, precision), precision == "fp16").eval()
    device = next(module.parameters()).device
    (images,) = _example_inputs(config, "raw", 2 if dynamic_batch else batch, device, dynamic_size)
    dims = _image_dims(config, dynamic_batch, dynamic_size)
    with torch.no_grad():
        program = torch.export.export(module, (images,), dynamic_shapes=(dims,) if dims else None, strict=False)
    meta = export_metadata(
        config, "network", "torch-export", None if dynamic_batch else batch, precision, (), (), None, dynamic_size
    )
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp), extra_files={PROGRAM_METADATA_FILE: json.dumps(meta)})
    return meta


def export(
    detector: Detector,
    out: str | Path,
    fmt: str = "onnx",
    *,
    contract: str = "end2end",
    batch: int = 1,
    dynamic_batch: bool = False,
    dynamic_size: bool | None = None,
    opset: int = 18,
    precision: str = "fp32",
    verify: bool = True,
    images: Sequence[np.ndarray] | None = None,
) -> tuple[dict[str, Any], ParityReport | None]:
    """Export a ``nasfpn.deploy.predictor.Detector`` and check the file against eager PyTorch.

    Raises ``ExportError`` with the comparison if they disagree (the file is kept for inspection).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")
    model, config = detector.model.eval(), detector.config
    if fmt == "onnx":
        meta = export_onnx(
            model,
            config,
            out,
            contract=contract,
            batch=batch,
            dynamic_batch=dynamic_batch,
            dynamic_size=dynamic_size,
            opset=opset,
            precision=precision,
            class_names=detector.class_names,
            category_ids=detector.category_ids,
        )
    else:
        meta = export_torch_program(
            model, config, out, batch=batch, dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, precision=precision
        )
    if not verify:
        return meta, None
    report = verify_export(out, model, config, images)
    if not report.ok:
        raise ExportError(f"{out} disagrees with eager PyTorch:\n{report.summary()}")
    return meta, report
