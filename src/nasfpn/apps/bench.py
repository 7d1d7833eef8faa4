"""Speed and memory measurements of ``nasfpn bench``: inference, one training step, the training
input pipeline.

``bench_infer``, ``bench_train`` and ``bench_data`` return a plain dict (JSON-able) and
``format_result`` prints it. The scripts in ``benchmarks/`` reuse these measurements
(``infer_step``, ``calibrate_scores``, ``percentile``, ``environment``, ...); their side-by-side
harness lives in ``benchmarks/harness.py``.

Timing: wall clock around each iteration, after ``warmup`` untimed ones; CUDA is synchronised at
every boundary that is timed (so the inference split adds two syncs per iteration). Latency is
reported as p50 / p90 over ``iters`` iterations, throughput as ``batch / p50``.

Peak memory (``PeakMemory``; ``memory_source`` in the result says which):

- CUDA: ``torch.cuda.max_memory_allocated`` over the measured iterations (tensors only, not the
  caching allocator's reserve);
- CPU: two numbers, sampled every 2 ms by a background thread during separate (untimed)
  iterations, so the sampler does not perturb the timings. ``peak_mb``: peak resident set size of
  the whole process (model, Python, libraries), from ``/proc/self/statm``. ``alloc_peak_mb`` /
  ``alloc_delta_mb``: peak of the bytes in use by ``malloc`` (glibc ``mallinfo2``: arenas +
  mmapped blocks), and its rise above the start: the CPU analogue of CUDA's max allocated,
  unaffected by memory the allocator keeps cached. ``peak_delta_mb`` is the RSS rise (small when
  earlier iterations left the heap grown). Without ``/proc`` (not Linux) ``peak_mb`` falls back to
  ``resource.getrusage(...).ru_maxrss``: the process lifetime peak; without glibc there is no
  ``alloc_*``.

Randomly initialised models put every score near the focal prior (0.01): nothing passes the
0.05 score threshold and post-processing would cost nothing. Unless real weights are given, the
class bias is shifted so that ``pairs_per_image`` (anchor, class) pairs pass it on the benchmark
batch (``calibrate_scores``), as a trained model's few thousand candidates do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasfpn.core.config import Config
from nasfpn.core.machine import cpu_name
from nasfpn.deploy.fast import optimize_for_inference
from nasfpn.models import RetinaNet, build_model

MODES = ("infer", "train", "data")


# --------------------------------------------------------------------------- statistics


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q``-th percentile (0..100) of ``values``."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_stats(seconds: list[float], batch: int) -> dict[str, float]:
    """``p50_ms``, ``p90_ms``, ``mean_ms`` and ``images_per_s`` (batch / p50) of per-iteration times."""
    p50 = percentile(seconds, 50)
    return {
        "p50_ms": p50 * 1e3,
        "p90_ms": percentile(seconds, 90) * 1e3,
        "mean_ms": statistics.fmean(seconds) * 1e3,
        "images_per_s": batch / p50,
    }


# --------------------------------------------------------------------------- memory


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2, returned by value: every field is needed for the layout.
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    """glibc's ``mallinfo2`` (glibc >= 2.33), or None elsewhere."""
    if platform.system() != "Linux":
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _load_mallinfo2()


def _malloc_bytes() -> int:
    """Bytes in use by malloc: allocated arena chunks + mmapped blocks (0 without mallinfo2)."""
    if _MALLINFO2 is None:
        return 0
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


