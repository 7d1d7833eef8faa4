"""Command line: ``nasfpn <command> ...``. Parsing only; the library does the work.

Options that several commands share are declared once, in the argument groups below; each
command composes the groups it needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the CLI imports torch-heavy modules only in the command that needs them
    from nasfpn.core.config import Config
    from nasfpn.search.proxy import ProxySettings

# core.precision.PRECISIONS, spelled out so that building the parser does not import torch.
_PRECISIONS = ("fp32", "bf16", "fp16")
_MODEL_HELP = "preset name (see `nasfpn config --list`) or a .yaml/.json config file"
_DATA_FORMATS = ("coco", "yolo", "voc")  # data.formats.FORMATS


# --------------------------------------------------------------------------- shared argument groups
def _add_set(p: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def _add_config_args(g: argparse._ArgumentGroup, set_example: str = "model.test.score_thr=0.3") -> None:
    """``--config`` and ``--set``: what refines the named (or carried) config."""
    g.add_argument("--config", dest="config_file", help="YAML file refining the preset")
    _add_set(g, f"override any config value, e.g. --set {set_example} (repeatable)")


def _add_model_group(
    p: argparse.ArgumentParser,
    model_help: str,
    *,
    optional: bool = False,
    weights_help: str | None = None,
    weights_required: bool = False,
    set_example: str = "model.test.score_thr=0.3",
) -> None:
    """The ``model`` positional (a preset, a config file, or '-' / left out where the weights carry it),
    then ``--weights`` (when ``weights_help`` is given), ``--config`` and ``--set``."""
    p.add_argument("model", nargs="?" if optional else None, help=model_help)
    g = p.add_argument_group("model and config")
    if weights_help is not None:
        g.add_argument("--weights", required=weights_required, help=weights_help)
    _add_config_args(g, set_example)


def _config(args: argparse.Namespace):
    """The config of a command with a model group, by the rule every entry point follows."""
    from nasfpn.core.presets import resolve_config

    return resolve_config(args.model, args.overrides, args.config_file)


def _add_device(p: argparse.ArgumentParser, default: str | None = "cpu") -> None:
    p.add_argument(
        "--device",
        default=default,
        help=f"cpu, cuda, cuda:N, N (GPU N) or mps (default: {'cuda if available' if default is None else default})",
    )


def _check_device(args: argparse.Namespace) -> None:
    """``--device`` of any command, read by the one device parser before the command runs: a device
    this machine lacks is one error line, not a driver traceback in the middle of the work."""
    if getattr(args, "device", None) is not None:
        from nasfpn.core.device import parse_device

        args.device = str(parse_device(args.device, "--device"))


PRECISION_ENV = "NASFPN_PRECISION"


def _add_fast_group(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference fast path (the default)")
    g.add_argument(
        "--fast",
        action="store_true",
        help="the inference fast path: BatchNorm folded into the convs, channels-last (the default; accepted "
        "for older command lines)",
    )
    g.add_argument(
        "--precision",
        default=None,
        choices=(*_PRECISIONS, "auto"),
        help="network precision of the fast path; auto (the default, or $NASFPN_PRECISION) times fp32 and bf16 "
        "(CUDA: fp16 too) here once, caches the choice and keeps the faster, never slower than fp32; "
        "fp16 needs CUDA",
    )
    g.add_argument(
        "--plain",
        action="store_true",
        help="run the unmodified model in fp32 (the reference path) instead of the fast path",
    )


def _default_precision() -> str:
    """``$NASFPN_PRECISION`` if set, else auto."""
    import os

    value = os.environ.get(PRECISION_ENV, "").strip().lower()
    if not value:
        return "auto"
    if value not in (*_PRECISIONS, "auto"):
        raise ValueError(
            f"{PRECISION_ENV}={value!r}: must be one of {', '.join((*_PRECISIONS, 'auto'))}; set it to one or unset it"
        )
    return value


def _optimize_arg(args: argparse.Namespace) -> bool | dict:
    """``optimize`` of ``load`` from ``--plain`` / ``--fast`` / ``--precision`` (default ``$NASFPN_PRECISION``
    or auto)."""
    if args.plain:
        if args.fast or args.precision not in (None, "fp32"):
            raise ValueError("--plain runs the unmodified fp32 model: drop --fast / --precision, or drop --plain")
        return False
    return {"precision": args.precision or _default_precision()}


def _add_data_group(p: argparse.ArgumentParser, train: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help="dataset: a COCO root (annotations/instances_<split>2017.json + <split>2017/, or "
        "annotations/instances_<split>.json + <split>/), a COCO .json (with --train-images / --val-images), "
        "a YOLO data.yaml, or a Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/); docs/data.md",
    )
    g.add_argument("--data-format", choices=_DATA_FORMATS, help="format of --data (default: detected)")
    if train:
        g.add_argument("--train-split", default="train", help="--data's training split (default train)")
        g.add_argument("--val-split", help="--data's validation split (default: val, where there is one)")
    else:
        g.add_argument(
            "--split", "--val-split", dest="val_split", default="val", help="--data's split to evaluate (default val)"
        )
    if train:
        g.add_argument("--train-ann", help="training annotations (COCO JSON); instead of --data")
        g.add_argument("--train-images", help="folder of the training images")
    g.add_argument("--val-ann", help="validation annotations (COCO JSON)")
    g.add_argument("--val-images", help="folder of the validation images")


def _data_paths(args: argparse.Namespace):
    """Training (and validation) data of the data group, ``train=True``."""
    from nasfpn.engine.trainer import DataPaths

    if args.data:
        paths = DataPaths.from_data(
            args.data,
            args.data_format,
            args.train_split,
            args.val_split,
            args.train_images,
            None if args.val_ann else args.val_images,
        )
        if args.val_ann:
            paths = DataPaths(paths.train_ann, paths.train_images, args.val_ann, args.val_images)
        return paths
    if not (args.train_ann and args.train_images):
        raise ValueError("give --data DIR, or --train-ann and --train-images (plus --val-ann/--val-images to evaluate)")
    if bool(args.val_ann) != bool(args.val_images):
        raise ValueError("--val-ann and --val-images go together")
    return DataPaths(args.train_ann, args.train_images, args.val_ann, args.val_images)


def _val_paths(args: argparse.Namespace):
    """Validation annotations (a COCO file or a YOLO / VOC split) and image folder of the data group, ``train=False``."""
    if args.data:
        from nasfpn.engine.data_paths import split_data

        return split_data(args.data, args.val_split, args.data_format, args.val_images)
    if args.val_ann and args.val_images:
        return args.val_ann, args.val_images
    raise ValueError("give --data DIR or --val-ann and --val-images")


def _add_loader_group(
    p: argparse.ArgumentParser, batch_size: int | None, workers: int | None = None, with_workers: bool = True
) -> None:
    """``--batch-size`` (and ``--workers``); a None default leaves the config's value."""
    g = p.add_argument_group("batching")
    g.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help="images per process (data.batch_size)"
        if batch_size is None
        else f"images per batch (default {batch_size})",
    )
    if with_workers:
        g.add_argument(
            "--workers",
            type=int,
            default=workers,
            help="data loading processes (data.workers)"
            if workers is None
            else f"data loading processes (default {workers})",
        )


