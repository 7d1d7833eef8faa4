"""Export to ONNX / torch.export: every exported file is run and compared with eager PyTorch.

Default tests use the tiny preset with deterministic weights (thousands of NMS candidates per
image, a good part suppressed). The two crop-640 seed models, filled by the MMDetection
reference rule, are exported in both contracts by the ``slow`` tests.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import batched_nms

from deploy_helpers import detections_by, save_tiny_weights, tiny_config, tiny_model
from nasfpn.cli import main
from nasfpn.core.presets import PRESETS
from nasfpn.data.synthetic import SyntheticSpec, render_image
from nasfpn.deploy import check, contract, graphs
from nasfpn.deploy import export as ex
from nasfpn.deploy.onnx_runtime import OnnxDetector, ort_session
from nasfpn.deploy.predictor import Detector, Predictor, load


def _square_images(count: int = 2, side: int = 256) -> list[np.ndarray]:
    spec = SyntheticSpec(image_size=(side, side), max_objects=8)
    return [render_image(spec, seed=7, split="val", index=i)[0] for i in range(count)]


def _assert_same_detections(
    ref: list[dict], got: list[dict], tol: check.Tolerances | None = None
) -> check.ParityReport:
    report = check.ParityReport(tolerances=tol or check.Tolerances())
    for i, (r, g) in enumerate(zip(ref, got)):
        check.match_detections(r, g, report.tolerances, report, where=f"image {i}: ")
    report.images = len(ref)
    assert len(ref) == len(got)
    assert report.ok, report.summary()
    return report


# --------------------------------------------------------------------------- graph pieces, no export


def test_default_export_size_is_the_one_that_pads_as_pytorch(capsys):
    """Dynamic size where PyTorch pads to several shapes; a fixed square where it pads every image
    to that one square (image_size <= pad_divisor), and a note in each case that differs."""
    from nasfpn.cli import _export_size_note
    from nasfpn.core.presets import get_config
    from nasfpn.deploy.contract import default_dynamic_size

    big = PRESETS["retinanet_r50_nasfpn_crop640_50e"]
    tiny128 = get_config("nasfpn_tiny", ["data.image_size=128"])
    assert default_dynamic_size(big) and default_dynamic_size(tiny_config())
    assert not default_dynamic_size(tiny128)  # every image pads to 128x128 in PyTorch
    assert Detector(tiny_model()[1], tiny128).input_shape(128, 60) == (128, 128)
    _export_size_note(big, None)
    assert capsys.readouterr().err == ""
    _export_size_note(tiny128, None)
    assert "fixed 128x128 input" in capsys.readouterr().err
    _export_size_note(tiny128, True)
    assert "padded to at least 256" in capsys.readouterr().err
    _export_size_note(big, False)
    assert "every image is padded to 640x640" in capsys.readouterr().err


def test_multiclass_nms_is_class_aware_greedy_nms():
    g = torch.Generator().manual_seed(0)
    b, c, m = 2, 4, 300
    xy = torch.rand(b, m, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(b, m, 2, generator=g) * 60], dim=-1)
    labels = torch.randint(0, c, (b, m), generator=g)
    scores = torch.rand(b, m, generator=g)
    per_class = torch.where(labels[:, None, :] == torch.arange(c)[None, :, None], scores[:, None, :], -1.0)
    selected = graphs.multiclass_nms(boxes, per_class, torch.tensor(0.2), 1000, 0.5)
    for i in range(b):
        mask = scores[i] > 0.2
        idx = mask.nonzero().squeeze(1)
        ref = idx[batched_nms(boxes[i, idx], scores[i, idx], labels[i, idx], 0.5)]
        mine = selected[selected[:, 0] == i]
        assert set(mine[:, 2].tolist()) == set(ref.tolist())
        assert (labels[i, mine[:, 2]] == mine[:, 1]).all()
    assert 0 < len(selected) < int((scores > 0.2).sum())  # some were suppressed
    capped = graphs.multiclass_nms(boxes, per_class, torch.tensor(0.2), 3, 0.5)
    assert len(capped) == b * c * 3


def test_end2end_graph_equals_postprocess_in_pytorch():
    cfg, model = tiny_model()
    hw = contract.export_input_hw(cfg)
    batch, info, metas = contract.prepare_inputs(check.sample_images(cfg, 2), cfg, hw)
    graph = graphs.EndToEndGraph(model, hw, cfg.model.test).eval()
    with torch.no_grad():
        maps = graph.network(batch)
        anchors = graph.anchors(maps[:5])
        # Anchors computed in the graph (dynamic size) equal the constants of a fixed-size graph.
        for a, b in zip(graphs.GraphAnchors(model, None)(maps[:5]), anchors):
            assert torch.equal(a, b)
        ref = model.postprocess((list(maps[:5]), list(maps[5:])), metas)
        for thr in (cfg.model.test.score_thr, 0.3):
            boxes, scores, labels, num = graphs.postprocess_fixed(
                maps[:5], maps[5:], anchors, info, torch.tensor(thr), 80, cfg.model.test
            )
            assert boxes.shape == (2, 100, 4) and scores.shape == (2, 100) and labels.dtype == torch.int64
            got = [
                {"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]}
                for i, n in enumerate(num.tolist())
            ]
            want = [{k: v[d["scores"] > thr] for k, v in d.items()} for d in ref]
            _assert_same_detections(want, got)
            # Padding rows past num_detections.
            for i, n in enumerate(num.tolist()):
                assert (labels[i, n:] == -1).all() and (scores[i, n:] == 0).all() and (boxes[i, n:] == 0).all()
        assert int(num.min()) < 100  # at 0.3, padding is exercised


# --------------------------------------------------------------------------- exports of the tiny model


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    return save_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture(scope="module")
def end2end_onnx(tiny_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "tiny_end2end.onnx"
    rc = main(["export", "-", "--weights", str(tiny_weights), "--out", str(out), "--dynamic-batch", "--fixed-size"])
    assert rc == 0
    return out


def test_export_cli_end2end_contract(end2end_onnx, capsys):
    meta = contract.read_metadata(end2end_onnx)
    assert meta["contract"] == "end2end" and meta["batch"] is None and meta["input_hw"] == [256, 256]
    assert meta["mean"] == [123.675, 116.28, 103.53] and len(meta["class_names"]) == 80
    session = ort_session(end2end_onnx)
    assert [(i.name, i.shape, i.type) for i in session.get_inputs()] == [
        ("images", ["batch", 3, 256, 256], "tensor(float)"),
        ("image_info", ["batch", 4], "tensor(float)"),
    ]
    assert [i.name for i in session.get_overridable_initializers()] == ["score_thr"]
    assert [(o.name, o.shape, o.type) for o in session.get_outputs()] == [
        ("boxes", ["batch", 100, 4], "tensor(float)"),
        ("scores", ["batch", 100], "tensor(float)"),
        ("labels", ["batch", 100], "tensor(int64)"),
        ("num_detections", ["batch"], "tensor(int64)"),
    ]
    # Any batch size; score_thr may be omitted.
    cfg, model = tiny_model()
    images = check.sample_images(cfg, 3)
    batch, info, metas = contract.prepare_inputs(images, cfg, (256, 256))
    boxes, scores, labels, num = session.run(None, {"images": batch.numpy(), "image_info": info.numpy()})
    assert boxes.shape == (3, 100, 4)
    with torch.no_grad():
        ref = [{k: v.numpy() for k, v in d.items()} for d in model.postprocess(model(batch), metas)]
    got = [{"boxes": boxes[i, :n], "scores": scores[i, :n], "labels": labels[i, :n]} for i, n in enumerate(num)]
    _assert_same_detections(ref, got)


def test_export_raw_contract(tiny_weights, tmp_path):
    det = load(None, weights=tiny_weights)
    out = tmp_path / "raw.onnx"
    _, report = ex.export(det, out, contract="raw", batch=2, dynamic_size=False)
    assert report.ok and report.images == 2 and report.max_map_abs < 1e-3, report.summary()
    session = ort_session(out)
    names = [o.name for o in session.get_outputs()]
    assert names == (
        [f"cls_logits_p{i}" for i in range(3, 8)]
        + [f"box_deltas_p{i}" for i in range(3, 8)]
        + [f"anchors_p{i}" for i in range(3, 8)]
    )
    outputs = session.run(None, {"images": np.zeros((2, 3, 256, 256), np.float32)})
    assert outputs[0].shape == (2, 720, 32, 32) and outputs[5].shape == (2, 36, 32, 32)
    anchors = det.model.anchor_generator.grid_anchors([(32 >> i, 32 >> i) for i in range(5)])
    for a, b in zip(outputs[10:], anchors):
        np.testing.assert_array_equal(a, b.numpy())
    # The runtime post-processes raw files itself; 3 images fill a batch of 2 with a blank one.
    images = _square_images(3)
    _assert_same_detections(det.predict(images), OnnxDetector(out).predict(images))


def _landscape_and_portrait() -> list[np.ndarray]:
    return [
        render_image(SyntheticSpec(image_size=hw, max_objects=8), seed=11, split="val", index=i)[0]
        for i, hw in enumerate([(150, 256), (256, 120), (200, 200)])
    ]


@pytest.fixture(scope="module")
def dynamic_onnx(tiny_weights, tmp_path_factory) -> tuple[Path, str]:
    """The default export (dynamic size) at 384 px, any batch; with what the command printed."""
    import contextlib

    out = tmp_path_factory.mktemp("dynamic") / "dynamic.onnx"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            main(["export", "-", "--weights", str(tiny_weights), "--out", str(out), "--size", "384", "--dynamic-batch"])
            == 0
        )
    return out, printed.getvalue()


@pytest.mark.slow  # a dynamic-size export of its own (~22 s); test_lite exports the default (dynamic) form in the default run
def test_dynamic_size_end2end_pads_as_pytorch_does(tiny_weights, dynamic_onnx):
    out, printed = dynamic_onnx
    assert "input Bx3xHxW (multiples of 128, >= 256)" in printed
    meta = contract.read_metadata(out)
    assert meta["input_hw"] is None and meta["dynamic_size"] and meta["min_side"] == 256
    session = ort_session(out)
    assert session.get_inputs()[0].shape[:2] == ["batch", 3]
    assert all(isinstance(d, str) for d in session.get_inputs()[0].shape[2:])
    det = load(None, weights=tiny_weights, overrides=["data.image_size=384"])
    onnx_det = OnnxDetector(out)
    assert onnx_det.input_hw is None
    # At 384 px these pad to 256x384, 384x256 and 384x384 in eager PyTorch, and now in the file
    # too: one run per image, then all three in one batch; the detections are eager's.
    images = _landscape_and_portrait()
    runs = [([images[0]], (256, 384)), ([images[1]], (384, 256)), ([images[2]], (384, 384)), (images, (384, 384))]
    for chunk, padded in runs:
        batch, _, _ = contract.prepare_inputs(chunk, det.config, None, meta["min_side"])
        assert tuple(batch.shape[-2:]) == padded
        _assert_same_detections(det.predict(chunk), onnx_det.predict(chunk))
    # Batched with its neighbours, each image keeps the detections of a one-image eager call.
    _assert_same_detections([det.predict([im])[0] for im in images], onnx_det.predict(images, batch_size=8))
    # The resize target may change for a dynamic-size file (not for a fixed-size one).
    at_512 = OnnxDetector(out, overrides=["data.image_size=512"])
    det_512 = load(None, weights=tiny_weights, overrides=["data.image_size=512"])
    _assert_same_detections(det_512.predict(images[:1]), at_512.predict(images[:1]))
    # Below min_side the input is padded up to it (a narrow image at a small image_size).
    batch, _, _ = contract.prepare_inputs([np.zeros((256, 60, 3), np.uint8)], tiny_config(), None, 256)
    assert tuple(batch.shape[-2:]) == (256, 256)


@pytest.mark.slow  # shares the dynamic-size export above
def test_example_client_reproduces_nasfpn_predict(tiny_weights, dynamic_onnx, tmp_path):
    """examples/onnx_client.py (onnxruntime + numpy + Pillow, no nasfpn) against `nasfpn predict`
    on upscaled, downscaled, portrait, landscape and unresized images."""
    out, _ = dynamic_onnx
    folder = tmp_path / "imgs"
    folder.mkdir()
    sizes = {
        "up_landscape": (90, 130),
        "down_portrait": (900, 500),
        "portrait": (384, 200),
        "landscape": (150, 384),
        "down_square": (700, 700),
    }
    for i, (name, hw) in enumerate(sizes.items()):
        pixels = render_image(SyntheticSpec(image_size=hw, max_objects=6), seed=5, split="val", index=i)[0]
        Image.fromarray(pixels).save(folder / f"{name}.png")
    files = sorted(str(p) for p in folder.iterdir())
    client = Path(__file__).resolve().parents[1] / "examples" / "onnx_client.py"
    proc = subprocess.run(
        [
            sys.executable,
            "-I",
            str(client),
            str(out),
            *files,
            "--score-thr",
            "0.1",
            "--json",
            str(tmp_path / "client.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        main(
            [
                "predict",
                "-",
                *files,
                "--weights",
                str(tiny_weights),
                "--out",
                str(tmp_path / "pred"),
                "--set",
                "data.image_size=384",
                "--score-thr",
                "0.1",
                "--no-vis",
            ]
        )
        == 0
    )

    def by_file(records):
        out = detections_by(records, "file_name", files)
        return [out[f] for f in files]

    ours = by_file(json.loads((tmp_path / "pred" / "predictions.json").read_text()))
    theirs = by_file(json.loads((tmp_path / "client.json").read_text()))
    report = _assert_same_detections(ours, theirs)
    assert report.eager_detections > 20 * len(files) and report.matched == report.eager_detections


@pytest.mark.slow  # the default suite must stay short on a slow 2-core CPU
def test_dynamic_size_raw_and_torch_export(tiny_weights, tmp_path):
    det = load(None, weights=tiny_weights)
    raw = tmp_path / "raw_dynamic.onnx"
    meta, report = ex.export(det, raw, contract="raw", dynamic_size=True)
    assert report.ok and report.images == 3, report.summary()
    outputs = ort_session(raw).run(None, {"images": np.zeros((1, 3, 256, 384), np.float32)})
    sizes = [(256 // s, 384 // s) for s in (8, 16, 32, 64, 128)]
    assert [o.shape[-2:] for o in outputs[:5]] == sizes
    for a, b in zip(outputs[10:], det.model.anchor_generator.grid_anchors(sizes)):
        np.testing.assert_array_equal(a, b.numpy())
    program = tmp_path / "dynamic.pt2"
    meta, report = ex.export(det, program, "torch-export", dynamic_size=True)
    assert meta["dynamic_size"] and report.ok and report.images == 3, report.summary()


_LOAD_WITHOUT_PACKAGE = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "nasfpn":
            raise ModuleNotFoundError("no module named " + name)
sys.meta_path.insert(0, Block())
try:
    import nasfpn
    raise SystemExit("nasfpn should not be importable here")
except ModuleNotFoundError:
    pass
import numpy as np, torch
module = torch.export.load(sys.argv[1]).module()
outputs = module(torch.from_numpy(np.load(sys.argv[2])))
np.savez(sys.argv[3], *[o.numpy() for o in outputs])
assert not [m for m in sys.modules if m.split(".")[0] == "nasfpn"]
print(len(outputs))
"""


