"""One training iteration against MMDetection 3.3 (tests/fixtures/mmdet/train).

The reference weights (fill rule ``uniform-v1``, seed ``public``) are loaded through our
MMDetection converter; the fixed batch of 2 images runs through our train-mode forward, loss,
backward and one SGD step built by ``nasfpn.engine.optim`` with the schedule's warm-up learning
rate at step 0 (0.08 x 0.1). Checked against the record with the tolerances the record states:

- per-level losses, totals and ``avg_factor``; positives and their gt (``pos_anchor_index`` /
  ``pos_gt_index``) from our assigner; the valid-flag probe (image 1 with pad_shape (600, 520));
- BN running statistics after the forward (frozen stem BN untouched);
- gradients of the 23 recorded tensors (``retina_cls`` / ``retina_reg`` tight, inner loose);
- the optimizer group (weight decay) of each tensor, the group summary, the value after the step,
  and the frozen tensor left unchanged.

The float32 pass of both models runs by default (about 10 s each). The float64 pass with tight
tolerances takes minutes on 2 CPU cores (no oneDNN kernels for float64 convolutions), so it is
marked slow and runs with ``-m slow`` or ``NASFPN_SLOW=1``. In float64, anchors, IoU, assignment
and box targets stay float32, as in MMDetection (our loss does this for any model dtype).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mmdet_reference import filled_state_dict, state_dict_sha256
from nasfpn.core.mmdet import rename_key
from nasfpn.core.presets import PRESETS
from nasfpn.core.weights import load_into_model
from nasfpn.engine.optim import build_optimizer, group_of
from nasfpn.engine.schedule import LRSchedule
from nasfpn.models import build_model
from nasfpn.models.boxes import BACKGROUND, IGNORE

MODELS = {"r50_fpn": "retinanet_r50_fpn_crop640_50e", "r50_nasfpn": "retinanet_r50_nasfpn_crop640_50e"}


def _slow_enabled(config) -> bool:
    expr = config.getoption("-m") or ""
    return os.environ.get("NASFPN_SLOW") == "1" or ("slow" in expr and "not slow" not in expr)


# The default run checks the NAS-FPN model's iteration (the trainer's assignment, losses, gradients
# and SGD step are shared); the FPN model's, which differs in the neck only, is slow like float64
# (~11 s; its inference parity is in the default run, tests/test_parity_mmdet.py).
PASSES = [
    pytest.param(("r50_fpn", "float32"), id="r50_fpn-float32", marks=pytest.mark.slow),
    pytest.param(("r50_nasfpn", "float32"), id="r50_nasfpn-float32"),
    pytest.param(("r50_fpn", "float64"), id="r50_fpn-float64", marks=pytest.mark.slow),
    pytest.param(("r50_nasfpn", "float64"), id="r50_nasfpn-float64", marks=pytest.mark.slow),
]


@dataclass
class Tol:
    """The record's tolerances for one precision."""

    loss_rel: float
    loss_abs: float
    bn_mean: float
    bn_var: float
    head_grad: float  # x max_abs
    head_grad_stats: float  # relative
    head_after: float  # x max step
    inner_grad: float  # x max_abs
    inner_sum: float  # x abs_sum
    inner_stats: float  # relative
    inner_after: float  # x max step
    global_stats: float  # relative


TOL = {
    "float32": Tol(1e-3, 1e-4, 2e-4, 1e-3, 3e-3, 2e-3, 1e-2, 0.25, 0.05, 0.1, 0.5, 0.1),
    "float64": Tol(1e-6, 1e-9, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6, 1e-6),
}


def _our_name(mmdet_name: str) -> str:
    name = rename_key(mmdet_name)
    assert name is not None, mmdet_name
    return name


def _bn_module_name(mmdet_bn: str) -> str:
    """An MMDetection BN layer name -> ours (via the key of its running_mean)."""
    return _our_name(mmdet_bn + ".running_mean").removesuffix(".running_mean")