def _add_no_progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")


# --------------------------------------------------------------------------- config
def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the fully resolved config of a preset")
    _add_model_group(p, "preset name or config file", optional=True)
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from nasfpn.core.config import config_to_dict, config_to_yaml
    from nasfpn.core.presets import PRESETS

    if args.list or not args.model:
        for name in PRESETS:
            print(name)
        return 0
    cfg = _config(args)
    print(
        json.dumps(config_to_dict(cfg), indent=2) if args.json else config_to_yaml(cfg), end="\n" if args.json else ""
    )
    return 0


# --------------------------------------------------------------------------- info
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and anchors of a model; what a weights file carries")
    _add_model_group(
        p,
        _MODEL_HELP + " ('-' or left out with --weights: the config the file carries)",
        optional=True,
        weights_help="also load and describe this weights file: config, classes, training epoch and metrics if stored",
    )
    p.add_argument("--size", type=int, help="square input size for FLOPs (default: the config's image_size)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)


def _describe_weights(carried: dict) -> None:
    """The ``info`` lines of what a weights file carries (``core.weights.weights_info``)."""
    size = f"{carried['tensors']:,} tensors, {carried['values']:,} values"
    print(f"weights          {carried['file']}: {carried['kind']}, {size}")
    if carried.get("config"):
        print(f"made for         config {carried['config']}")
    if carried.get("num_classes") is not None:
        names, ids = carried.get("class_names") or [], carried.get("category_ids") or []
        parts = [f"{n} (id {i})" for n, i in zip(names, ids)] if len(ids) == len(names) else list(names)
        shown = ", ".join(parts[:12]) + (", ..." if len(parts) > 12 else "")
        print(f"classes          {carried['num_classes']}" + (f": {shown}" if names else " (not named in the file)"))
    trained = [f"epoch {carried['epoch']}"] if "epoch" in carried else []
    trained += [f"step {carried['step']}"] if "step" in carried else []
    best = carried.get("best") or carried.get("metrics") or {}
    scores = ", ".join(f"{k} {best[k]:.4f}" for k in ("AP", "AP50", "AP75") if isinstance(best.get(k), float))
    if scores:
        trained.append(f"best {scores}" + (f" (epoch {best['epoch']})" if "epoch" in best else ""))
    recorded = "; ".join(trained) if trained else "not recorded in this file (a training checkpoint .pt records it)"
    print(f"training         {recorded}")


def _cmd_info(args: argparse.Namespace) -> int:
    from nasfpn.models.summary import model_summary

    carried = None
    if args.weights:
        from nasfpn.core.weights import weights_info
        from nasfpn.deploy.predictor import load

        carried = weights_info(args.weights)
        det = load(args.model, weights=args.weights, overrides=args.overrides, config_file=args.config_file)
        cfg, model = det.config, det.model
    else:
        from nasfpn.models import build_model

        cfg = _config(args)
        model = build_model(cfg.model, pretrained_backbone=False)
    info = model_summary(model, args.size or cfg.data.image_size)
    info["model"] = cfg.name
    if carried is not None:
        info["weights"] = carried
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model            {cfg.name}")
    print(
        f"parameters       {info['params_total']:,} (backbone {info['params_backbone']:,}, "
        f"neck {info['params_neck']:,}, head {info['params_head']:,})"
    )
    print(f"input            1x3x{info['size']}x{info['size']}")
    print(
        f"FLOPs            {info['gflops']:.1f} GFLOPs = {info['gmacs']:.1f} GMACs "
        "(torch.utils.flop_counter, backbone + neck + head; 1 MAC = 2 FLOPs)"
    )
    print(f"anchors          {info['anchors']:,} ({', '.join(map(str, info['anchors_per_level']))} per level)")
    if carried is not None:
        _describe_weights(carried)
    return 0


# --------------------------------------------------------------------------- convert
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an MMDetection checkpoint to our safetensors format")
    p.add_argument("src", help="MMDetection .pth (or any weights we can read), path or URL")
    p.add_argument("dst", help="output .safetensors")
    g = p.add_argument_group("model and config")
    g.add_argument("--model", dest="model", required=True, help="preset / config the checkpoint belongs to")
    _add_config_args(g)
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from nasfpn.deploy.predictor import export_weights, load

    det = load(args.model, weights=args.src, overrides=args.overrides, config_file=args.config_file)
    export_weights(det, det.config, args.dst)
    n = sum(t.numel() for t in det.model.state_dict().values())
    print(f"wrote {args.dst}: {len(det.model.state_dict())} tensors, {n:,} values, config {det.config.name}")
    return 0


# --------------------------------------------------------------------------- predict
def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="detect objects in images: writes predictions.json and drawn pictures")
    _add_model_group(
        p,
        "preset name or config file (may be omitted as '-' with our .safetensors)",
        weights_help="weights file or URL (.safetensors, MMDetection .pth, or exported .onnx)",
        weights_required=True,
    )
    p.add_argument("sources", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder")
    _add_device(p)
    p.add_argument("--score-thr", type=float, default=None, help="score threshold (default: the config's, 0.05)")
    p.add_argument("--vis-thr", type=float, default=0.3, help="only draw detections above this score")
    _add_loader_group(p, batch_size=4, with_workers=False)
    p.add_argument("--no-vis", action="store_true", help="skip writing pictures")
    _add_fast_group(p)
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from nasfpn.apps.predict import run_predict

    failed = run_predict(
        args.model,
        args.sources,
        args.weights,
        args.out,
        device=args.device,
        score_thr=args.score_thr,
        batch_size=args.batch_size,
        vis=not args.no_vis,
        vis_thr=args.vis_thr,
        overrides=args.overrides,
        config_file=args.config_file,
        optimize=_optimize_arg(args),
    )
    return 1 if failed else 0


# --------------------------------------------------------------------------- search
def _add_search(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search a NAS-FPN pyramid: RNN+PPO controller (the paper), evolution or random",
        description="Architecture search over the paper's merging-cell space, rewarded by a short "
        "proxy training run; trials run in parallel worker processes or on Ray; --resume continues "
        "a stopped search. Writes trials.jsonl, best.json/.txt, best_config.yaml, summary.json and plots.",
    )
    p.add_argument("--out", required=True, help="output folder (trial log, controller snapshots, trials, results)")
    p.add_argument("--resume", action="store_true", help="continue the search in --out with its saved settings")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="DIR",
        help="instead of searching, compare finished searches: plots and a table in --out",
    )
    d = p.add_argument_group("data (the reward is AP on a held-out part of the training set)")
    d.add_argument(
        "--data",
        help="dataset folder (annotations/instances_train.json + train/, or COCO 2017), "
        "or 'synthetic' to generate the embedded dataset",
    )
    d.add_argument("--train-ann", help="COCO json of the training set (instead of --data)")
    d.add_argument("--train-images", help="image folder of --train-ann")
    d.add_argument(
        "--heldout-ann", help="COCO json to reward with (default: carve --held-out images out of the training set)"
    )
    d.add_argument("--heldout-images", help="image folder of --heldout-ann (default: the training images)")
    d.add_argument(
        "--held-out",
        "--holdout",
        default="auto",
        help="images held out: a count, a fraction, or auto (the paper's 7392 for COCO-sized sets, else 0.2); "
        "drawn by image id with --seed",
    )
    d.add_argument("--synthetic-images", type=int, default=400, help="--data synthetic: images generated")
    d.add_argument(
        "--synthetic-min-size",
        type=float,
        help="--data synthetic: smallest shape side as a fraction of the image side (default: the generator's 0.05)",
    )
    d.add_argument(
        "--data-format",
        choices=["auto", "coco", "yolo", "voc"],
        default="auto",
        help="format of --data (YOLO data.yaml / VOC folder: read into COCO json under --out)",
    )
    d.add_argument(
        "--val-ann",
        help="the user's validation set (COCO json), used once after the search: the --top-k best pyramids "
        "are trained again at the top budget and evaluated on it",
    )
    d.add_argument("--val-images", help="image folder of --val-ann")
    d.add_argument("--val-split", help="with --data: the dataset's split to use as --val-ann (e.g. val)")
    d.add_argument("--top-k", type=int, default=3, help="pyramids evaluated on the validation set")
    d.add_argument(
        "--final-baselines",
        action="store_true",
        help="also evaluate the published NAS-FPN and FPN genotypes on the validation set",
    )
    s = p.add_argument_group("search")
    s.add_argument("--controller", choices=["ppo", "evolution", "random"], default="ppo")
    s.add_argument("--trials", type=int, default=None, help="controller trials (default 40)")
    s.add_argument(
        "--workers",
        type=int,
        default=None,
        help="trials in flight (default: one per GPU, else 1); 0 runs trials in this process",
    )
    s.add_argument(
        "--ray-address", help="run trials as Ray tasks: 'local' (a private local Ray), 'auto', or an address"
    )
    s.add_argument("--threads", type=int, help="torch threads per CPU trial (default: cores / workers)")
    s.add_argument("--cells", type=int, default=7, help="merging cells per pyramid (the last 5 output P3..P7)")
    s.add_argument(
        "--gp",
        choices=["mmdet", "tf", "both"],
        default="mmdet",
        help="global-pooling op of the space: MMDetection's gp, the authors' TensorFlow gp_tf, or both",
    )
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--no-baselines", action="store_true", help="skip evaluating the NAS-FPN and FPN genotypes on the proxy"
    )
    s.add_argument(
        "--no-reuse", action="store_true", help="train a repeated architecture again instead of reusing its reward"
    )
    s.add_argument("--population", type=int, default=10, help="evolution: population size")
    s.add_argument("--tournament", type=int, default=3, help="evolution: tournament sample size")
    s.add_argument("--ppo-batch", type=int, default=8, help="ppo: rewards per policy update")
    s.add_argument("--ppo-epochs", type=int, default=4, help="ppo: optimisation epochs per update")
    s.add_argument("--ppo-lr", type=float, default=3e-3)
    s.add_argument("--ppo-entropy", type=float, default=1e-3, help="ppo: entropy bonus weight")
    s.add_argument(
        "--scheduler",
        choices=["none", "asha"],
        default="none",
        help="asha: asynchronous successive halving, rungs of --min-steps * --eta**k steps up to --max-steps; "
        "the top 1/eta of a rung train on from their checkpoint",
    )
    s.add_argument("--min-steps", type=int, default=0, help="asha: steps of the first rung")
    s.add_argument("--max-steps", type=int, default=0, help="asha: steps of the top rung")
    s.add_argument("--eta", type=int, default=3, help="asha: reduction factor between rungs")
    c = p.add_argument_group("cost (FLOPs / latency of --cost-model, measured before training)")
    c.add_argument("--max-flops", type=float, default=0.0, help="reject pyramids over this many GFLOPs")
    c.add_argument("--max-latency-ms", type=float, default=0.0, help="reject pyramids slower than this at batch 1")
    c.add_argument("--target-flops", type=float, default=0.0, help="reward AP * (GFLOPs / target) ** w")
    c.add_argument("--target-latency-ms", type=float, default=0.0, help="reward AP * (ms / target) ** w")
    c.add_argument("--cost-weight", type=float, default=-0.07, help="w (MnasNet's soft constraint: -0.07)")
    c.add_argument("--cost-weight-over", type=float, help="w above the target (default --cost-weight)")
    c.add_argument(
        "--cost-model",
        default="full",
        help="the model measured: full (the full-size preset with the pyramid), proxy, or a preset name",
    )
    c.add_argument(
        "--full-preset",
        default="retinanet_r50_nasfpn_crop640_50e",
        help="the model the found pyramid goes into (best_config.yaml, --cost-model full), e.g. "
        "nasfpn_lite_mobilenetv2_320 for the Lite form",
    )
    c.add_argument("--cost-size", type=int, default=0, help="input side for FLOPs / latency (default: the model's)")
    c.add_argument("--latency-runs", type=int, default=10, help="timed forward passes; latency = their median")
    c.add_argument("--measure-latency", action="store_true", help="measure and record latency without a limit")
    x = p.add_argument_group("proxy task")
    add_proxy_arguments(x)
    x.add_argument(
        "--proxy-seeds",
        type=int,
        default=1,
        help="training runs per trial (seeds --seed, --seed+1, ...); reward = their mean AP",
    )
    x.add_argument(
        "--keep-weights",
        action="store_true",
        help="keep every finished trial's checkpoints (by default deleted once its reward is logged)",
    )
    x.add_argument(
        "--fake-evaluator",
        action="store_true",
        help="reward by similarity to the published NAS-FPN instead of training (instant; dry runs, tests)",
    )
    p.set_defaults(func=_cmd_search)