@pytest.mark.slow  # a torch.export of its own (~8 s)
def test_torch_export_loads_without_the_package(tiny_weights, tmp_path):
    det = load(None, weights=tiny_weights)
    out = tmp_path / "tiny.pt2"
    rc = main(
        [
            "export",
            "-",
            "--weights",
            str(tiny_weights),
            "--format",
            "torch-export",
            "--out",
            str(out),
            "--dynamic-batch",
            "--fixed-size",
        ]
    )
    assert rc == 0
    assert contract.read_metadata(out)["contract"] == "network"
    cfg = det.config
    batch, _, _ = contract.prepare_inputs(check.sample_images(cfg, 3), cfg, (256, 256))
    np.save(tmp_path / "x.npy", batch.numpy())
    script = tmp_path / "load.py"
    script.write_text(_LOAD_WITHOUT_PACKAGE)
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npz")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "10"
    got = np.load(tmp_path / "y.npz")
    with torch.no_grad():
        cls_maps, reg_maps = det.model(batch)
    for i, ref in enumerate(list(cls_maps) + list(reg_maps)):
        np.testing.assert_allclose(got[f"arr_{i}"], ref.numpy(), rtol=1e-4, atol=1e-4)


def test_export_fails_loudly_when_the_file_disagrees(tiny_weights, tmp_path, monkeypatch, capsys):
    prepared = ex._prepared_copy

    def tampered(model, precision):
        out = prepared(model, precision)
        out.head.retina_cls.bias.data += 0.05  # the exported network is no longer the eager one
        return out

    monkeypatch.setattr(ex, "_prepared_copy", tampered)
    rc = main(
        [
            "export",
            "-",
            "--weights",
            str(tiny_weights),
            "--format",
            "torch-export",
            "--out",
            str(tmp_path / "bad.pt2"),
            "--fixed-size",
        ]
    )
    err = capsys.readouterr().err
    # A fixed-size file says what it changes.
    assert "every image is padded to 256x256" in err and "differ from PyTorch" in err
    assert rc == 3
    assert "disagrees with eager PyTorch" in err and "unmatched" in err


