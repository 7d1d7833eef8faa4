"""Detection on image files: ``predictions.json`` plus pictures with the boxes drawn.

A file that cannot be read is reported by name and skipped; the others are still processed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from nasfpn.core.fileio import write_json_atomic
from nasfpn.engine.hooks import ProgressLines

if TYPE_CHECKING:
    from nasfpn.deploy.predictor import Predictor


def load_detector(
    model: str | None,
    weights: str,
    device: str = "cpu",
    overrides: list[str] | None = None,
    config_file: str | None = None,
    optimize: bool | dict[str, Any] = True,
    print_fn=print,
) -> Predictor:
    """A PyTorch ``Detector`` or, for an ``.onnx`` file, an onnxruntime one with the same ``predict``.

    ``optimize``: PyTorch fast paths (``Detector``'s argument; with ``"precision": "auto"`` the
    choice is printed in one line); an ONNX file runs the precision it was exported in, so only
    fp32 or auto (nothing to choose) are accepted for one."""
    if str(weights).endswith(".onnx"):
        from nasfpn.deploy.onnx_runtime import OnnxDetector

        precision = optimize.get("precision", "fp32") if isinstance(optimize, dict) else "fp32"
        if precision not in ("fp32", "auto"):
            raise ValueError(
                f"{weights}: --precision {precision} applies to PyTorch weights; an exported ONNX file runs the "
                "precision it was exported in (nasfpn export --precision)"
            )
        return OnnxDetector(weights, model, overrides=overrides, config_file=config_file)
    from nasfpn.deploy.predictor import load

    det = load(model, weights=weights, device=device, overrides=overrides, optimize=optimize, config_file=config_file)
    if det.precision_choice is not None:
        print_fn(det.precision_choice.describe())
    return det


def run_predict(
    model: str | None,
    sources: list[str],
    weights: str,
    out: str | Path,
    device: str = "cpu",
    score_thr: float | None = None,
    batch_size: int = 4,
    vis: bool = True,
    vis_thr: float = 0.3,
    overrides: list[str] | None = None,
    config_file: str | None = None,
    optimize: bool | dict[str, Any] = True,
) -> list[str]:
    """Detect objects in every image of ``sources``; returns the files that could not be read.

    ``optimize``: see ``Detector``; ``"precision": "auto"`` measures at the batch this run uses."""
    from nasfpn.data.io import ImageReadError, list_images, read_image

    out = Path(out)
    paths = list_images(sources)
    if isinstance(optimize, dict) and optimize.get("precision") == "auto":
        optimize = {"batch_size": max(1, min(batch_size, len(paths))), **optimize}
    det = load_detector(model, weights, device, overrides, config_file, optimize)
    records: list[dict[str, Any]] = []
    failed: list[str] = []
    vis_dir = out / "vis"
    used_names: set[str] = set()
    tty = sys.stderr.isatty()
    lines = None if tty else ProgressLines("predict", len(paths))  # piped: plain lines instead of a bar
    for start in tqdm(range(0, len(paths), batch_size), desc="predict", unit="batch", disable=not tty):
        batch_paths, images = [], []
        chunk = paths[start : start + batch_size]
        for path in chunk:
            try:
                images.append(read_image(path))
                batch_paths.append(path)
            except ImageReadError as e:
                print(f"error: {e}", file=sys.stderr)
                failed.append(str(path))
        if not images:
            if lines is not None:
                lines.update(len(chunk))
            continue
        results = det.predict(images, score_thr=score_thr, batch_size=batch_size)
        for path, image, res in zip(batch_paths, images, results):
            for box, score, label, cat in zip(res["boxes"], res["scores"], res["labels"], res["category_ids"]):
                x1, y1, x2, y2 = (float(v) for v in box)
                records.append(
                    {
                        "file_name": str(path),
                        "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                        "score": round(float(score), 5),
                        "category_id": int(cat),
                        "category_name": det.class_names[int(label)],
                    }
                )
            if vis:
                from nasfpn.data.vis import draw_detections

                keep = res["scores"] >= vis_thr
                picture = draw_detections(
                    image, res["boxes"][keep], res["labels"][keep], res["scores"][keep], det.class_names
                )
                name = path.stem
                k = 1
                while name in used_names:
                    k += 1
                    name = f"{path.stem}_{k}"
                used_names.add(name)
                vis_dir.mkdir(parents=True, exist_ok=True)
                picture.save(vis_dir / f"{name}.jpg", quality=90)
        if lines is not None:
            lines.update(len(chunk))
    write_json_atomic(records, out / "predictions.json")
    n_ok = len(paths) - len(failed)
    print(
        f"{n_ok} image(s), {len(records)} detection(s) -> {out / 'predictions.json'}"
        + (f"; {len(failed)} unreadable: {', '.join(failed)}" if failed else "")
    )
    return failed