def add_proxy_arguments(group: argparse._ActionsContainer) -> None:
    """The ``--proxy-*`` options of ``ProxySettings`` (``nasfpn search``, benchmarks/proxy_ranking.py)."""
    group.add_argument("--proxy-depth", type=int, default=10, help="ResNet depth, trained from scratch")
    group.add_argument("--proxy-size", type=int, default=128, help="image size")
    group.add_argument("--proxy-epochs", type=int, default=4)
    group.add_argument("--proxy-stacks", type=int, default=1, help="stacked pyramid networks")
    group.add_argument("--proxy-width", type=int, default=32, help="pyramid and head channels")
    group.add_argument("--proxy-head-convs", type=int, default=2, help="head tower convs")
    group.add_argument("--proxy-batch", type=int, default=8)
    group.add_argument("--proxy-lr", type=float, default=0.04)
    group.add_argument("--proxy-warmup", type=int, default=50, help="warm-up iterations")
    group.add_argument("--proxy-optimizer", choices=["sgd", "adamw"], default="sgd")
    group.add_argument("--proxy-weight-decay", type=float, default=1e-4, help="(AdamW: ~0.05)")
    group.add_argument(
        "--proxy-match-iou", type=float, default=0.5, help="anchor matching IoU (0.4: more positives for small objects)"
    )
    group.add_argument(
        "--proxy-separable",
        action="store_true",
        help="train the proxies in the Lite form (depthwise-separable cell and head convs)",
    )
    group.add_argument(
        "--proxy-ema",
        type=float,
        default=0.0,
        metavar="DECAY",
        help="reward the EMA of the weights (e.g. 0.98; 0: off): steadier rewards at ASHA rungs "
        "stopped before the schedule's lr decay",
    )
    group.add_argument("--proxy-ema-tau", type=float, default=20.0, help="EMA warm-up in steps (with --proxy-ema)")
    group.add_argument(
        "--proxy-precision",
        choices=_PRECISIONS,
        default="fp32",
        help="train trials with autocast + channels-last: bf16 on CPUs with AVX512-BF16/AMX, bf16/fp16 on CUDA",
    )