def test_onnx_detector_matches_detector(end2end_onnx, tiny_weights):
    det = load(None, weights=tiny_weights)
    onnx_det = OnnxDetector(end2end_onnx)
    assert isinstance(det, Predictor) and isinstance(onnx_det, Predictor)  # one interface for the apps
    assert onnx_det.class_names == det.class_names and onnx_det.category_ids == det.category_ids
    images = _square_images(2)
    for thr in (None, 0.3):
        ref, got = det.predict(images, score_thr=thr), onnx_det.predict(images, score_thr=thr, batch_size=1)
        _assert_same_detections(ref, got)
        for g in got:
            assert g["boxes"].dtype == np.float32 and g["labels"].dtype == np.int64
            np.testing.assert_array_equal(g["category_ids"], np.asarray(det.category_ids)[g["labels"]])
    # Refining the stored config: score_thr is an input; NMS settings are fixed in the graph.
    assert OnnxDetector(end2end_onnx, overrides=["model.test.score_thr=0.4"]).config.model.test.score_thr == 0.4
    with pytest.raises(ValueError, match="nms_iou"):
        OnnxDetector(end2end_onnx, overrides=["model.test.nms_iou=0.6"])
    with pytest.raises(ValueError, match=r"data\.image_size"):  # a fixed-size graph
        OnnxDetector(end2end_onnx, overrides=["data.image_size=512"])