@pytest.fixture(scope="module", params=PASSES)
def iteration(request, reference_dir):
    """Everything one training iteration produces, for one model and one precision."""
    short, dtype_name = request.param
    if dtype_name == "float64" and not _slow_enabled(request.config):
        pytest.skip("float64 training parity is slow: run with -m slow or NASFPN_SLOW=1")
    dtype = getattr(torch, dtype_name)
    ref_all = json.loads((reference_dir / "train" / f"losses_{short}.json").read_text())
    ref = ref_all[dtype_name]
    batch = json.loads((reference_dir / "train" / "batch.json").read_text())

    filled = filled_state_dict(short, reference_dir)
    assert state_dict_sha256(filled) == ref_all["state_dict_sha256"]
    cfg = PRESETS[MODELS[short]]
    model = build_model(cfg.model, pretrained_backbone=False)
    load_into_model(model, filled, "mmdet")
    model.to(dtype).train()
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())

    inputs = torch.from_numpy(np.load(reference_dir / "train" / "batch.npz")["inputs"]).to(dtype)
    targets = [
        {
            "boxes": torch.tensor(im["gt_bboxes"], dtype=torch.float32),
            "labels": torch.tensor(im["gt_labels"], dtype=torch.int64),
            "pad_shape": tuple(im["pad_shape"]),
        }
        for im in batch["images"]
    ]
    names = {n: _our_name(n) for n in ref_all["param_names"]}
    before = {n: params[o].detach().clone() for n, o in names.items()}
    bn_before = {n: modules[_bn_module_name(n)].running_mean.clone() for n in ref_all["bn_names"]}

    outputs = model(inputs)
    losses = model.loss(outputs, targets)
    bn_after = {}
    for n in ref_all["bn_names"]:
        m = modules[_bn_module_name(n)]
        bn_after[n] = {
            "mode": "train" if m.training else "eval",
            "running_mean": m.running_mean.clone(),
            "running_var": m.running_var.clone(),
            "num_batches_tracked": int(m.num_batches_tracked),
        }

    # Assignment and the valid-flag probe, on the same head outputs.
    anchors = torch.cat(model.anchors(outputs))
    sizes = [tuple(c.shape[-2:]) for c in outputs[0]]
    assigned = []
    for t in targets:
        valid = model.anchor_generator.valid_flags(sizes, t["pad_shape"])
        assigned.append(model.criterion.assigner(anchors, t["boxes"], valid))
    probe_targets = [dict(t) for t in targets]
    probe_img = ref["valid_flag_probe"]["pad_shape_override"]
    probe_targets[probe_img["image"]]["pad_shape"] = tuple(probe_img["pad_shape"])
    with torch.no_grad():
        probe = model.loss(tuple([m.detach() for m in maps] for maps in outputs), probe_targets)
    probe_valid = [model.anchor_generator.valid_flags(sizes, t["pad_shape"]) for t in probe_targets]
    probe_assigned = [model.criterion.assigner(anchors, t["boxes"], v) for t, v in zip(probe_targets, probe_valid)]

    losses["loss"].backward()
    grads = {n: (None if params[o].grad is None else params[o].grad.detach().clone()) for n, o in names.items()}
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    unique = {id(p): p for p in model.parameters()}
    trainable = [p for p in unique.values() if p.requires_grad]
    grad_sq = sum(float(p.grad.double().pow(2).sum()) for p in trainable)
    grad_abs = sum(float(p.grad.double().abs().sum()) for p in trainable)

    steps_per_epoch = 1000  # any value: step 0 is inside the warm-up
    schedule = LRSchedule.from_config(cfg.train, cfg.train.base_lr, steps_per_epoch)
    lr = schedule(0)
    optimizer = build_optimizer(model, cfg.train, lr)
    groups = {n: group_of(optimizer, params[o]) for n, o in names.items()}
    optimizer.step()
    after = {n: params[o].detach().clone() for n, o in names.items()}

    loss_after = None
    if "loss_after_step" in ref:
        with torch.no_grad():
            loss_after = model.loss(model(inputs), targets)
    return {
        "short": short,
        "dtype": dtype_name,
        "ref": ref,
        "ref_all": ref_all,
        "tol": TOL[dtype_name],
        "model": model,
        "optimizer": optimizer,
        "lr": lr,
        "names": names,
        "losses": {k: v.detach() for k, v in losses.items()},
        "outputs": outputs,
        "assigned": assigned,
        "probe": probe,
        "probe_valid": probe_valid,
        "probe_assigned": probe_assigned,
        "bn_before": bn_before,
        "bn_after": bn_after,
        "before": before,
        "grads": grads,
        "after": after,
        "groups": groups,
        "without_grad": without_grad,
        "grad_sq": grad_sq,
        "grad_abs": grad_abs,
        "loss_after": loss_after,
    }