def proxy_settings(args: argparse.Namespace, **more: Any) -> ProxySettings:
    """``ProxySettings`` from ``add_proxy_arguments``' options, plus ``more`` fields (seed, seeds, max_steps)."""
    from nasfpn.search.proxy import ProxySettings

    return ProxySettings(
        depth=args.proxy_depth,
        image_size=args.proxy_size,
        epochs=args.proxy_epochs,
        stacks=args.proxy_stacks,
        width=args.proxy_width,
        head_convs=args.proxy_head_convs,
        batch_size=args.proxy_batch,
        lr=args.proxy_lr,
        warmup_iters=args.proxy_warmup,
        optimizer=args.proxy_optimizer,
        weight_decay=args.proxy_weight_decay,
        match_iou=args.proxy_match_iou,
        separable=args.proxy_separable,
        precision=args.proxy_precision,
        ema=args.proxy_ema,
        ema_tau=args.proxy_ema_tau,
        **more,
    )


def _cost_options(args: argparse.Namespace) -> dict:
    """``SearchSpec.cost`` from the cost options; empty when none asks for a cost."""
    wanted = (args.max_flops, args.max_latency_ms, args.target_flops, args.target_latency_ms, args.measure_latency)
    if not any(wanted):
        return {}
    return {
        "model": args.cost_model,
        "image_size": args.cost_size,
        "max_gflops": args.max_flops,
        "max_latency_ms": args.max_latency_ms,
        "target_gflops": args.target_flops,
        "target_latency_ms": args.target_latency_ms,
        "weight": args.cost_weight,
        "weight_over": args.cost_weight_over,
        "measure_latency": args.measure_latency,
        "latency_runs": args.latency_runs,
    }