def test_check_runs_an_onnx_file_through_the_runtime(end2end_onnx, monkeypatch):
    """verify_export gets an end2end file's detections from OnnxDetector.predict, the code users run."""
    calls = []
    predict = OnnxDetector.predict

    def spy(self, images, score_thr=None, batch_size=8):
        calls.append((len(images), score_thr, batch_size))
        return predict(self, images, score_thr, batch_size)

    monkeypatch.setattr(OnnxDetector, "predict", spy)
    cfg, model = tiny_model()
    report = check.verify_export(end2end_onnx, model, cfg, score_thr=0.3)
    assert report.ok and report.images == 2, report.summary()
    assert calls == [(2, 0.3, 2)]  # a fixed-size file with any batch: one run of both sample images


def test_check_runs():
    """Images of a checked run pad to one shape (a dynamic-size file: one image each); a fixed batch
    is filled with repeats."""
    a, b, c = (np.full((8, 8, 3), v, np.uint8) for v in range(3))

    def ids(runs):
        return [[int(im[0, 0, 0]) for im in run] for run in runs]

    assert ids(check._runs([a, b, c], None, dynamic_size=False)) == [[0, 1, 2]]
    assert ids(check._runs([a, b, c], 2, dynamic_size=False)) == [[0, 1], [2, 2]]
    assert ids(check._runs([a, b, c], None, dynamic_size=True)) == [[0], [1], [2]]
    assert ids(check._runs([a, b, c], 2, dynamic_size=True)) == [[0, 0], [1, 1], [2, 2]]