def _check_loss(name, mine, ref, tol: Tol):
    mine, ref = float(mine), float(ref)
    assert abs(mine - ref) <= tol.loss_rel * abs(ref) + tol.loss_abs, f"{name}: {mine!r} vs reference {ref!r}"


def _rel(name, mine, ref, rtol):
    mine, ref = float(mine), float(ref)
    assert abs(mine - ref) <= rtol * abs(ref) + 1e-300, (
        f"{name}: {mine!r} vs {ref!r} (rel {abs(mine - ref) / abs(ref):.3g} > {rtol})"
    )


def test_losses_and_avg_factor(iteration):
    it = iteration
    ref, tol, losses = it["ref"], it["tol"], it["losses"]
    assert float(losses["avg_factor"]) == ref["avg_factor"]
    for lvl in range(5):
        _check_loss(f"loss_cls P{lvl + 3}", losses["loss_cls_levels"][lvl], ref["losses"]["loss_cls"][lvl], tol)
        _check_loss(f"loss_bbox P{lvl + 3}", losses["loss_bbox_levels"][lvl], ref["losses"]["loss_bbox"][lvl], tol)
    _check_loss("loss_cls", losses["loss_cls"], ref["losses"]["loss_cls_total"], tol)
    _check_loss("loss_bbox", losses["loss_bbox"], ref["losses"]["loss_bbox_total"], tol)
    _check_loss("loss", losses["loss"], ref["losses"]["loss"], tol)


def test_assignment(iteration):
    it = iteration
    ref_all = it["ref_all"]
    counts = [c.shape[-2] * c.shape[-1] * 9 for c in it["outputs"][0]]
    assert [list(c.shape[-2:]) for c in it["outputs"][0]] == ref_all["featmap_sizes_hw"]
    for i, (assigned, ref) in enumerate(zip(it["assigned"], ref_all["assign"])):
        pos = (assigned >= 0).nonzero().squeeze(1)
        assert pos.tolist() == ref["pos_anchor_index"], f"image {i}: positive anchors differ"
        assert assigned[pos].tolist() == ref["pos_gt_index"], f"image {i}: gt of positives differ"
        assert int((assigned == BACKGROUND).sum()) == ref["num_neg"]
        assert int((assigned == IGNORE).sum()) == ref["num_ignored"] + ref["num_invalid"]
        per_level = [int(s.sum()) for s in (assigned >= 0).split(counts)]
        assert per_level == ref["num_pos_per_level"]
        assert int(assigned.numel()) == ref["num_anchors"]


def test_valid_flag_probe(iteration):
    it = iteration
    ref, ref_all, tol = it["ref"]["valid_flag_probe"], it["ref_all"], it["tol"]
    probe = it["probe"]
    assert float(probe["avg_factor"]) == ref["avg_factor"]
    for lvl in range(5):
        _check_loss(f"probe loss_cls P{lvl + 3}", probe["loss_cls_levels"][lvl], ref["loss_cls"][lvl], tol)
        _check_loss(f"probe loss_bbox P{lvl + 3}", probe["loss_bbox_levels"][lvl], ref["loss_bbox"][lvl], tol)
    counts = [c.shape[-2] * c.shape[-1] * 9 for c in it["outputs"][0]]
    for i, (valid, assigned, r) in enumerate(
        zip(it["probe_valid"], it["probe_assigned"], ref_all["valid_flag_probe_assign"])
    ):
        assert int(valid.sum()) == r["num_valid"], f"image {i}"
        assert [int(s.sum()) for s in valid.split(counts)] == r["num_valid_per_level"], f"image {i}"
        assert int((assigned >= 0).sum()) == r["num_pos"]
        assert int((assigned == BACKGROUND).sum()) == r["num_neg"]