def _cmd_search(args: argparse.Namespace) -> int:
    from nasfpn.search.runner import search
    from nasfpn.search.spec import SearchSpec, evaluator_spec

    out = Path(args.out)
    if args.compare:
        from nasfpn.search.outputs import compare_searches

        compare_searches(args.compare, out)
        print((out / "compare.md").read_text(), end="")
        return 0
    if args.resume and (out / "search.json").is_file():
        spec = SearchSpec.from_dict(json.loads((out / "search.json").read_text()))
        if args.trials is not None:
            spec = SearchSpec.from_dict({**spec.to_dict(), "trials": args.trials})
    else:
        from nasfpn.search.proxy import FakeEvaluator, ProxyTask, prepare_proxy_task

        options = {
            "evolution": {"population_size": args.population, "sample_size": args.tournament},
            "ppo": {
                "batch_size": args.ppo_batch,
                "epochs": args.ppo_epochs,
                "lr": args.ppo_lr,
                "entropy_weight": args.ppo_entropy,
            },
        }.get(args.controller, {})
        evaluator: FakeEvaluator | ProxyTask
        data, train_ann, train_images = args.data, args.train_ann, args.train_images
        val_ann, val_images = args.val_ann, args.val_images
        if data not in (None, "synthetic"):
            from nasfpn.search.data import dataset_split

            if args.data_format not in ("auto", "coco") or args.val_split:
                train_ann, train_images = dataset_split(data, "train", out, args.data_format)
                data = None
            if args.val_split:
                val_ann, val_images = dataset_split(args.data, args.val_split, out, args.data_format)
        if val_ann and not val_images:
            raise SystemExit("--val-ann needs --val-images")
        asha = args.scheduler == "asha"
        if asha and not 0 < args.min_steps <= args.max_steps:
            raise SystemExit("--scheduler asha needs 0 < --min-steps <= --max-steps")
        if args.fake_evaluator:
            evaluator = FakeEvaluator()
        else:
            settings = proxy_settings(
                args, seed=args.seed, seeds=args.proxy_seeds, max_steps=args.max_steps if asha else 0
            )
            evaluator = prepare_proxy_task(
                out,
                settings,
                data,
                train_ann,
                train_images,
                args.heldout_ann,
                args.heldout_images,
                args.held_out,
                args.seed,
                args.synthetic_images,
                synthetic_min_size=args.synthetic_min_size,
                keep_weights=args.keep_weights,
            )
        spec = SearchSpec(
            controller=args.controller,
            trials=args.trials or 40,
            seed=args.seed,
            num_cells=args.cells,
            gp=args.gp,
            controller_options=options,
            evaluator=evaluator_spec(evaluator),
            baselines=not args.no_baselines,
            reuse=not args.no_reuse,
            scheduler=args.scheduler,
            min_steps=args.min_steps if asha else 0,
            max_steps=args.max_steps if asha else 0,
            eta=args.eta,
            cost=_cost_options(args),
            full_preset=args.full_preset,
            final={
                "val_ann": str(Path(val_ann).resolve()),
                "val_images": str(Path(val_images).resolve()),
                "top_k": args.top_k,
                "baselines": args.final_baselines,
            }
            if val_ann
            else {},
        )
    backend = "ray" if args.ray_address else ("inline" if args.workers == 0 else "process")
    result = search(
        spec,
        out,
        workers=args.workers or 1 if backend != "process" else args.workers,
        backend=backend,
        ray_address=args.ray_address,
        resume=args.resume,
        threads=args.threads,
    )
    summary = json.loads((out / "summary.json").read_text())
    print(
        f"{summary['trials_finished']} trials ({summary['ok']} trained, {summary['cached']} repeats, "
        f"{summary['failed']} failed, {summary['unique_architectures']} unique) in {result.wall_s:.0f}s"
    )
    if result.best is not None:
        print(f"best: trial {result.best['trial']} reward {result.best['reward']:.4f}  {result.best['genotype']}")
    for name, reward in sorted(summary["baselines"].items()):
        print(f"baseline {name}: " + (f"{reward:.4f}" if reward is not None else "failed / rejected"))
    for name, r in summary.get("final", {}).get("results", {}).items():
        shown = f"{r['reward']:.4f}" if r["reward"] is not None else "failed"
        print(f"validation set: {name} {shown} (held-out reward in the search: {r['search_reward']})")
    print(f"wrote {out / 'best.json'}, {out / 'best_config.yaml'}, plots in {out}")
    return 0


# --------------------------------------------------------------------------- export
def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export to ONNX (NMS in the graph) or torch.export, checked against PyTorch")
    _add_model_group(
        p,
        "preset name or config file ('-' to take the config from our .safetensors)",
        weights_help="weights: our .safetensors, an MMDetection .pth, a checkpoint or a URL",
        weights_required=True,
    )
    p.add_argument("--out", required=True, help="output file (.onnx, or .pt2 for torch-export)")
    p.add_argument(
        "--format",
        choices=["onnx", "torch-export"],
        help="default: from the --out suffix (.onnx, or .pt2 for torch-export)",
    )
    p.add_argument(
        "--contract",
        default="end2end",
        choices=["end2end", "raw"],
        help="onnx: end2end = detections out, NMS inside (default); raw = head outputs + anchors",
    )
    p.add_argument("--size", type=int, help="image size (long side); default: the config's image_size")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, default=1, help="fixed batch size of the exported input (default 1)")
    batch.add_argument("--dynamic-batch", action="store_true", help="any batch size")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--dynamic-size",
        action="store_true",
        help="any input height and width (multiples of pad_divisor), images padded as in PyTorch, "
        "so detections agree at every aspect ratio (the default, unless image_size <= pad_divisor, where "
        "PyTorch pads every image to one square and a fixed size is exact)",
    )
    size.add_argument(
        "--fixed-size",
        action="store_true",
        help="a fixed square input (image_size x image_size): non-square images get more padding "
        "than in PyTorch and other detections",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (18 or newer; default 18)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "fp16"],
        help="fp16 exports a half-precision network (looser check tolerances)",
    )
    p.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="IMAGE",
        help="image(s) for the check against PyTorch (default: generated pictures)",
    )
    p.add_argument("--no-check", action="store_true", help="skip running the exported file against PyTorch")
    p.set_defaults(func=_cmd_export)


EXPORT_SUFFIXES = {".onnx": "onnx", ".pt2": "torch-export"}


def export_format(out: str, fmt: str | None) -> str:
    """The export format: ``fmt``, or the one of ``out``'s suffix; a contradiction is an error."""
    suffix = Path(out).suffix.lower()
    implied = EXPORT_SUFFIXES.get(suffix)
    if fmt is None:
        if implied is None:
            raise ValueError(
                f"--out {out}: cannot tell the format from {suffix or 'no suffix'}; name the file "
                ".onnx or .pt2, or give --format"
            )
        return implied
    if implied is not None and implied != fmt:
        raise ValueError(f"--out {out} is a {suffix} file but --format is {fmt}; use a matching suffix or --format")
    return fmt


def _export_size_note(config: Config, dynamic_size: bool | None) -> None:
    """Say on stderr when the exported input size makes detections differ from PyTorch's, or why
    the default is a fixed size."""
    from nasfpn.deploy.contract import default_dynamic_size, export_input_hw, min_input_side

    side, d = export_input_hw(config)[0], config.data.pad_divisor
    exact_dynamic = default_dynamic_size(config)
    if dynamic_size is None and not exact_dynamic:
        print(
            f"note: fixed {side}x{side} input: at image_size {config.data.image_size} PyTorch pads every image to "
            f"this square (a dynamic-size file would pad to at least {min_input_side(config)}), so the file agrees "
            "with PyTorch at every aspect ratio.",
            file=sys.stderr,
        )
    elif dynamic_size is False and exact_dynamic:
        print(
            f"note: --fixed-size: every image is padded to {side}x{side}, not to a multiple of {d} as in PyTorch, so "
            "the detections of non-square images differ from PyTorch's (the pyramid sees the extra padding); square "
            "images agree. Leave the flag out for a file that agrees at every aspect ratio.",
            file=sys.stderr,
        )
    elif dynamic_size is True and not exact_dynamic:
        print(
            f"note: --dynamic-size: every image is padded to at least {min_input_side(config)} a side, more than the "
            f"{side}x{side} PyTorch pads to at image_size {config.data.image_size}, so the detections differ from "
            "PyTorch's. Leave the flag out for a file that agrees.",
            file=sys.stderr,
        )