def test_predict_cli_with_onnx_writes_the_same_predictions(end2end_onnx, tiny_weights, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(_square_images(2, side=320)):
        Image.fromarray(image).save(folder / f"{i}.png")
    assert (
        main(
            [
                "predict",
                "-",
                str(folder),
                "--weights",
                str(tiny_weights),
                "--out",
                str(tmp_path / "eager"),
                "--vis-thr",
                "0.2",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "predict",
                "-",
                str(folder),
                "--weights",
                str(end2end_onnx),
                "--out",
                str(tmp_path / "onnx"),
                "--vis-thr",
                "0.2",
            ]
        )
        == 0
    )
    eager = json.loads((tmp_path / "eager" / "predictions.json").read_text())
    onnx = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert len(eager) == len(onnx) == 200
    for name in {r["file_name"] for r in eager}:

        def as_dets(records, name=name):
            rows = [r for r in records if r["file_name"] == name]
            return {
                "boxes": np.array([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in rows)]),
                "scores": np.array([r["score"] for r in rows]),
                "labels": np.array([r["category_id"] for r in rows]),
            }

        _assert_same_detections([as_dets(eager)], [as_dets(onnx)], check.Tolerances(box_rtol=2e-3, score_atol=2e-5))
    assert sorted(p.name for p in (tmp_path / "onnx" / "vis").iterdir()) == ["0.jpg", "1.jpg"]


