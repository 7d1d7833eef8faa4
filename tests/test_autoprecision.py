"""``precision="auto"`` (deploy/autoprecision.py), the fast-path default of ``Detector`` and ``--plain``."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import nasfpn
from deploy_helpers import tiny_model
from nasfpn.cli import main
from nasfpn.deploy import autoprecision as ap
from nasfpn.deploy.check import ParityReport, Tolerances, match_detections
from nasfpn.deploy.fast import InferenceModel
from nasfpn.deploy.predictor import Detector, export_weights
from nasfpn.models import RetinaNet


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NASFPN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / ap.CACHE_NAME


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()  # nasfpn_tiny at 256 px, deterministic weights


def fake_measure(times: dict[str, float], calls: list | None = None, share: float | None = 1.0):
    """A ``measure`` that returns ``times`` (ms) without running anything, and counts its calls."""

    def measure(model, hw, batch_size, precisions, budget_s, options):
        if calls is not None:
            calls.append((hw, batch_size, tuple(precisions)))
        return ap.Timings({p: times[p] for p in precisions}, {}, share)

    return measure


def test_pick_keeps_fp32_unless_clearly_faster():
    assert ap.pick({"fp32": 100.0, "bf16": 95.0}) == "fp32"  # 5% faster: not worth other numerics
    assert ap.pick({"fp32": 100.0, "bf16": 141.0}) == "fp32"  # slower (the Xeon case)
    assert ap.pick({"fp32": 100.0, "bf16": 90.0}) == "bf16"  # exactly 10% less time
    assert ap.pick({"fp32": 100.0, "fp16": 40.0, "bf16": 50.0}) == "fp16"
    assert ap.pick({"fp32": 100.0, "bf16": 80.0}, min_gain=0.3) == "fp32"


def test_auto_chooses_by_measurement_then_reads_the_cache(cache, tiny):
    cfg, model = tiny
    calls: list = []
    slow = ap.choose_precision(model, cfg, 1, measure_fn=fake_measure({"fp32": 20.0, "bf16": 19.0}, calls))
    assert slow.precision == "fp32" and not slow.cached and calls == [((256, 256), 1, ("fp32", "bf16"))]
    assert slow.describe().startswith("precision auto: fp32, no reduced precision >= 10% faster (fp32 20.0 ms")
    assert "measured now" in slow.describe() and str(cache) in slow.describe()

    # A second call (another process, same machine and model) reads the file and measures nothing.
    again = ap.choose_precision(model, cfg, 1, measure_fn=fake_measure({"fp32": 1.0, "bf16": 0.1}, calls))
    assert again.precision == "fp32" and again.cached and len(calls) == 1
    assert f"cached in {cache}" in again.describe()

    # Another batch size is another entry; here bf16 is clearly faster.
    fast = ap.choose_precision(model, cfg, 4, measure_fn=fake_measure({"fp32": 80.0, "bf16": 30.0}, calls))
    assert fast.precision == "bf16" and len(calls) == 2
    assert "bf16, 2.67x faster than fp32 (fp32 80.0 ms, bf16 30.0 ms per batch of 4 at 256x256" in fast.describe()
    entries = json.loads(cache.read_text())["entries"]
    assert sorted(e["precision"] for e in entries.values()) == ["bf16", "fp32"]


def test_cache_key_changes_with_input_size_and_threads(cache, tiny, one_thread):
    cfg, model = tiny
    key = ap.cache_key(cfg, torch.device("cpu"), 1)
    assert key["input"] == [256, 256] and key["threads"] == 1 and key["torch"] == torch.__version__
    assert key["cpu"] and isinstance(key["cpu_flags"], list)
    bigger = replace(cfg, data=replace(cfg.data, image_size=384))
    assert ap.cache_key(bigger, torch.device("cpu"), 1)["input"] == [384, 384]
    # The test-time thresholds do not change the network: same model digest.
    looser = replace(cfg, model=replace(cfg.model, test=replace(cfg.model.test, score_thr=0.3)))
    assert ap.model_digest(looser) == ap.model_digest(cfg)
    assert ap.model_digest(replace(cfg, model=replace(cfg.model, neck=replace(cfg.model.neck, stacks=3)))) != (
        ap.model_digest(cfg)
    )

    calls: list = []
    measure = fake_measure({"fp32": 10.0, "bf16": 5.0}, calls)
    ap.choose_precision(model, cfg, 1, measure_fn=measure)
    ap.choose_precision(model, cfg, 1, measure_fn=measure)
    assert len(calls) == 1
    ap.choose_precision(model, bigger, 1, measure_fn=measure)  # another input size: measured
    assert len(calls) == 2 and calls[-1][0] == (384, 384)
    torch.set_num_threads(2)  # another thread count: measured again (one_thread restores it)
    ap.choose_precision(model, cfg, 1, measure_fn=measure)
    assert len(calls) == 3


def test_a_corrupt_cache_file_is_ignored_and_rewritten(cache, tiny):
    cfg, model = tiny
    cache.parent.mkdir(parents=True)
    for text in ("{not json", json.dumps({"version": 1, "entries": []}), json.dumps([1, 2])):
        cache.write_text(text)
        calls: list = []
        choice = ap.choose_precision(model, cfg, 1, measure_fn=fake_measure({"fp32": 10.0, "bf16": 5.0}, calls))
        assert choice.precision == "bf16" and len(calls) == 1
        data = json.loads(cache.read_text())
        assert data["version"] == ap.CACHE_VERSION and len(data["entries"]) == 1
    # An entry naming a precision this device cannot run is not trusted either.
    entry = next(iter(data["entries"].values()))
    entry["precision"] = "int8"
    cache.write_text(json.dumps(data))
    calls = []
    ap.choose_precision(model, cfg, 1, measure_fn=fake_measure({"fp32": 10.0, "bf16": 5.0}, calls))
    assert len(calls) == 1


def test_times_from_a_busy_cpu_are_used_but_not_cached(cache, tiny):
    cfg, model = tiny
    calls: list = []
    busy = ap.choose_precision(model, cfg, 1, measure_fn=fake_measure({"fp32": 30.0, "bf16": 10.0}, calls, 0.45))
    assert busy.precision == "bf16" and not cache.exists()
    assert "measured now on a busy CPU (45% of" in busy.describe() and "not cached" in busy.describe()
    ap.choose_precision(model, cfg, 1, measure_fn=fake_measure({"fp32": 30.0, "bf16": 10.0}, calls, 0.95))
    assert len(calls) == 2 and cache.exists()  # measured again, and this time kept


def test_measure_times_the_fast_path_for_real():
    _, model = tiny_model(["data.image_size=128"])
    t = ap.measure(model, (128, 128), 1, ("fp32", "bf16"), budget_s=0.3, max_calls=2)
    assert set(t.ms) == {"fp32", "bf16"} and all(v > 0 for v in t.ms.values())
    assert t.cpu_share is not None and 0 < t.cpu_share <= 1
    runners = t.runners
    assert runners["bf16"].dtype == torch.bfloat16 and runners["fp32"].dtype == torch.float32


def test_detector_auto_runs_the_chosen_precision(cache, tiny, monkeypatch):
    cfg, model = tiny
    monkeypatch.setattr(ap, "measure", fake_measure({"fp32": 50.0, "bf16": 20.0}))
    det = Detector(model, cfg, optimize={"precision": "auto", "batch_size": 2})
    assert isinstance(det.runner, InferenceModel) and det.runner.dtype == torch.bfloat16
    assert det.precision_choice is not None and det.precision_choice.batch_size == 2
    monkeypatch.setattr(ap, "measure", fake_measure({"fp32": 50.0, "bf16": 48.0}))
    det = Detector(model, cfg, optimize={"precision": "auto", "batch_size": 3})
    assert det.runner.dtype == torch.float32 and det.precision_choice.precision == "fp32"


def test_default_detector_runs_the_fast_path_and_matches_the_plain_model(tiny):
    """BN folded + channels-last fp32 against the plain model, at the export check's tolerances: same
    labels, boxes within 1e-3 relative, scores within 1e-4, every detection matched."""
    cfg, model = tiny
    fast, plain = Detector(model, cfg), Detector(model, cfg, optimize=False)
    assert isinstance(fast.runner, InferenceModel) and fast.runner.dtype == torch.float32
    assert fast.runner.channels_last and plain.runner is model and fast.model is model
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (*hw, 3), dtype=np.uint8) for hw in ((256, 256), (200, 120))]
    report = ParityReport(tolerances=Tolerances())
    for i, (a, b) in enumerate(zip(plain.predict(images), fast.predict(images))):
        match_detections(a, b, report.tolerances, report, where=f"image {i}: ")
    assert report.eager_detections > 50 and report.ok, report.summary()
    assert report.max_score_abs < 1e-5, report.summary()


@pytest.fixture(scope="module")
def weights_and_image(tmp_path_factory):
    cfg, model = tiny_model(["data.image_size=128"])
    root = tmp_path_factory.mktemp("auto")
    export_weights(model, cfg, root / "tiny.safetensors")
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(root / "a.png")
    return root / "tiny.safetensors", root / "a.png"


def _predict_runner(monkeypatch, tmp_path, weights, image, *flags) -> type:
    """The class of the network ``nasfpn predict`` ran."""
    seen: list[type] = []
    predict = Detector.predict

    def spy(self, *a, **k):
        seen.append(type(self.runner))
        return predict(self, *a, **k)

    monkeypatch.setattr(Detector, "predict", spy)
    rc = main(["predict", "-", str(image), "--weights", str(weights), "--out", str(tmp_path / "o"), "--no-vis", *flags])
    assert rc == 0 and len(seen) == 1
    return seen[0]


def test_cli_plain_runs_the_plain_model_and_auto_prints_its_choice(
    tmp_path, cache, monkeypatch, capsys, weights_and_image
):
    weights, image = weights_and_image
    assert _predict_runner(monkeypatch, tmp_path, weights, image, "--plain") is RetinaNet
    assert _predict_runner(monkeypatch, tmp_path, weights, image) is InferenceModel  # the default
    capsys.readouterr()
    plain_bf16 = ["--plain", "--precision", "bf16"]  # a contradiction: one error line
    assert main(["predict", "-", str(image), "--weights", str(weights), "--out", str(tmp_path / "o"), *plain_bf16]) == 2
    assert "--plain runs the unmodified fp32 model" in capsys.readouterr().err

    monkeypatch.setenv("NASFPN_PRECISION", "auto")
    monkeypatch.setattr(ap, "measure", fake_measure({"fp32": 9.0, "bf16": 8.8}))
    capsys.readouterr()
    assert _predict_runner(monkeypatch, tmp_path, weights, image) is InferenceModel
    out = capsys.readouterr().out
    assert "precision auto: fp32, no reduced precision >= 10% faster" in out and "per batch of 1 at 128x128" in out

    monkeypatch.setenv("NASFPN_PRECISION", "fp64")
    assert main(["predict", "-", str(image), "--weights", str(weights), "--out", str(tmp_path / "o")]) == 2
    assert "NASFPN_PRECISION='fp64': must be one of fp32, bf16, fp16, auto" in capsys.readouterr().err


def test_api_default_is_fast_fp32_whatever_the_environment(monkeypatch, weights_and_image):
    monkeypatch.setenv("NASFPN_PRECISION", "bf16")  # the command line's default only
    det = nasfpn.load(weights=weights_and_image[0])
    assert isinstance(det.runner, InferenceModel) and det.runner.dtype == torch.float32
    assert isinstance(nasfpn.load(weights=weights_and_image[0], optimize=False).runner, RetinaNet)