def _cmd_export(args: argparse.Namespace) -> int:
    import time

    from nasfpn.deploy.export import ExportError, export
    from nasfpn.deploy.predictor import load

    args.format = export_format(args.out, args.format)
    if args.format == "torch-export" and args.contract != "end2end":
        print(
            "note: --contract applies to ONNX only; torch-export holds the network (tensors in, head maps out)",
            file=sys.stderr,
        )
    overrides = list(args.overrides) + ([f"data.image_size={args.size}"] if args.size else [])
    det = load(args.model, weights=args.weights, overrides=overrides, config_file=args.config_file)
    images = None
    if args.sample:
        from nasfpn.data.io import list_images, read_image

        images = [read_image(p) for p in list_images(args.sample)]
    dynamic_size = True if args.dynamic_size else False if args.fixed_size else None
    _export_size_note(det.config, dynamic_size)
    t0 = time.perf_counter()
    try:
        meta, report = export(
            det,
            args.out,
            args.format,
            contract=args.contract,
            batch=args.batch,
            dynamic_batch=args.dynamic_batch,
            dynamic_size=dynamic_size,
            opset=args.opset,
            precision=args.precision,
            verify=not args.no_check,
            images=images,
        )
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    size_mb = Path(args.out).stat().st_size / 2**20
    h, w = meta["input_hw"] or ("H", f"W (multiples of {det.config.data.pad_divisor}, >= {meta['min_side']})")
    b = meta["batch"] or "B"
    print(
        f"wrote {args.out} ({size_mb:.1f} MB, {time.perf_counter() - t0:.1f} s): {det.config.name}, {args.format}"
        f"{' ' + meta['contract'] if args.format == 'onnx' else ''}, input {b}x3x{h}x{w}, {meta['precision']}"
    )
    if report is not None:
        kind = "fp16 (looser) tolerances" if meta["precision"] == "fp16" else "fp32 tolerances"
        print(f"check vs eager PyTorch, {kind}: OK")
        print(report.summary())
    return 0


# --------------------------------------------------------------------------- serve
def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a detector over HTTP (POST /predict, GET /health, /metrics, a web page at /)",
        description="Serve a detector over HTTP; docs/serving.md describes the endpoints, limits and errors. "
        "SIGTERM or Ctrl+C stops accepting connections, answers the requests in flight and exits 0.",
    )
    _add_model_group(
        p,
        "preset name or config file ('-' with our .safetensors or an exported .onnx)",
        weights_help="weights file or URL (.safetensors, MMDetection .pth, or .onnx)",
        weights_required=True,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: all)"
    )
    p.add_argument("--port", type=int, default=8000)
    _add_device(p)
    p.add_argument("--max-batch", type=int, default=8, help="most images per model call (default 8)")
    p.add_argument(
        "--batch-timeout-ms",
        type=float,
        default=10.0,
        help="how long a request waits for others to batch with (default 10)",
    )
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default 20)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="most /predict requests in the server at once; more get 503 with Retry-After (default 64)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds a request may take from its arrival; then 504, and its work not started is dropped (default 30)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key ('Authorization: Bearer KEY' or 'X-API-Key: KEY') on all but /, /health, /demo.png; "
        "default: the NASFPN_API_KEY environment variable, else no key (prefer the variable: a command line is "
        "visible to other users)",
    )
    _add_fast_group(p)  # auto measures one image per call: a request's latency
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from nasfpn.apps.predict import load_detector
    from nasfpn.apps.serve import API_KEY_ENV, ServeSettings, run_server

    settings = ServeSettings(
        max_batch=args.max_batch,
        batch_timeout_ms=args.batch_timeout_ms,
        max_upload_mb=args.max_upload_mb,
        max_queue=args.max_queue,
        timeout_s=args.timeout,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
    )
    det = load_detector(
        args.model, args.weights, args.device, args.overrides, args.config_file, optimize=_optimize_arg(args)
    )
    run_server(det, args.host, args.port, settings)
    return 0


# --------------------------------------------------------------------------- check-data
def _add_check_data(sub) -> None:
    p = sub.add_parser(
        "check-data",
        help="validate a dataset (COCO, YOLO, Pascal VOC): labels, boxes, ids and image files",
        description="Report every problem of a dataset's annotations and images, grouped by kind; YOLO "
        "problems name the label file and line, VOC problems the XML file and object. "
        "Exit status 1 if there are errors (training refuses such data unless told to skip it).",
    )
    p.add_argument(
        "data",
        metavar="DATA",
        help="COCO instances JSON (then IMAGE_DIR), YOLO data.yaml, Pascal VOC folder or COCO root",
    )
    p.add_argument("image_dir", nargs="?", help="folder the JSON's file_name entries are relative to")
    p.add_argument("--data-format", choices=_DATA_FORMATS, help="format of DATA (default: detected)")
    p.add_argument(
        "--split", action="append", help="split to check (repeatable; default: train and val, where they exist)"
    )
    p.add_argument("--no-images", action="store_true", help="check the annotations only, not the image files")
    p.add_argument("--verify", action="store_true", help="decode every image fully (slow; finds truncated files)")
    p.add_argument("--workers", type=int, default=None, help="threads reading image files")
    p.add_argument("--max-examples", type=int, default=10, help="problems listed per kind")
    p.add_argument("--json", dest="json_out", help="also write every problem to this JSON file")
    p.set_defaults(func=_cmd_check_data)


def _cmd_check_data(args: argparse.Namespace) -> int:
    import dataclasses

    from nasfpn.core.fileio import write_json_atomic
    from nasfpn.data.checks import Problem, check_dataset, format_report, has_errors
    from nasfpn.engine.data_paths import dataset_splits

    try:
        targets = dataset_splits(args.data, args.data_format, args.split, args.image_dir)
    except ValueError as e:  # the dataset as a whole (its data.yaml, its layout) is unusable
        targets, failed = [], [Problem("invalid_dataset", str(e), str(args.data))]
    else:
        failed = []
    rows, problems = [], list(failed)
    for split, ann, images in targets:
        found = check_dataset(
            ann,
            images,
            check_images=not args.no_images,
            verify=args.verify,
            workers=args.workers,
            progress=sys.stderr.isatty(),
        )
        if split is not None:
            print(f"{ann if not isinstance(ann, (str, Path)) else f'{ann} (split {split})'}:")
        print(format_report(found, args.max_examples))
        problems += found
        rows += [{**dataclasses.asdict(p), "severity": p.severity, "split": split} for p in found]
    if failed:
        print(format_report(failed, args.max_examples))
        rows += [{**dataclasses.asdict(p), "severity": p.severity, "split": None} for p in failed]
    if args.json_out:
        write_json_atomic(rows, args.json_out)
    return 1 if has_errors(problems) else 0