def _rss_bytes() -> int | None:
    """Resident set size of this process from /proc, or None without it."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _max_rss_mb() -> float:
    """The process lifetime peak RSS (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource

    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


class PeakMemory:
    """Peak memory while the ``with`` block runs (see the module docstring for what is measured).

    After the block: ``peak_mb``, ``delta_mb`` (None where unknown), ``source``, and on CPU with
    glibc ``alloc_peak_mb`` / ``alloc_delta_mb``.
    """

    def __init__(self, device: torch.device | str = "cpu", interval_s: float = 0.002) -> None:
        self.device = torch.device(device)
        self.interval_s = interval_s
        self.source = ""
        self.peak_mb: float | None = None
        self.delta_mb: float | None = None
        self.alloc_peak_mb: float | None = None
        self.alloc_delta_mb: float | None = None
        self._cuda_start = 0
        self._start = self._peak = (0, 0)  # CPU: (RSS, malloc in use) bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = torch.cuda.memory_allocated(self.device)
            self.source = "cuda max_memory_allocated"
        elif (rss := _rss_bytes()) is None:
            self.source = "ru_maxrss (process lifetime peak)"
        else:
            self.source = (
                f"peak RSS (/proc/self/statm) and malloc in use (mallinfo2), sampled every {self.interval_s * 1e3:g} ms"
            )
            self._start = self._peak = (rss, _malloc_bytes())
            self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        rss, malloc = self._peak
        self._peak = (max(rss, _rss_bytes() or 0), max(malloc, _malloc_bytes()))

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        mb = 2**20
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_mb, self.delta_mb = peak / mb, (peak - self._cuda_start) / mb
        elif self._thread is None:
            self.peak_mb = _max_rss_mb()
        else:
            self._stop.set()
            self._thread.join()
            self._sample()  # the block's last moment, after the thread's last sample
            (rss0, malloc0), (rss, malloc) = self._start, self._peak
            self.peak_mb, self.delta_mb = rss / mb, (rss - rss0) / mb
            if _MALLINFO2 is not None:
                self.alloc_peak_mb, self.alloc_delta_mb = malloc / mb, (malloc - malloc0) / mb


# --------------------------------------------------------------------------- environment


def environment(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Versions, threads and the device, for the record of a benchmark."""
    device = torch.device(device)
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- inputs


def synthetic_images(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` RGB uint8 ``(height, width, 3)`` images with photo-like statistics: smooth colour
    fields plus fine texture, so JPEG sizes and decode times resemble real photos."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for _ in range(count):
        coarse = torch.rand(1, 3, max(height // 32, 2), max(width // 32, 2), generator=g) * 255
        smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
        texture = torch.randn(3, height, width, generator=g) * 12
        images.append((smooth + texture).clamp(0, 255).round().to(torch.uint8).permute(1, 2, 0).numpy().copy())
    return images


def synthetic_targets(
    batch: int,
    size: int,
    boxes_per_image: int = 8,
    num_classes: int = 80,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Training targets: random boxes of 16 .. size/2 pixels inside ``size x size``, random labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        wh = 16 + torch.rand(boxes_per_image, 2, generator=g) * (size / 2 - 16)
        xy = torch.rand(boxes_per_image, 2, generator=g) * (size - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
        out.append({"boxes": boxes.to(device), "labels": labels.to(device), "pad_shape": (size, size)})
    return out


@torch.no_grad()
def calibrate_scores(model: RetinaNet, batch: torch.Tensor, score_thr: float, pairs_per_image: int) -> float:
    """Shift the classifier bias (``model.head.cls_bias``) so that about ``pairs_per_image`` (anchor, class) pairs
    of each image of ``batch`` score above ``score_thr``; returns the shift."""
    was_training = model.training
    model.eval()
    cls_maps, _ = model(batch)
    n = batch.shape[0]
    logits = torch.cat([m.float().permute(0, 2, 3, 1).reshape(n, -1) for m in cls_maps], dim=1)
    k = min(pairs_per_image, logits.shape[1])
    kth = logits.topk(k, dim=1).values[:, -1].mean().item()
    # The k-th best logit lands just above the threshold's logit.
    shift = math.log(score_thr / (1 - score_thr)) - kth + 1e-4
    model.head.cls_bias.add_(shift)
    model.train(was_training)
    return shift


# --------------------------------------------------------------------------- inference


def infer_step(
    runner: Any, images: list[np.ndarray], cfg: Config, size: int, device: torch.device
) -> Callable[[], dict[str, float]]:
    """One end-to-end inference on ``images`` (uint8 HWC arrays) with ``runner`` (a ``RetinaNet`` or
    ``InferenceModel``), timed in parts: returns ``pre`` / ``net`` / ``post`` seconds and
    ``detections`` (the count over the batch)."""
    from nasfpn.data.transforms import preprocess_batch

    data = cfg.data

    def run() -> dict[str, float]:
        a = time.perf_counter()
        x, metas = preprocess_batch(images, size, data.pad_divisor, data.mean, data.std, device)
        _sync(device)
        b = time.perf_counter()
        with torch.no_grad():
            outputs = runner(x)
        _sync(device)
        c = time.perf_counter()
        dets = runner.postprocess(outputs, metas)
        _sync(device)
        d = time.perf_counter()
        return {"pre": b - a, "net": c - b, "post": d - c, "detections": sum(len(r["scores"]) for r in dets)}

    return run


def bench_infer(
    cfg: Config,
    device: str = "cpu",
    batch: int = 1,
    size: int | None = None,
    precision: str = "fp32",
    channels_last: bool | None = None,
    compile: bool = False,
    fuse_bn: bool = True,
    plain: bool = False,
    warmup: int = 3,
    iters: int = 10,
    weights: str | None = None,
    pairs_per_image: int = 1000,
    memory: bool = True,
    model: RetinaNet | None = None,
) -> dict[str, Any]:
    """End-to-end inference from uint8 images to detections: pre-processing, network, post-processing.

    ``plain`` runs the model as built (eager, fp32, NCHW, BN unfolded); otherwise
    ``optimize_for_inference(fuse_bn, channels_last, precision, compile)``. ``model`` reuses an
    already built (and calibrated) model; ``size`` is the square image side (the config's test
    size by default). Returns latency stats, the split ``pre_ms`` / ``net_ms`` / ``post_ms``
    (p50 each), detections per image and peak memory.
    """
    from nasfpn.data.transforms import preprocess_batch

    dev = torch.device(device)
    size = size or cfg.data.image_size
    data = cfg.data
    images = synthetic_images(batch, size, size)
    calibration: float | str = "weights"
    if model is None:
        if weights is not None:
            from nasfpn.deploy.predictor import load

            model = load(cfg, weights=weights, device=dev).model
        else:
            torch.manual_seed(0)
            model = build_model(cfg.model, pretrained_backbone=False).to(dev)
    model.eval()
    if weights is None:
        x, _ = preprocess_batch(images, size, data.pad_divisor, data.mean, data.std, dev)
        calibration = calibrate_scores(model, x, cfg.model.test.score_thr, pairs_per_image)
    t0 = time.perf_counter()
    runner: Any = model if plain else optimize_for_inference(model, fuse_bn, channels_last, precision, compile)
    prepare_s = time.perf_counter() - t0

    run = infer_step(runner, images, cfg, size, dev)

    t0 = time.perf_counter()
    run()  # first call: compilation, oneDNN primitive creation
    first_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        run()
    pre, net, post, total = [], [], [], []
    for _ in range(iters):
        t = run()
        pre.append(t["pre"])
        net.append(t["net"])
        post.append(t["post"])
        total.append(t["pre"] + t["net"] + t["post"])
        num_dets = t["detections"]
    result: dict[str, Any] = {
        "mode": "infer",
        "model": cfg.name,
        "device": str(dev),
        "batch": batch,
        "size": size,
        "precision": "fp32" if plain else precision,
        "plain": plain,
        "fuse_bn": fuse_bn and not plain,
        "channels_last": (not plain) and (channels_last is None or channels_last),
        "compile": compile and not plain,
        "warmup": warmup,
        "iters": iters,
        **latency_stats(total, batch),
        "pre_ms": percentile(pre, 50) * 1e3,
        "net_ms": percentile(net, 50) * 1e3,
        "post_ms": percentile(post, 50) * 1e3,
        "detections_per_image": num_dets / batch,
        "score_calibration": calibration,
        "prepare_s": prepare_s,
        "first_call_s": first_s,
    }
    result["post_share"] = result["post_ms"] / (result["pre_ms"] + result["net_ms"] + result["post_ms"])
    if memory:
        with PeakMemory(dev) as mem:
            run()
        result.update(
            peak_mb=mem.peak_mb,
            peak_delta_mb=mem.delta_mb,
            alloc_peak_mb=mem.alloc_peak_mb,
            alloc_delta_mb=mem.alloc_delta_mb,
            memory_source=mem.source,
        )
    result["env"] = environment(dev)
    return result


# --------------------------------------------------------------------------- training


def bench_train(
    cfg: Config,
    device: str = "cpu",
    batch: int = 2,
    size: int | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    checkpoint_stacks: bool | None = None,
    warmup: int = 2,
    iters: int = 5,
    memory: bool = True,
) -> dict[str, Any]:
    """The trainer's training step (``engine.step.train_step``) on a synthetic batch.

    The step is the one ``nasfpn train`` runs: forward under autocast, loss, backward, gradient
    norm (clipped to ``cfg.train.grad_clip`` when > 0), finiteness check with BN buffer backup,
    SGD update (the trainer's parameter groups; the fused kernel on CUDA). Random images, 8
    random boxes per image, ``pad_shape`` set as the training collate does. ``precision`` bf16 /
    fp16 is the trainer's ``train.amp`` (fp16 with a GradScaler). ``compile`` compiles the
    network (the loss stays eager). ``checkpoint_stacks`` overrides the config's activation
    checkpointing of the NAS-FPN stacks. ``skipped_steps`` counts steps the finiteness check
    skipped.
    """
    from nasfpn.engine.step import build_step_parts, train_step

    dev = torch.device(device)
    size = size or cfg.data.train_crop
    model_cfg = cfg.model
    if checkpoint_stacks is not None:
        model_cfg = replace(model_cfg, neck=replace(model_cfg.neck, checkpoint_stacks=checkpoint_stacks))
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    t = replace(cfg.train, amp="none" if precision == "fp32" else precision, channels_last=channels_last)
    torch.manual_seed(0)
    model = build_model(model_cfg, pretrained_backbone=False).to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()  # the network's forward; TrainStep calls it, the loss stays eager
    lr = 1e-4
    parts = build_step_parts(model, t, lr, model_cfg.head.deep_supervision)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(dev)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = synthetic_targets(batch, size, num_classes=model.num_classes, device=dev)
    skipped = 0

    def step() -> float:
        nonlocal skipped
        result = train_step(parts, (images, targets), lr)
        skipped += not result.applied
        parts.optimizer.zero_grad(set_to_none=True)  # so the next step starts (and is measured) without gradients
        return result.loss

    def timed() -> float:
        _sync(dev)
        a = time.perf_counter()
        step()
        _sync(dev)
        return time.perf_counter() - a

    first_s = timed()
    for _ in range(max(warmup - 1, 0)):
        timed()
    skipped = 0
    times = [timed() for _ in range(iters)]
    skipped_timed = skipped
    loss = step()
    result: dict[str, Any] = {
        "mode": "train",
        "model": cfg.name,
        "device": str(dev),
        "batch": batch,
        "size": size,
        "precision": precision,
        "channels_last": channels_last,
        "compile": compile,
        "checkpoint_stacks": model_cfg.neck.checkpoint_stacks,
        "fused_sgd": bool(parts.optimizer.defaults.get("fused")),
        "grad_clip": t.grad_clip,
        "warmup": warmup,
        "iters": iters,
        **latency_stats(times, batch),
        "first_call_s": first_s,
        "loss": loss,
        "skipped_steps": skipped_timed,
    }
    if memory:
        with PeakMemory(dev) as mem:
            step()
        result.update(
            peak_mb=mem.peak_mb,
            peak_delta_mb=mem.delta_mb,
            alloc_peak_mb=mem.alloc_peak_mb,
            alloc_delta_mb=mem.alloc_delta_mb,
            memory_source=mem.source,
        )
        if dev.type == "cpu":  # cross-check: the process lifetime peak (equal steps: the step peak)
            result["process_max_rss_mb"] = _max_rss_mb()
    result["env"] = environment(dev)
    return result


# --------------------------------------------------------------------------- input pipeline


def write_jpegs(
    folder: str | Path, count: int = 32, height: int = 480, width: int = 640, quality: int = 90, seed: int = 0
) -> list[Path]:
    """``count`` COCO-sized synthetic JPEGs in ``folder``."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(synthetic_images(count, height, width, seed)):
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(im).save(path, quality=quality)
        paths.append(path)
    return paths


def decode_torchvision(path: str | Path) -> torch.Tensor:
    """uint8 ``(3, H, W)`` RGB via ``torchvision.io.decode_jpeg`` (libjpeg-turbo), EXIF orientation applied."""
    import warnings

    from torchvision.io import ImageReadMode, decode_image, read_file

    with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; this still works
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)


def decode_pil(path: str | Path) -> torch.Tensor:
    """uint8 ``(3, H, W)`` via the library's reader (PIL; EXIF orientation, any mode to RGB)."""
    from nasfpn.data.io import read_image

    return torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()


DECODERS: dict[str, Callable[[str | Path], torch.Tensor]] = {"pil": decode_pil, "torchvision": decode_torchvision}


def bench_data(
    cfg: Config,
    size: int | None = None,
    images: int = 32,
    height: int = 480,
    width: int = 640,
    quality: int = 90,
    decoder: str = "pil",
    passes: int = 3,
    folder: str | Path | None = None,
) -> dict[str, Any]:
    """Training input pipeline in one process (= one DataLoader worker), per image: decode a
    COCO-sized JPEG, the training transform (random resize, crop, flip), then the collate's
    normalise + pad to ``size x size``, each timed.

    Runs with one intra-op thread, as a DataLoader worker does (PyTorch sets 1 thread in workers).
    ``images_per_s`` counts decode + augment (total time over all images of all passes);
    ``images_per_s_normalised`` adds the normalisation, which can also run on the GPU instead
    (``collate_train(normalize=False)`` + ``normalize_batch``).
    """
    from nasfpn.data.transforms import TrainTransform, make_generator, normalize_pad

    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {sorted(DECODERS)}, got {decoder!r}")
    decode = DECODERS[decoder]
    size = size or cfg.data.train_crop
    d = cfg.data
    transform = TrainTransform(size, d.scale_range, d.flip_prob)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tmp = None
    try:
        if folder is None:
            tmp = tempfile.TemporaryDirectory(prefix="nasfpn-bench-")
            folder = tmp.name
        paths = write_jpegs(folder, images, height, width, quality)
        boxes = synthetic_targets(1, min(height, width), num_classes=80)[0]
        parts: dict[str, list[float]] = {"decode": [], "augment": [], "normalise": []}
        for p in range(passes + 1):  # the first pass warms the file cache and allocators
            for i, path in enumerate(paths):
                a = time.perf_counter()
                image = decode(path)
                b = time.perf_counter()
                sample = {"image": image, "boxes": boxes["boxes"], "labels": boxes["labels"], "image_id": i}
                out = transform(sample, make_generator(0, p, i))
                c = time.perf_counter()
                normalize_pad([out["image"]], d.mean, d.std, pad_size=(size, size))
                e = time.perf_counter()
                if p > 0:
                    parts["decode"].append(b - a)
                    parts["augment"].append(c - b)
                    parts["normalise"].append(e - c)
        file_kb = sum(x.stat().st_size for x in paths) / len(paths) / 1024
    finally:
        torch.set_num_threads(threads)
        if tmp is not None:
            tmp.cleanup()
    per_image = [x + y for x, y in zip(parts["decode"], parts["augment"])]
    return {
        "mode": "data",
        "model": cfg.name,
        "size": size,
        "decoder": decoder,
        "images": images,
        "image_hw": (height, width),
        "jpeg_quality": quality,
        "jpeg_kb": file_kb,
        "passes": passes,
        "images_per_s": len(per_image) / sum(per_image),
        "images_per_s_normalised": len(per_image) / (sum(per_image) + sum(parts["normalise"])),
        "p50_ms": percentile(per_image, 50) * 1e3,
        "p90_ms": percentile(per_image, 90) * 1e3,
        **{f"{k}_ms": statistics.fmean(v) * 1e3 for k, v in parts.items()},
        "env": environment("cpu") | {"threads": 1},
    }


# --------------------------------------------------------------------------- reports


def format_result(r: dict[str, Any]) -> str:
    """A few human-readable lines for one result of ``bench_*``."""
    env = r.get("env", {})
    head = (
        f"{r['model']}  mode={r['mode']}  device={r.get('device', 'cpu')}  threads={env.get('threads')}  "
        f"torch {env.get('torch')}  {env.get('cpu') if r.get('device', 'cpu') == 'cpu' else env.get('gpu')}"
    )
    lines = [head]
    if r["mode"] == "data":
        lines.append(
            f"decoder={r['decoder']}  {r['image_hw'][1]}x{r['image_hw'][0]} JPEG q{r['jpeg_quality']} "
            f"({r['jpeg_kb']:.0f} KB) -> train transform at {r['size']}"
        )
        lines.append(
            f"{r['images_per_s']:.1f} images/s per worker, decode + augment (mean {r['decode_ms']:.2f} + "
            f"{r['augment_ms']:.2f} ms; p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms)"
        )
        lines.append(
            f"{r['images_per_s_normalised']:.1f} images/s with the collate's normalise + pad "
            f"({r['normalise_ms']:.2f} ms)"
        )
        return "\n".join(lines)
    opts = [
        f"batch={r['batch']}",
        f"size={r['size']}",
        f"precision={r['precision']}",
        f"channels_last={r['channels_last']}",
        f"compile={r['compile']}",
    ]
    if r["mode"] == "infer":
        opts += [f"fuse_bn={r['fuse_bn']}", "plain" if r["plain"] else "fast paths"]
    else:
        opts += [
            f"checkpoint_stacks={r['checkpoint_stacks']}",
            f"fused_sgd={r['fused_sgd']}",
            f"grad_clip={r.get('grad_clip', 0.0):g}",
        ]
    lines.append("  ".join(opts))
    lines.append(
        f"latency p50 {r['p50_ms']:.1f} ms  p90 {r['p90_ms']:.1f} ms  throughput {r['images_per_s']:.2f} images/s"
        f"  (first call {r['first_call_s']:.1f} s)"
    )
    if r.get("skipped_steps"):
        lines.append(
            f"warning: {r['skipped_steps']} of {r['iters']} timed steps were skipped (non-finite loss or gradient)"
        )
    if r["mode"] == "infer":
        lines.append(
            f"split p50: pre {r['pre_ms']:.1f} ms  net {r['net_ms']:.1f} ms  post {r['post_ms']:.1f} ms "
            f"({100 * r['post_share']:.1f}% post)  detections/image {r['detections_per_image']:.0f}"
        )
    if r.get("peak_mb") is not None:
        what = "CUDA max allocated" if r.get("device", "cpu").startswith("cuda") else "peak RSS"
        delta = f" (+{r['peak_delta_mb']:.0f} MB during the step)" if r.get("peak_delta_mb") is not None else ""
        lines.append(f"peak memory: {what} {r['peak_mb']:.0f} MB{delta}")
        if r.get("alloc_peak_mb") is not None:
            lines.append(
                f"peak malloc in use {r['alloc_peak_mb']:.0f} MB (+{r['alloc_delta_mb']:.0f} MB during the step)"
            )
    return "\n".join(lines)
