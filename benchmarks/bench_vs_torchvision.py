"""Our RetinaNet-R50-FPN against torchvision's, end to end (image tensor -> final boxes), same process.

    python benchmarks/bench_vs_torchvision.py                # CPU, 2 threads, 640x640, batch 1
    python benchmarks/bench_vs_torchvision.py --device cuda --batch 8

Both models get the same 640x640 RGB image as a float (3, H, W) tensor in [0, 1], random weights
(no downloads) and a class bias shifted so that ~1000 (anchor, class) pairs per image pass the
0.05 score threshold, as with trained weights (post-processing cost depends on that count).
Variants run round-robin (one call each per round) so machine load hits all alike; the table
shows medians over the rounds.

- ``torchvision``: ``retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=640,
  max_size=640)``, eval, as a user gets it; ``torchvision CL`` adds channels-last weights (the
  generic lever, for a fair reading).
- ``ours plain``: ``retinanet_r50_fpn_crop640_50e`` as built; ``ours fast``:
  ``optimize_for_inference`` (BN folded, channels-last, fp32); ``ours fast bf16``: the same in
  bf16 (only where the CPU has native bf16, or on CUDA); ``--compile`` adds ``ours fast compiled``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch

from harness import add_interleaved_args, cpu_supports_bf16, interleaved_with_load, markdown_table, median_ms
from nasfpn.apps.bench import calibrate_scores, environment, infer_step, percentile, synthetic_images
from nasfpn.core.presets import get_config
from nasfpn.deploy.fast import optimize_for_inference
from nasfpn.models import build_model


def torchvision_model(size: int, device: torch.device):
    from torchvision.models.detection import retinanet_resnet50_fpn

    torch.manual_seed(0)
    return retinanet_resnet50_fpn(weights=None, weights_backbone=None, min_size=size, max_size=size).eval().to(device)


@torch.no_grad()
def calibrate_torchvision(model, images: list[torch.Tensor], score_thr: float, pairs_per_image: int) -> float:
    """The class-bias shift of ``calibrate_scores`` for torchvision's RetinaNet."""
    batch, _ = model.transform(images)
    logits = model.head.classification_head(list(model.backbone(batch.tensors).values()))  # (N, HWA, K)
    kth = logits.flatten(1).topk(pairs_per_image, dim=1).values[:, -1].mean().item()
    shift = math.log(score_thr / (1 - score_thr)) - kth + 1e-4
    model.head.classification_head.cls_logits.bias += shift
    return shift


def torchvision_step(model, images: list[torch.Tensor], device: torch.device):
    """``model(images)`` split into transform / network / post-processing, as RetinaNet.forward does it."""
    import time

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    @torch.no_grad()
    def run():
        a = time.perf_counter()
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, _ = model.transform(images)
        sync()
        b = time.perf_counter()
        features = list(model.backbone(batch.tensors).values())
        head = model.head(features)
        sync()
        c = time.perf_counter()
        anchors = model.anchor_generator(batch, features)
        per_level = [x.size(2) * x.size(3) for x in features]
        a_per_cell = head["cls_logits"].size(1) // sum(per_level)
        per_level = [hw * a_per_cell for hw in per_level]
        split_head = {k: list(v.split(per_level, dim=1)) for k, v in head.items()}
        split_anchors = [list(x.split(per_level)) for x in anchors]
        dets = model.postprocess_detections(split_head, split_anchors, batch.image_sizes)
        dets = model.transform.postprocess(dets, batch.image_sizes, original_sizes)
        sync()
        d = time.perf_counter()
        return {"pre": b - a, "net": c - b, "post": d - c, "detections": sum(len(x["scores"]) for x in dets)}

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_interleaved_args(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="add the fast path under torch.compile (inductor, frozen weights on CPU; compiles in warm-up)",
    )
    p.add_argument("--json", help="also write the raw timings here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = get_config("retinanet_r50_fpn_crop640_50e", [f"data.image_size={args.size}"])
    arrays = synthetic_images(args.batch, args.size, args.size)
    tensors = [torch.from_numpy(a).permute(2, 0, 1).float().div(255).to(dev) for a in arrays]  # same pixels

    torch.manual_seed(0)
    ours = build_model(cfg.model, pretrained_backbone=False).to(dev).eval()
    from nasfpn.data.transforms import preprocess_batch

    x, _ = preprocess_batch(tensors, args.size, cfg.data.pad_divisor, cfg.data.mean, cfg.data.std, dev)
    calibrate_scores(ours, x, cfg.model.test.score_thr, args.pairs_per_image)
    tv = torchvision_model(args.size, dev)
    calibrate_torchvision(tv, tensors, tv.score_thresh, args.pairs_per_image)
    tv_cl = torchvision_model(args.size, dev)
    tv_cl.load_state_dict(tv.state_dict())
    tv_cl = tv_cl.to(memory_format=torch.channels_last)

    variants = {
        "torchvision": torchvision_step(tv, tensors, dev),
        "torchvision CL": torchvision_step(tv_cl, tensors, dev),
        "ours plain": infer_step(ours, tensors, cfg, args.size, dev),
        "ours fast": infer_step(optimize_for_inference(ours), tensors, cfg, args.size, dev),
    }
    bf16 = not args.no_bf16 and (dev.type == "cuda" or cpu_supports_bf16())
    if bf16:
        variants["ours fast bf16"] = infer_step(
            optimize_for_inference(ours, precision="bf16"), tensors, cfg, args.size, dev
        )

    if args.compile:
        variants["ours fast compiled"] = infer_step(
            optimize_for_inference(ours, compile=True), tensors, cfg, args.size, dev
        )
    env = environment(dev)
    times, (load_before, load_after) = interleaved_with_load(variants, args.rounds, args.warmup)

    def med(name: str, key: str) -> float:
        return median_ms(times, name, key)

    base = med("torchvision", "total")
    base_cl = med("torchvision CL", "total")
    rows = []
    for name in variants:
        total = med(name, "total")
        parts = [med(name, k) for k in ("pre", "net", "post")]
        rows.append(
            {
                "variant": name,
                "e2e_ms": total,
                "p90_ms": percentile(times[name]["total"], 90) * 1e3,
                "pre_ms": parts[0],
                "net_ms": parts[1],
                "post_ms": parts[2],
                "post_pct": 100 * parts[2] / sum(parts),
                "vs_tv": total / base,
                "vs_tv_cl": total / base_cl,
                "dets": statistics.median(times[name]["detections"]) / args.batch,
            }
        )
    print(
        f"# RetinaNet-R50-FPN, ours vs torchvision: {dev}, {args.threads} threads, batch {args.batch}, "
        f"{args.size}x{args.size}, {args.rounds} rounds (medians)"
    )
    print(
        f"torch {env['torch']}, torchvision {env.get('torchvision')}, {env.get('gpu') or env['cpu']}, "
        f"{env['cpu_capability']}; load average {load_before:.1f} -> {load_after:.1f}\n"
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
                ("vs_tv", "x torchvision"),
                ("vs_tv_cl", "x torchvision CL"),
                ("dets", "detections/img"),
            ],
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "env": env, "load": [load_before, load_after], "rows": rows, "times": times},
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