# --------------------------------------------------------------------------- convert-data
def _add_convert_data(sub) -> None:
    p = sub.add_parser(
        "convert-data",
        help="write a YOLO or Pascal VOC dataset as COCO annotation files",
        description="Write each split as OUT/instances_<split>.json (atomically), after the same checks as "
        "check-data. Images are not copied: file names stay relative to the dataset's image folder (the YOLO "
        "root, VOC's JPEGImages), which --train-images / --val-images then name.",
    )
    p.add_argument("src", help="YOLO data.yaml or Pascal VOC folder")
    p.add_argument("--to", required=True, choices=["coco"], help="output format")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--data-format", choices=("yolo", "voc"), help="format of SRC (default: detected)")
    p.add_argument("--split", action="append", help="split to convert (repeatable; default: every split there is)")
    p.add_argument(
        "--skip-invalid", action="store_true", help="convert without the objects and images with error-level problems"
    )
    p.set_defaults(func=_cmd_convert_data)


def _cmd_convert_data(args: argparse.Namespace) -> int:
    from nasfpn.data.convert import convert_to_coco

    done = convert_to_coco(args.src, args.out, args.data_format, args.split, args.skip_invalid)
    for s in done:
        left_out = f", {s.skipped} invalid item(s) left out" if s.skipped else ""
        print(f"wrote {s.ann_file}: {s.images} images, {s.annotations} objects{left_out}")
    images = done[0].image_dir.resolve()
    print(f"images stay in {images}: e.g. --train-ann {done[0].ann_file} --train-images {images}")
    return 0


# --------------------------------------------------------------------------- train
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a detector (also under torchrun for several GPUs / processes)",
        description="Train MODEL on a COCO-format dataset. Writes config.yaml, log.jsonl, metrics.csv, "
        "last/best checkpoints (.pt) and weights (.safetensors), and loss/AP curves into --out.",
    )
    _add_model_group(
        p,
        "preset name or .yaml/.json config (optional with --resume: the run's config.yaml)",
        optional=True,
        set_example="train.base_lr=0.04",
    )
    _add_data_group(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--epochs", type=int, help="train.epochs")
    _add_loader_group(p, batch_size=None, workers=None)
    p.add_argument("--size", type=int, help="crop / test size (data.image_size)")
    _add_device(p, default=None)
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision (train.amp)")
    p.add_argument("--grad-clip", type=float, help="max global gradient norm, 0 = off (train.grad_clip)")
    p.add_argument("--seed", type=int, help="train.seed: data order, augmentation and initial weights")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (train.deterministic)")
    p.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm across processes (train.sync_bn)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (train.channels_last)")
    p.add_argument("--eval-interval", type=int, help="evaluate every N epochs (train.eval_interval)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt, exactly")
    f = p.add_argument_group("fine-tuning and weight averaging")
    f.add_argument(
        "--weights",
        help="start from these weights (.safetensors, training checkpoint .pt, MMDetection .pth or URL): "
        "every tensor whose name and shape fit is loaded, the class layer only for the same classes "
        "(train.init_weights; not read when a run resumes)",
    )
    f.add_argument(
        "--transfer",
        choices=["backbone", "neck", "all"],
        help="the part of --weights to load: backbone, neck (backbone and neck) or all (default) (train.transfer)",
    )
    f.add_argument(
        "--weights-partial",
        action="store_true",
        help="accept --weights that fit less than half of the parameters to transfer (train.transfer_partial)",
    )
    f.add_argument(
        "--freeze",
        metavar="PART:EPOCHS",
        help="freeze backbone, or neck (backbone and neck), for the first EPOCHS epochs, e.g. backbone:2; "
        "comma-separated for both (train.freeze)",
    )
    f.add_argument(
        "--ema", type=float, metavar="DECAY", help="EMA of the weights, evaluated and saved, e.g. 0.9998 (train.ema)"
    )
    p.add_argument(
        "--checkpoint-interval",
        type=int,
        default=0,
        metavar="STEPS",
        help="also write last.pt every STEPS steps (default: at epoch ends only)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (then evaluate)")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="train without the images/annotations the data check reports as errors",
    )
    p.add_argument("--no-check-images", action="store_true", help="data check: skip reading the image headers")
    _add_no_progress(p)
    p.set_defaults(func=_cmd_train)


def _train_config(args: argparse.Namespace):
    """The run's config: the model (or, with --resume, the run's config.yaml), --config, --set, then the flags."""
    from dataclasses import replace

    from nasfpn.core.presets import resolve_config

    model = args.model
    if model is None:
        saved = Path(args.out) / "config.yaml"
        if not (args.resume and saved.is_file()):
            raise ValueError(
                f"name the model (preset or config file); it may be left out only with --resume and an existing {saved}"
            )
        model = str(saved)
    flags = {
        "train.epochs": args.epochs,
        "data.batch_size": args.batch_size,
        "data.image_size": args.size,
        "data.workers": args.workers,
        "train.amp": args.amp,
        "train.grad_clip": args.grad_clip,
        "train.seed": args.seed,
        "train.eval_interval": args.eval_interval,
        "train.deterministic": True if args.deterministic else None,
        "train.sync_bn": True if args.sync_bn else None,
        "train.channels_last": True if args.channels_last else None,
        "train.transfer": args.transfer,
        "train.transfer_partial": True if args.weights_partial else None,
        "train.ema": args.ema,
    }
    # The flags come last, so they win over --set.
    overrides = list(args.overrides) + [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = resolve_config(model, overrides, args.config_file)
    # A path and a freeze spec are taken as typed (not read as YAML, as --set values are).
    texts = {"init_weights": args.weights, "freeze": args.freeze}
    return replace(cfg, train=replace(cfg.train, **{k: v for k, v in texts.items() if v is not None}))


def _cmd_train(args: argparse.Namespace) -> int:
    from nasfpn.engine.trainer import train

    cfg = _train_config(args)
    result = train(
        cfg,
        _data_paths(args),
        args.out,
        resume=args.resume,
        device=args.device,
        checkpoint_interval=args.checkpoint_interval,
        skip_invalid=args.skip_invalid,
        progress=False if args.no_progress else None,
        max_steps=args.max_steps,
        check_images=not args.no_check_images,
        handle_signals=True,
    )
    # The trainer's "resume with --resume" becomes the command to type.
    message = result.message.replace("resume with --resume", f"resume with: {_resume_command(args)}")
    if result.status == "interrupted":  # exit status 128 + signal, as a shell reports a process killed by it
        print(message, file=sys.stderr)
        return 128 + (result.signal or 2)  # 143 for SIGTERM, 130 for SIGINT
    if result.status in ("diverged", "write_error", "worker_died", "data_missing"):
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


def _resume_command(args: argparse.Namespace) -> str:
    """This command line with ``--resume`` (under torchrun: its arguments, for the same torchrun)."""
    import shlex

    argv = list(getattr(args, "argv", None) or ["train", "...", "--out", str(args.out)])
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["nasfpn", *argv])