def test_bn_running_statistics(iteration):
    it = iteration
    tol = it["tol"]
    for name, ref in it["ref"]["bn_after_forward"].items():
        mine = it["bn_after"][name]
        assert mine["mode"] == ref["mode"], name
        assert mine["num_batches_tracked"] == ref["num_batches_tracked"], name
        np.testing.assert_array_equal(it["bn_before"][name].float().numpy(), np.float32(ref["running_mean_before"]))
        mean = mine["running_mean"].double().numpy()
        var = mine["running_var"].double().numpy()
        if it["dtype"] == "float64":
            ok_mean = np.abs(mean - ref["running_mean"]) <= tol.bn_mean * np.abs(ref["running_mean"]) + 1e-9
            ok_var = np.abs(var - ref["running_var"]) <= tol.bn_var * np.abs(ref["running_var"]) + 1e-9
        else:
            ok_mean = np.abs(mean - ref["running_mean"]) <= tol.bn_mean
            ok_var = np.abs(var - ref["running_var"]) <= tol.bn_var
        assert ok_mean.all(), f"{name} running_mean: max diff {np.abs(mean - ref['running_mean']).max():.3g}"
        assert ok_var.all(), f"{name} running_var: max diff {np.abs(var - ref['running_var']).max():.3g}"
        if ref["mode"] == "eval":
            assert torch.equal(mine["running_mean"], it["bn_before"][name]), f"{name} is in eval mode but changed"


def test_gradients(iteration):
    it = iteration
    tol = it["tol"]
    ref_params = it["ref"]["params"]
    assert it["without_grad"] == [], "trainable tensors without gradient"
    g = it["ref"]["grad_global"]
    assert (
        len([p for p in {id(p): p for p in it["model"].parameters()}.values() if p.requires_grad]) == g["num_trainable"]
    )
    _rel("grad_global sq_sum", it["grad_sq"], g["grad_sq_sum_all"], tol.global_stats)
    _rel("grad_global abs_sum", it["grad_abs"], g["grad_abs_sum_all"], tol.global_stats)
    for name, ref in ref_params.items():
        grad = it["grads"][name]
        if ref["grad"] is None:
            assert grad is None, f"{name} is frozen in MMDetection but got a gradient"
            continue
        assert grad is not None, f"{name}: no gradient"
        head = ".retina_" in name
        r = ref["grad"]
        flat = grad.double().flatten()
        values = flat[r["idx"]].numpy()
        max_abs = r["max_abs"]
        rel_values = tol.head_grad if head else tol.inner_grad
        diff = np.abs(values - np.asarray(r["values"]))
        assert (diff <= rel_values * max_abs).all(), f"{name}: grad values off by {diff.max() / max_abs:.3g} x max_abs"
        stats_tol = tol.head_grad_stats if head else tol.inner_stats
        _rel(f"{name} grad abs_sum", flat.abs().sum(), r["abs_sum"], stats_tol)
        _rel(f"{name} grad sq_sum", flat.pow(2).sum(), r["sq_sum"], stats_tol)
        _rel(f"{name} grad max_abs", flat.abs().max(), r["max_abs"], stats_tol)
        if head:
            # The sum of a gradient cancels to exactly 0 in places (e.g. retina_reg.bias):
            # compare against the tensor's abs_sum.
            assert abs(float(flat.sum()) - r["sum"]) <= tol.head_grad_stats * r["abs_sum"], f"{name} grad sum"
        else:
            assert abs(float(flat.sum()) - r["sum"]) <= tol.inner_sum * r["abs_sum"], f"{name} grad sum"


