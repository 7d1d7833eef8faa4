"""Training input pipeline per worker core: JPEG decode + training transform, images/s.

    python benchmarks/bench_data.py                          # 48 COCO-sized JPEGs, 3 passes

What one DataLoader worker does per image, in one process with one intra-op thread (as PyTorch
sets in workers): decode a 640x480 JPEG (quality 90, synthetic photo-like content, ~120 KB),
then ``TrainTransform`` (random resize 0.8-1.2 of 640, random crop 640, random flip) and the
normalise + pad of the collate (timed apart: it can run on the GPU instead). Two decoders: the library's reader (PIL, EXIF-aware, any mode)
and ``torchvision.io.decode_image`` (libjpeg-turbo into a tensor). The variants alternate pass by
pass; medians over all images of all passes.

If OpenCV is importable (it is not a dependency), a what-if row swaps the transform's resize
(float32 bilinear, rounded half up) for ``cv2.resize(INTER_LINEAR)``, the call MMDetection's
pipeline makes, to show what the resize costs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from harness import markdown_table
from nasfpn.apps.bench import bench_data
from nasfpn.core.presets import get_config


def cv2_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    import cv2

    if tuple(image.shape[-2:]) == (height, width):
        return image
    hwc = image.permute(1, 2, 0).contiguous().numpy()
    return (
        torch.from_numpy(cv2.resize(hwc, (width, height), interpolation=cv2.INTER_LINEAR)).permute(2, 0, 1).contiguous()
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="retinanet_r50_nasfpn_crop640_50e")
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3, help="passes over the images per decoder")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args()

    cfg = get_config(args.model)
    loads = [os.getloadavg()[0]]
    runs: dict[str, list[dict]] = {"pil": [], "torchvision": []}
    try:
        import cv2

        cv2.setNumThreads(1)
        runs["torchvision + cv2 resize (what-if)"] = []
    except ImportError:
        pass
    from nasfpn.data import transforms

    for _ in range(args.rounds):
        for name in runs:
            original = transforms.resize_image
            if "cv2" in name:
                transforms.resize_image = cv2_resize
            try:
                decoder = "pil" if name == "pil" else "torchvision"
                runs[name].append(bench_data(cfg, images=args.images, quality=args.quality, decoder=decoder, passes=1))
            finally:
                transforms.resize_image = original
    loads.append(os.getloadavg()[0])
    env = runs["pil"][0]["env"]
    rows = []
    for name, rs in runs.items():
        rows.append(
            {
                "variant": name,
                "images_per_s": statistics.median(r["images_per_s"] for r in rs),
                "decode_ms": statistics.median(r["decode_ms"] for r in rs),
                "augment_ms": statistics.median(r["augment_ms"] for r in rs),
                "normalise_ms": statistics.median(r["normalise_ms"] for r in rs),
                "with_normalise": statistics.median(r["images_per_s_normalised"] for r in rs),
                "jpeg_kb": rs[0]["jpeg_kb"],
            }
        )
    print(
        f"# Training input pipeline, one worker (1 thread): {args.images} 640x480 JPEGs q{args.quality}, "
        f"train transform at {cfg.data.image_size}, {args.rounds} rounds (medians)"
    )
    print(
        f"torch {env['torch']}, torchvision {env.get('torchvision')}, {env['cpu']}; "
        f"load average {loads[0]:.1f} -> {loads[1]:.1f}\n"
    )
    print(
        markdown_table(
            rows,
            [
                ("variant", "variant"),
                ("images_per_s", "decode + augment images/s per worker"),
                ("decode_ms", "decode ms"),
                ("augment_ms", "augment ms"),
                ("normalise_ms", "normalise + pad ms"),
                ("with_normalise", "images/s incl. normalise"),
                ("jpeg_kb", "JPEG KB"),
            ],
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "loads": loads, "rows": rows, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