def test_serve_an_onnx_model(end2end_onnx, tiny_weights):
    from fastapi.testclient import TestClient

    from nasfpn.apps.serve import create_app

    image = _square_images(1)[0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    with TestClient(create_app(OnnxDetector(end2end_onnx))) as client:
        assert client.get("/health").json()["backend"] == "onnxruntime"
        r = client.post("/predict", files={"file": ("a.png", buf.getvalue(), "image/png")})
    assert r.status_code == 200, r.text
    got = r.json()["detections"]
    ref = load(None, weights=tiny_weights).predict([image])[0]
    _assert_same_detections(
        [ref],
        [
            {
                "boxes": np.array([d["box"] for d in got]),
                "scores": np.array([d["score"] for d in got]),
                "labels": np.array([d["label"] for d in got]),
            }
        ],
        check.Tolerances(box_rtol=2e-3, score_atol=2e-5),
    )


# --------------------------------------------------------------------------- slow: fp16, seed models


@pytest.mark.slow
def test_export_fp16_with_loose_tolerances(tiny_weights, tmp_path):
    det = load(None, weights=tiny_weights)
    meta, report = ex.export(det, tmp_path / "fp16.onnx", precision="fp16")
    print(f"\nfp16 end2end (tiny): {report.summary()}")
    assert meta["precision"] == "fp16" and report.tolerances.box_rtol > 1e-3 and report.ok


def _reference_filled(short: str, reference_dir: Path):
    from mmdet_reference import filled_state_dict
    from nasfpn.core.weights import load_into_model
    from nasfpn.models import build_model

    cfg = PRESETS[{"r50_fpn": "retinanet_r50_fpn_crop640_50e", "r50_nasfpn": "retinanet_r50_nasfpn_crop640_50e"}[short]]
    model = build_model(cfg.model, pretrained_backbone=False).eval()
    load_into_model(model, filled_state_dict(short, reference_dir), "mmdet")
    return Detector(model, cfg)


@pytest.mark.slow
@pytest.mark.parametrize("dynamic_size", [False, True])
@pytest.mark.parametrize("contract", ["end2end", "raw"])
@pytest.mark.parametrize("short", ["r50_fpn", "r50_nasfpn"])
def test_seed_models_export_and_match_pytorch(short, contract, dynamic_size, reference_dir, tmp_path):
    det = _reference_filled(short, reference_dir)
    images = [
        np.array(Image.open(reference_dir / name).convert("RGB")) for name in ("img_640x480.png", "img_640x640.png")
    ]
    out = tmp_path / f"{short}_{contract}.onnx"
    _, report = ex.export(det, out, contract=contract, dynamic_size=dynamic_size, images=images)
    print(f"\n{det.config.name} {contract}{' dynamic size' if dynamic_size else ''}: {report.summary()}")
    assert report.ok and report.eager_detections == 200