def test_optimizer_groups(iteration):
    it = iteration
    assert it["lr"] == it["ref_all"]["lr_used"] == pytest.approx(0.008, abs=0)
    for name, ref in it["ref"]["params"].items():
        mine = it["groups"][name]
        want = ref["optimizer_group"]
        if want is None:
            assert mine is None, f"{name} is frozen but is in the optimizer"
            continue
        assert mine is not None, f"{name} is missing from the optimizer"
        for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov"):
            assert mine[key] == want[key], f"{name}: {key} {mine[key]!r} vs {want[key]!r}"
    # The whole-model summary: tensors and elements per weight decay, frozen ones left out.
    summary = it["ref_all"]["optimizer_summary"]["groups_by_weight_decay"]
    opt = it["optimizer"]
    by_wd: dict[float, list[torch.Tensor]] = {}
    for group in opt.param_groups:
        by_wd.setdefault(group["weight_decay"], []).extend(group["params"])
    for wd, key in ((1e-4, "weight_decay=0.0001"), (0.0, "weight_decay=0")):
        assert len(by_wd[wd]) == summary[key]["num_tensors"], key
        assert sum(p.numel() for p in by_wd[wd]) == summary[key]["num_elements"], key
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    frozen = [p for p in {id(p): p for p in it["model"].parameters()}.values() if id(p) not in in_opt]
    frozen_ref = summary["not in optimizer (requires_grad=False)"]
    assert len(frozen) == frozen_ref["num_tensors"]
    assert sum(p.numel() for p in frozen) == frozen_ref["num_elements"]


def test_sgd_step(iteration):
    it = iteration
    tol = it["tol"]
    for name, ref in it["ref"]["params"].items():
        before = it["before"][name].double().flatten()
        after = it["after"][name].double().flatten()
        idx = ref["idx"]
        ref_before = np.asarray(ref["value_before"])
        np.testing.assert_array_equal(before[idx].numpy(), ref_before)
        if ref["optimizer_group"] is None:
            assert torch.equal(before, after), f"frozen {name} changed"
            assert ref["update_abs_sum"] == 0.0
            continue
        ref_after = np.asarray(ref["value_after"])
        max_step = np.abs(ref_after - ref_before).max()
        head = ".retina_" in name
        rel = tol.head_after if head else tol.inner_after
        diff = np.abs(after[idx].numpy() - ref_after)
        assert (diff <= rel * max_step).all(), f"{name}: value after step off by {diff.max() / max_step:.3g} x max step"
        stats_tol = tol.head_grad_stats if head else tol.inner_stats
        _rel(f"{name} update_abs_sum", (after - before).abs().sum(), ref["update_abs_sum"], stats_tol)
        if it["dtype"] == "float64":
            # The step pins the weight decay: p - lr * (g + wd * p) on the first step.
            g = it["grads"][name].double().flatten()
            wd = ref["optimizer_group"]["weight_decay"]
            expected = before - it["lr"] * (g + wd * before)
            wd_term = it["lr"] * 1e-4 * before.abs()
            assert ((after - expected).abs() <= 0.01 * wd_term + 1e-15).all(), f"{name}: wrong weight decay"


def test_loss_after_step(iteration):
    it = iteration
    if it["loss_after"] is None:
        pytest.skip("the float32 record has no loss after the step (not reproducible in float32)")
    ref, tol, mine = it["ref"]["loss_after_step"], it["tol"], it["loss_after"]
    for lvl in range(5):
        _check_loss(f"after step loss_cls P{lvl + 3}", mine["loss_cls_levels"][lvl], ref["loss_cls"][lvl], tol)
        _check_loss(f"after step loss_bbox P{lvl + 3}", mine["loss_bbox_levels"][lvl], ref["loss_bbox"][lvl], tol)
    _check_loss("after step loss", mine["loss"], ref["loss"], tol)