# --------------------------------------------------------------------------- eval
def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="COCO box AP of weights on a dataset, or of an existing results file",
        description="With a model: run it on the validation images (test pre-processing), print the "
        "COCO table and per-class AP, write results.json and metrics.json into --out. "
        "With --ann and --results: score a COCO results file, no model needed.",
    )
    _add_model_group(
        p,
        "preset name or config file ('-' or left out: the config our .safetensors carry)",
        optional=True,
        weights_help="weights: .safetensors, training checkpoint .pt, MMDetection .pth or URL",
    )
    _add_data_group(p, train=False)
    p.add_argument(
        "--out",
        help="folder for results.json, metrics.json and the report (pr_curves, confusion_matrix, worst/); "
        "with --results: the report only",
    )
    p.add_argument("--ann", help="ground-truth COCO JSON (with --results)")
    p.add_argument("--results", help="COCO results JSON to score (with --ann)")
    p.add_argument("--json", dest="json_out", help="with --results: write the metrics to this JSON file")
    _add_device(p, default=None)
    _add_loader_group(p, batch_size=8, workers=2)
    _add_no_progress(p)
    _add_fast_group(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from nasfpn.apps.evaluate import run_eval, score_results

    if args.results or args.ann:
        if not (args.results and args.ann):
            raise ValueError("scoring a results file needs both --ann and --results")
        score_results(args.ann, args.results, args.json_out, report_dir=args.out)
        return 0
    if not args.weights:
        raise ValueError("give --weights (or --ann and --results to score an existing results file)")
    ann, images = _val_paths(args)
    run_eval(
        args.model,
        args.weights,
        ann,
        images,
        args.out,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        overrides=args.overrides,
        config_file=args.config_file,
        progress=False if args.no_progress else None,
        optimize=_optimize_arg(args),
    )
    return 0


# --------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="generate the synthetic dataset, train nasfpn_tiny on it (CPU), evaluate, draw",
        description="The embedded end-to-end run: synthetic shapes dataset -> training of the "
        "nasfpn_tiny preset -> COCO evaluation -> curves and pictures of detections in --out.",
    )
    p.add_argument("--out", default="nasfpn_demo", help="output folder (default ./nasfpn_demo)")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-time budget for the whole demo (default 10)")
    _add_device(p)
    p.add_argument("--seed", type=int, default=0)
    _add_set(p, "override the nasfpn_tiny config")
    _add_no_progress(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from nasfpn._clock import STARTED  # the budget counts the imports too (seconds on a slow CPU)
    from nasfpn.apps.demo import run_demo

    result = run_demo(
        args.out,
        minutes=args.minutes,
        device=args.device,
        seed=args.seed,
        overrides=args.overrides,
        progress=False if args.no_progress else None,
        started=STARTED,
    )
    return 0 if result.ok else 1


# --------------------------------------------------------------------------- bench
def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure inference, a training step or the input pipeline: latency, throughput, memory"
    )
    _add_model_group(
        p, _MODEL_HELP, weights_help="weights: our .safetensors, an MMDetection .pth, a training checkpoint, or a URL"
    )
    p.add_argument(
        "--mode",
        default="infer",
        choices=["infer", "train", "data"],
        help="infer: images -> detections; train: forward + loss + backward + SGD step; "
        "data: JPEG decode + training transform per worker",
    )
    _add_device(p)
    p.add_argument("--batch", type=int, default=None, help="images per iteration (default: 1 for infer, 2 for train)")
    p.add_argument("--size", type=int, help="square image side (default: the config's image_size)")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=_PRECISIONS,
        help="infer: weights and activations in this type; train: autocast (fp16 with a grad scaler)",
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="NHWC weights and activations (infer default: on; train default: off)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the network (first call compiles)")
    p.add_argument(
        "--fuse-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="infer: fold BatchNorm into the convs (default: on)",
    )
    p.add_argument("--plain", action="store_true", help="infer: the model as built, no fast path at all")
    p.add_argument(
        "--checkpoint-stacks",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train: recompute NAS-FPN stacks in the backward pass (default: the config's)",
    )
    p.add_argument(
        "--pairs-per-image",
        type=int,
        default=1000,
        help="infer without --weights: shift the class bias so this many (anchor, class) pairs per "
        "image pass the score threshold, as with a trained model (default 1000)",
    )
    p.add_argument("--decoder", default="pil", choices=["pil", "torchvision"], help="data: JPEG decoder")
    p.add_argument("--images", type=int, default=32, help="data: generated 640x480 JPEGs (default 32)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (default 10; data: passes over the images)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: PyTorch's choice)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from nasfpn.apps.bench import bench_data, bench_infer, bench_train, format_result

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _config(args)
    if args.mode == "infer":
        result = bench_infer(
            cfg,
            args.device,
            args.batch or 1,
            args.size,
            args.precision,
            args.channels_last,
            args.compile,
            args.fuse_bn,
            args.plain,
            args.warmup,
            args.iters,
            args.weights,
            args.pairs_per_image,
        )
    elif args.mode == "train":
        result = bench_train(
            cfg,
            args.device,
            args.batch or 2,
            args.size,
            args.precision,
            bool(args.channels_last),
            args.compile,
            args.checkpoint_stacks,
            args.warmup,
            args.iters,
        )
    else:
        result = bench_data(cfg, args.size, args.images, decoder=args.decoder, passes=args.iters)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return 0


COMMANDS = [
    _add_config,
    _add_info,
    _add_convert,
    _add_predict,
    _add_search,
    _add_export,
    _add_serve,
    _add_check_data,
    _add_convert_data,
    _add_train,
    _add_eval,
    _add_demo,
    _add_bench,
]


def _installed_version() -> str:
    # The installed distribution's version: pyproject.toml is its one source.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nasfpn")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nasfpn", description="RetinaNet with FPN / NAS-FPN pyramids.")
    parser.add_argument("--version", action="version", version=f"nasfpn {_installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for messages that repeat the command
    try:
        _check_device(args)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
