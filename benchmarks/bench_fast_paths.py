"""Our R50-NAS-FPN in plain eager mode against its inference fast paths, end to end, same process.

    python benchmarks/bench_fast_paths.py                    # CPU, 2 threads, 640x640, batch 1
    python benchmarks/bench_fast_paths.py --compile          # adds torch.compile (minutes to compile)
    python benchmarks/bench_fast_paths.py --model retinanet_r50_fpn_crop640_50e

Variants (all from the same weights; class bias shifted so ~1000 pairs per image pass the score
threshold, see nasfpn/apps/bench.py), run round-robin, medians over rounds:

- ``plain``: the model as built (eager, fp32, NCHW, BN after every conv);
- ``fold``: BN folded (per-level head convs), NCHW;  ``CL``: channels-last only, BN kept;
- ``fold+CL``: the default fast path (fp32);
- ``fold+CL, head affine``: like fold+CL but the head keeps its shared convs with a per-level
  affine (the folded BN) instead of per-level conv copies: the alternative we did not pick;
- ``fold+CL bf16``: weights and activations in bf16 (CPUs with AVX512-BF16/AMX, or CUDA);
- ``compiled`` (``--compile``): fold+CL under torch.compile (inductor, freezing on CPU).

With ``--accuracy`` and the MMDetection reference fixtures (``../shared/reference`` or
``$NASFPN_SHARED/reference``), the fast paths are also compared with the plain model on the
reference images and weights: head-output error and how many of the plain top-100 detections
each fast path reproduces (same label, IoU >= 0.9).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from harness import add_interleaved_args, cpu_supports_bf16, interleaved_with_load, markdown_table, median_ms
from nasfpn.apps.bench import calibrate_scores, environment, infer_step, percentile, synthetic_images
from nasfpn.core.presets import get_config
from nasfpn.deploy.fast import optimize_for_inference
from nasfpn.models import build_model
from nasfpn.models.head import RetinaHead


class AffineSepBNHead(nn.Module):
    """The alternative to ``FoldedRetinaHead``: shared tower convs, each level's BN kept as a
    per-level affine (eval BN), ReLU in place."""

    def __init__(self, head: RetinaHead) -> None:
        super().__init__()
        self.head = head

    def forward(self, feats):
        h = self.head
        cls_out, reg_out = [], []
        for level, x in enumerate(feats):
            for convs, norms, pred, out in (
                (h.cls_convs, h.cls_norms[level], h.retina_cls, cls_out),
                (h.reg_convs, h.reg_norms[level], h.retina_reg, reg_out),
            ):
                y = x
                for conv, bn in zip(convs, norms):
                    y = F.batch_norm(conv(y), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
                    y = torch.relu_(y)
                out.append(pred(y))
        return cls_out, reg_out


def head_affine_variant(model):
    """fold+CL with the head swapped for ``AffineSepBNHead`` (the rest folded)."""
    fast = optimize_for_inference(model)
    head = model.head
    import copy

    fast.model.head = AffineSepBNHead(copy.deepcopy(head).eval().requires_grad_(False)).to(
        memory_format=torch.channels_last
    )
    return fast


# --------------------------------------------------------------------------- accuracy on reference weights


def _reference_dir() -> Path | None:
    shared = Path(os.environ.get("NASFPN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    ref = shared / "reference"
    return ref if (ref / "fill_weights.py").is_file() else None


def accuracy_report(model_name: str, variants: dict) -> list[dict]:
    """Fast paths vs plain on the MMDetection reference weights and images."""
    from PIL import Image

    from nasfpn.core.weights import load_into_model
    from nasfpn.data.transforms import preprocess_batch

    ref = _reference_dir()
    if ref is None:
        print("(reference fixtures not found: accuracy section skipped)")
        return []
    short = {"retinanet_r50_fpn_crop640_50e": "r50_fpn", "retinanet_r50_nasfpn_crop640_50e": "r50_nasfpn"}.get(
        model_name
    )
    if short is None:
        return []
    spec = importlib.util.spec_from_file_location("fill_weights", ref / "fill_weights.py")
    fw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fw)
    keys_state, tied = fw.state_dict_from_keys_json(ref / f"mmdet_keys_{short}.json")
    cfg = get_config(model_name)
    model = build_model(cfg.model, pretrained_backbone=False).eval()
    load_into_model(model, fw.fill_state_dict(keys_state, "public", tied), "mmdet")
    images = [np.array(Image.open(ref / name).convert("RGB")) for name in ("img_640x640.png", "img_640x480.png")]
    rows = []
    with torch.no_grad():
        plain_out, plain_dets = [], []
        for im in images:
            x, metas = preprocess_batch([im], cfg.data.image_size, cfg.data.pad_divisor, cfg.data.mean, cfg.data.std)
            out = model(x)
            plain_out.append(out)
            plain_dets.append(model.postprocess(out, metas)[0])
        for name, make in variants.items():
            fast = make(model)
            rel, matched, total, dscore = 0.0, 0, 0, []
            for im, ref_out, ref_det in zip(images, plain_out, plain_dets):
                x, metas = preprocess_batch(
                    [im], cfg.data.image_size, cfg.data.pad_divisor, cfg.data.mean, cfg.data.std
                )
                out = fast(x)
                for a, b in zip(out[0] + out[1], ref_out[0] + ref_out[1]):
                    rel = max(rel, ((a - b).abs().max() / b.abs().max()).item())
                det = fast.postprocess(out, metas)[0]
                from torchvision.ops import box_iou

                iou = (
                    box_iou(ref_det["boxes"], det["boxes"])
                    if len(det["boxes"])
                    else torch.zeros(len(ref_det["boxes"]), 0)
                )
                same = ref_det["labels"][:, None] == det["labels"][None, :]
                hit = (iou >= 0.9) & same
                matched += int(hit.any(dim=1).sum())
                total += len(ref_det["boxes"])
                for i in range(len(ref_det["boxes"])):
                    j = torch.nonzero(hit[i]).flatten()
                    if len(j):
                        dscore.append((det["scores"][j] - ref_det["scores"][i]).abs().min().item())
            rows.append(
                {
                    "variant": name,
                    "max_rel_err": rel,
                    "matched_pct": 100 * matched / max(total, 1),
                    "plain_dets": total,
                    "mean_abs_dscore": statistics.fmean(dscore) if dscore else None,
                    "max_abs_dscore": max(dscore) if dscore else None,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="retinanet_r50_nasfpn_crop640_50e")
    add_interleaved_args(p)
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant (slow to compile)")
    p.add_argument("--accuracy", action="store_true", help="compare detections on the MMDetection reference weights")
    p.add_argument("--json", help="also write the raw timings here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = get_config(args.model, [f"data.image_size={args.size}"])
    images = synthetic_images(args.batch, args.size, args.size)
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_backbone=False).to(dev).eval()
    from nasfpn.data.transforms import preprocess_batch

    x, _ = preprocess_batch(images, args.size, cfg.data.pad_divisor, cfg.data.mean, cfg.data.std, dev)
    calibrate_scores(model, x, cfg.model.test.score_thr, args.pairs_per_image)

    makers = {
        "fold": lambda m: optimize_for_inference(m, channels_last=False),
        "CL": lambda m: optimize_for_inference(m, fuse_bn=False, channels_last=True),
        "fold+CL": lambda m: optimize_for_inference(m),
    }
    if isinstance(model.head, RetinaHead) and model.head.separate_bn:
        makers["fold+CL, head affine"] = head_affine_variant
    if not args.no_bf16 and (dev.type == "cuda" or cpu_supports_bf16()):
        makers["fold+CL bf16"] = lambda m: optimize_for_inference(m, precision="bf16")
    variants = {"plain": infer_step(model, images, cfg, args.size, dev)}
    for name, make in makers.items():
        variants[name] = infer_step(make(model), images, cfg, args.size, dev)
    compile_s = None
    if args.compile:
        compiled = optimize_for_inference(model, compile=True)
        step = infer_step(compiled, images, cfg, args.size, dev)
        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
        variants["compiled"] = step
        makers["compiled"] = lambda m: compiled

    env = environment(dev)
    times, (load_before, load_after) = interleaved_with_load(variants, args.rounds, args.warmup)

    def med(name: str, key: str) -> float:
        return median_ms(times, name, key)

    base = med("plain", "total")
    rows = []
    for name in variants:
        parts = [med(name, k) for k in ("pre", "net", "post")]
        rows.append(
            {
                "variant": name,
                "e2e_ms": med(name, "total"),
                "p90_ms": percentile(times[name]["total"], 90) * 1e3,
                "pre_ms": parts[0],
                "net_ms": parts[1],
                "post_ms": parts[2],
                "post_pct": 100 * parts[2] / sum(parts),
                "vs_plain": med(name, "total") / base,
                "dets": statistics.median(times[name]["detections"]) / args.batch,
            }
        )
    print(
        f"# {cfg.name}: plain vs fast paths: {dev}, {args.threads} threads, batch {args.batch}, "
        f"{args.size}x{args.size}, {args.rounds} rounds (medians)"
    )
    print(
        f"torch {env['torch']}, {env.get('gpu') or env['cpu']}, {env['cpu_capability']}, native bf16: "
        f"{cpu_supports_bf16()}; load average {load_before:.1f} -> {load_after:.1f}"
        + (f"; compile + first call {compile_s:.0f} s" if compile_s is not None else "")
        + "\n"
    )
    print(
        markdown_table(
            rows,
            [
                ("variant", "variant"),
                ("e2e_ms", "end-to-end ms"),
                ("p90_ms", "p90 ms"),
                ("pre_ms", "pre ms"),
                ("net_ms", "network ms"),
                ("post_ms", "post ms"),
                ("post_pct", "post %"),
                ("vs_plain", "x plain"),
                ("dets", "detections/img"),
            ],
        )
    )
    acc = []
    if args.accuracy:
        acc = accuracy_report(args.model, {k: v for k, v in makers.items() if k != "compiled"})
        if acc:
            print("\nAgainst plain fp32 on the MMDetection reference weights and images (2 images):\n")
            print(
                markdown_table(
                    acc,
                    [
                        ("variant", "variant"),
                        ("max_rel_err", "max head error / max |output|"),
                        ("matched_pct", "plain detections reproduced %"),
                        ("plain_dets", "plain detections"),
                        ("mean_abs_dscore", "mean |score diff|"),
                        ("max_abs_dscore", "max |score diff|"),
                    ],
                )
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "env": env,
                    "load": [load_before, load_after],
                    "rows": rows,
                    "accuracy": acc,
                    "compile_s": compile_s,
                    "times": times,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
