"""Fast paths against the plain model: BN folding, channels-last, bf16, compile, post-processing
selection, activation checkpointing, and host-device syncs of the training step."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from nasfpn.apps.bench import calibrate_scores, synthetic_targets
from nasfpn.core.precision import autocast
from nasfpn.core.presets import get_config
from nasfpn.core.structures import ImageMeta
from nasfpn.data.collate import loader_settings
from nasfpn.deploy.fast import FoldedRetinaHead, InferenceModel, fold_batchnorm, optimize_for_inference
from nasfpn.engine.optim import make_sgd
from nasfpn.models import build_model
from nasfpn.models.postprocess import select_topk
from sync_points import find_sync_points

# Small models covering every BN placement: BasicBlock and Bottleneck ResNets, FPN ConvBN,
# NAS-FPN laterals / extra downsamples / ReLU-conv-BN cell convs, the separated-BN head.
SMALL = {
    "nasfpn_tiny": ("nasfpn_tiny", []),
    "fpn_r18": (
        "retinanet_r50_fpn_crop640_50e",
        [
            "model.backbone.depth=18",
            "model.neck.channels=32",
            "model.head.feat_channels=32",
            "model.head.stacked_convs=2",
        ],
    ),
    "nasfpn_r50": (
        "retinanet_r50_nasfpn_crop640_50e",
        ["model.neck.stacks=1", "model.neck.channels=32", "model.head.feat_channels=32", "model.head.stacked_convs=1"],
    ),
}
SIZE = 128


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so that folding has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g) * 1.5)
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def _model(key: str) -> nn.Module:
    name, overrides = SMALL[key]
    torch.manual_seed(0)
    model = build_model(get_config(name, overrides).model, pretrained_backbone=False)
    _randomise_bn(model)
    return model.eval()


def _images(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _assert_maps_close(out, ref, rel: float) -> float:
    """Every level map within ``rel`` x (its largest magnitude); returns the worst relative error."""
    worst = 0.0
    for a, b in zip(out[0] + out[1], ref[0] + ref[1]):
        assert a.dtype == torch.float32 and a.shape == b.shape
        err = ((a - b).abs().max() / b.abs().max()).item()
        worst = max(worst, err)
        assert err <= rel, f"relative error {err:.3g} > {rel}"
    return worst


@pytest.fixture(scope="module", params=list(SMALL))
def model_and_ref(request):
    model = _model(request.param)
    x = _images()
    with torch.no_grad():
        ref = model(x)
    return model, x, ref


# --------------------------------------------------------------------------- BN folding and layout


def test_fold_batchnorm_matches_plain(model_and_ref):
    model, x, ref = model_and_ref
    fast = optimize_for_inference(model, channels_last=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    assert isinstance(fast.model.head, FoldedRetinaHead)
    _assert_maps_close(fast(x), ref, 1e-4)


def test_channels_last_matches_plain(model_and_ref):
    model, x, ref = model_and_ref
    fast = optimize_for_inference(model, channels_last=True)
    out = fast(x)
    assert fast.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_maps_close(out, ref, 1e-4)
    unfused = optimize_for_inference(model, fuse_bn=False, channels_last=True)
    assert any(isinstance(m, nn.BatchNorm2d) for m in unfused.modules())
    _assert_maps_close(unfused(x), ref, 1e-4)


def test_bf16_within_stated_tolerance(model_and_ref):
    # bf16 keeps 8 mantissa bits: per-op rounding ~4e-3, accumulated through ~60 layers.
    model, x, ref = model_and_ref
    fast = optimize_for_inference(model, precision="bf16")
    assert fast.model.backbone.conv1.weight.dtype == torch.bfloat16
    _assert_maps_close(fast(x), ref, 0.1)


def test_folding_without_bn_unfolded_raises():
    model = _model("nasfpn_tiny")
    model.neck.extra_bn = nn.BatchNorm2d(4).eval()  # a BN the folder does not know about
    with pytest.raises(ValueError, match="BN not folded"):
        fold_batchnorm(model)
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(_model("nasfpn_tiny").train())


def test_original_model_untouched():
    model = _model("nasfpn_tiny").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model, precision="bf16")
    assert model.training and all(m.training for m in model.neck.modules())
    assert all(p.requires_grad for p in model.neck.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)
    assert not any(p.requires_grad for p in fast.parameters())
    assert model.backbone.conv1.weight.is_contiguous()  # still NCHW
    assert model.backbone.conv1.weight.dtype == torch.float32


def test_inference_model_is_eval_only():
    fast = optimize_for_inference(_model("nasfpn_tiny"))
    assert isinstance(fast, InferenceModel) and not fast.training
    with pytest.raises(RuntimeError, match="eval-only"):
        fast.train()
    fast.eval()
    with pytest.raises(ValueError, match="already optimised"):
        optimize_for_inference(fast)
    with pytest.raises(ValueError, match="precision"):
        optimize_for_inference(_model("nasfpn_tiny"), precision="int8")
    with pytest.raises(ValueError, match="CUDA"):
        optimize_for_inference(_model("nasfpn_tiny"), precision="fp16")


def test_detections_match_plain():
    model = _model("nasfpn_tiny")
    x = _images()
    calibrate_scores(model, x, model.test_cfg.score_thr, 300)
    metas = [ImageMeta((SIZE, SIZE), (SIZE, SIZE), (1.0, 1.0))] * 2
    with torch.no_grad():
        ref = model.postprocess(model(x), metas)
    fast = optimize_for_inference(model)
    got = fast.postprocess(fast(x), metas)
    for r, g in zip(ref, got):
        assert len(r["scores"]) > 20 and len(g["scores"]) == len(r["scores"])
        # Top detections: same label and box, scores equal to float32 rounding.
        for box, score, label in zip(r["boxes"][:20], r["scores"][:20], r["labels"][:20]):
            match = (g["labels"] == label) & ((g["boxes"] - box).abs().amax(dim=1) < 1e-2)
            assert match.any(), f"detection {box.tolist()} (label {int(label)}) lost"
            assert (g["scores"][match] - score).abs().min() < 1e-5


@pytest.mark.slow
def test_compiled_matches_plain(request):
    # torch.compile takes tens of seconds to minutes on a small CPU: run with -m slow or NASFPN_SLOW=1.
    expr = request.config.getoption("-m") or ""
    if os.environ.get("NASFPN_SLOW") != "1" and ("slow" not in expr or "not slow" in expr):
        pytest.skip("slow: torch.compile")
    model = _model("nasfpn_tiny")
    x = _images(1)
    with torch.no_grad():
        ref = model(x)
    fast = optimize_for_inference(model, compile=True)
    _assert_maps_close(fast(x), ref, 1e-4)


# --------------------------------------------------------------------------- post-processing selection


def _select_topk_reference(cls_maps, reg_maps, anchors, num_classes, score_thr, nms_pre):
    """The straightforward form: sigmoid of every pair, top-k of the scores, then the threshold."""
    scores_all, labels_all, deltas_all, anchors_all = [], [], [], []
    n = cls_maps[0].shape[0]
    for cls, reg, anc in zip(cls_maps, reg_maps, anchors):
        scores = cls.permute(0, 2, 3, 1).reshape(n, -1).sigmoid()
        deltas = reg.permute(0, 2, 3, 1).reshape(n, -1, 4)
        k = scores.shape[1] if nms_pre <= 0 else min(nms_pre, scores.shape[1])
        top, idx = scores.topk(k, dim=1)
        anchor_idx = idx // num_classes
        scores_all.append(top)
        labels_all.append(idx % num_classes)
        deltas_all.append(torch.gather(deltas, 1, anchor_idx[..., None].expand(-1, -1, 4)))
        anchors_all.append(anc[anchor_idx])
    scores = torch.cat(scores_all, 1)
    return scores, torch.cat(labels_all, 1), torch.cat(deltas_all, 1), torch.cat(anchors_all, 1), scores > score_thr


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("nms_pre", [0, 7, 100, 1000])
def test_select_topk_equals_reference(channels_last, nms_pre):
    g = torch.Generator().manual_seed(0)
    num_classes, num_a, n = 5, 3, 2
    sizes = [(12, 10), (6, 5), (3, 3)]
    total = sum(h * w for h, w in sizes) * num_a * num_classes * n
    # Distinct logits whose sigmoids are distinct too: no ties, so the order is unique.
    values = torch.linspace(-6.0, 3.0, total)[torch.randperm(total, generator=g)]
    cls_maps, reg_maps, anchors, offset = [], [], [], 0
    for h, w in sizes:
        count = n * num_a * num_classes * h * w
        cls = values[offset : offset + count].view(n, num_a * num_classes, h, w)
        offset += count
        reg = torch.randn(n, num_a * 4, h, w, generator=g)
        if channels_last:
            cls, reg = (
                cls.contiguous(memory_format=torch.channels_last),
                reg.contiguous(memory_format=torch.channels_last),
            )
        cls_maps.append(cls)
        reg_maps.append(reg)
        anchors.append(torch.randn(h * w * num_a, 4, generator=g))
    got = select_topk(cls_maps, reg_maps, anchors, num_classes, 0.05, nms_pre)
    ref = _select_topk_reference(cls_maps, reg_maps, anchors, num_classes, 0.05, nms_pre)
    # The sigmoid of k selected logits may differ from that of the whole map in the last bit
    # (vectorised body vs tail); everything else is identical.
    torch.testing.assert_close(got[0], ref[0], rtol=3e-7, atol=0)
    for name, a, b in zip(["labels", "deltas", "anchors", "keep"], got[1:], ref[1:]):
        assert torch.equal(a, b), name
    assert got[4].any()
    if nms_pre in (0, 1000):  # every pair selected: the threshold must have cut some
        assert not got[4].all()


# --------------------------------------------------------------------------- training fast paths


def _train_pair(checkpoint: bool):
    cfg = get_config("nasfpn_tiny", [f"model.neck.checkpoint_stacks={checkpoint}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_backbone=False).train()
    calls = []
    for stage in model.neck.fpn_stages:
        stage.register_forward_pre_hook(lambda *_: calls.append(1))
    x = _images(2)
    losses = model.loss(model(x), synthetic_targets(2, SIZE))
    losses["loss"].backward()
    return model, len(calls)


def test_checkpoint_stacks_same_gradients_bn_updated_once():
    plain, plain_calls = _train_pair(False)
    ckpt, ckpt_calls = _train_pair(True)
    stacks = len(plain.neck.fpn_stages)
    assert plain_calls == stacks and ckpt_calls == 2 * stacks  # the stages really were recomputed
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    buffers = dict(plain.named_buffers())
    fresh = dict(build_model(get_config("nasfpn_tiny").model, pretrained_backbone=False).named_buffers())
    for name, b in ckpt.named_buffers():
        if name.startswith("neck.fpn_stages") and "num_batches_tracked" in name:
            assert int(b) == 1, name
        if name.startswith("neck.fpn_stages") and name.endswith("running_mean"):
            assert not torch.equal(b, fresh[name]), f"{name} not updated"
        torch.testing.assert_close(b, buffers[name], rtol=1e-6, atol=1e-7, msg=name)


def test_network_step_has_no_sync_points():
    """Forward, backward and the SGD update of the network itself: nothing waits for the host."""
    model = build_model(get_config("nasfpn_tiny").model, pretrained_backbone=False).train()
    optimizer = make_sgd(model.parameters(), 0.01, 0.9, 1e-4, "cpu")
    x = _images(2)

    def step():
        cls_maps, reg_maps = model(x)
        (sum(m.float().square().mean() for m in cls_maps + reg_maps)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    assert find_sync_points(step) == []


def test_loss_has_no_sync_points():
    model = build_model(get_config("nasfpn_tiny").model, pretrained_backbone=False).train()
    outputs = model(_images(2))
    targets = synthetic_targets(2, SIZE)
    assert find_sync_points(lambda: model.loss(outputs, targets)["loss"].backward()) == []


def test_find_sync_points_sees_syncs():
    x = torch.arange(6.0)
    assert find_sync_points(lambda: x.sum().item()) == ["aten::_local_scalar_dense"]
    assert find_sync_points(lambda: x[x > 2]) == ["aten::index (boolean mask)"]
    assert find_sync_points(lambda: x.clone().masked_fill_(x > 2, 0)) == []

    def masked_scalar_store():
        y = x.clone()
        y[y > 2] = 0.0  # becomes masked_fill: no sync

    assert find_sync_points(masked_scalar_store) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_step_does_not_sync():
    model = build_model(get_config("nasfpn_tiny").model, pretrained_backbone=False).cuda().train()
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_sgd(model.parameters(), 0.01, 0.9, 1e-4, "cuda")
    x = _images(2).cuda().contiguous(memory_format=torch.channels_last)
    for _ in range(2):  # the first step initialises optimizer state
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with autocast("cuda", "bf16"):
                cls_maps, reg_maps = model(x)
            sum(m.float().square().mean() for m in cls_maps + reg_maps).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_training_settings():
    assert loader_settings("cpu", 0) == {"num_workers": 0, "pin_memory": False}
    s = loader_settings("cuda", 4)
    assert s["pin_memory"] and s["persistent_workers"] and s["num_workers"] == 4
    params = [nn.Parameter(torch.zeros(3))]
    assert not make_sgd(params, 0.1, 0.9, 0.0, "cpu").defaults["fused"]
    with autocast("cpu", "bf16"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError):
        autocast("cpu", "int8")


def test_detector_optimize_option():
    import numpy as np

    import nasfpn

    image = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)
    torch.manual_seed(0)
    plain = nasfpn.load("nasfpn_tiny", optimize=False)
    fast = nasfpn.Detector(plain.model, plain.config, optimize={"channels_last": True})
    assert isinstance(fast._runner, InferenceModel) and plain._runner is plain.model
    assert fast.model is plain.model  # export and saving still see the plain model
    a, b = plain.predict([image], score_thr=0.005)[0], fast.predict([image], score_thr=0.005)[0]
    assert len(a["scores"]) > 10 and len(a["scores"]) == len(b["scores"])
    np.testing.assert_allclose(b["scores"][:10], a["scores"][:10], rtol=1e-4)


def test_the_fast_path_flushes_denormals_on_cpu_and_clears_the_flag_after():
    # Denormal float32 arithmetic is many times slower on x86; an untrained MobileNetV2 shrinks its
    # activations into that range. Inside the fast path, such results are zero.
    model = _model("nasfpn_tiny")
    seen = []
    model.neck.register_forward_hook(lambda *_: seen.append(float(torch.tensor([1e-39]) * 1.0)))
    fast = optimize_for_inference(model, fuse_bn=False, channels_last=False)
    fast(_images(1))
    assert seen == [0.0]
    assert float(torch.tensor([1e-39]) * 1.0) > 0  # cleared again outside
