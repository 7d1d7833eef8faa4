"""Command line: ``nasfpn <command> ...``. Parsing only; the library does the work."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("model", help="preset name (see `nasfpn config --list`) or a .yaml/.json config file")
    p.add_argument("--config", dest="config_file", help="YAML file refining the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config value, e.g. --set model.test.score_thr=0.3 (repeatable)")
    if weights:
        p.add_argument("--weights", help="weights: our .safetensors, an MMDetection .pth, a training checkpoint, or a URL")


def _config(args: argparse.Namespace):
    from .presets import get_config

    return get_config(args.model, args.overrides, args.config_file)


# --------------------------------------------------------------------------- config
def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the fully resolved config of a preset")
    p.add_argument("model", nargs="?", help="preset name or config file")
    p.add_argument("--config", dest="config_file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    from .config import config_to_dict, config_to_yaml
    from .presets import PRESETS

    if args.list or not args.model:
        for name in PRESETS:
            print(name)
        return 0
    cfg = _config(args)
    print(json.dumps(config_to_dict(cfg), indent=2) if args.json else config_to_yaml(cfg), end="\n" if args.json else "")
    return 0


# --------------------------------------------------------------------------- info
def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and anchors of a model")
    _add_model_args(p, weights=False)
    p.add_argument("--size", type=int, help="square input size for FLOPs (default: the config's image_size)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from .models import build_model
    from .models.summary import model_summary

    cfg = _config(args)
    model = build_model(cfg.model, pretrained_backbone=False)
    info = model_summary(model, args.size or cfg.data.image_size)
    info["model"] = cfg.name
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model            {cfg.name}")
    print(f"parameters       {info['params_total']:,} (backbone {info['params_backbone']:,}, "
          f"neck {info['params_neck']:,}, head {info['params_head']:,})")
    print(f"input            1x3x{info['size']}x{info['size']}")
    print(f"FLOPs            {info['gflops']:.1f} GFLOPs = {info['gmacs']:.1f} GMACs "
          "(torch.utils.flop_counter, backbone + neck + head; 1 MAC = 2 FLOPs)")
    print(f"anchors          {info['anchors']:,} ({', '.join(map(str, info['anchors_per_level']))} per level)")
    return 0


# --------------------------------------------------------------------------- convert
def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert an MMDetection checkpoint to our safetensors format")
    p.add_argument("src", help="MMDetection .pth (or any weights we can read), path or URL")
    p.add_argument("dst", help="output .safetensors")
    p.add_argument("--model", dest="model", required=True, help="preset / config the checkpoint belongs to")
    p.add_argument("--config", dest="config_file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .api import export_weights, load

    det = load(_config(args), weights=args.src)
    export_weights(det, det.config, args.dst)
    n = sum(t.numel() for t in det.model.state_dict().values())
    print(f"wrote {args.dst}: {len(det.model.state_dict())} tensors, {n:,} values, config {det.config.name}")
    return 0


# --------------------------------------------------------------------------- predict
def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="detect objects in images: writes predictions.json and drawn pictures")
    p.add_argument("model", help="preset name or config file (may be omitted as '-' with our .safetensors)")
    p.add_argument("sources", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--weights", required=True, help="weights file or URL (.safetensors, MMDetection .pth, or exported .onnx)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", dest="config_file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--score-thr", type=float, default=None, help="score threshold (default: the config's, 0.05)")
    p.add_argument("--vis-thr", type=float, default=0.3, help="only draw detections above this score")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--no-vis", action="store_true", help="skip writing pictures")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    model = None if args.model == "-" else args.model
    failed = run_predict(model, args.sources, args.weights, args.out, device=args.device, score_thr=args.score_thr,
                         batch_size=args.batch_size, vis=not args.no_vis, vis_thr=args.vis_thr,
                         overrides=args.overrides, config_file=args.config_file)
    return 1 if failed else 0


# --------------------------------------------------------------------------- check-data
def _add_check_data(sub) -> None:
    p = sub.add_parser("check-data", help="validate a COCO-format dataset: JSON, boxes, ids and image files",
                       description="Report every problem of an annotation file and its images, grouped by kind. "
                       "Exit status 1 if there are errors (training refuses such data unless told to skip it).")
    p.add_argument("ann_file", help="COCO instances JSON")
    p.add_argument("image_dir", help="folder the JSON's file_name entries are relative to")
    p.add_argument("--no-images", action="store_true", help="check the JSON only, not the image files")
    p.add_argument("--verify", action="store_true", help="decode every image fully (slow; finds truncated files)")
    p.add_argument("--workers", type=int, default=None, help="threads reading image files")
    p.add_argument("--max-examples", type=int, default=10, help="problems listed per kind")
    p.add_argument("--json", dest="json_out", help="also write every problem to this JSON file")
    p.set_defaults(func=_cmd_check_data)


def _cmd_check_data(args: argparse.Namespace) -> int:
    import dataclasses

    from .data.checks import check_dataset, format_report, has_errors

    problems = check_dataset(args.ann_file, args.image_dir, check_images=not args.no_images, verify=args.verify,
                             workers=args.workers, progress=sys.stderr.isatty())
    print(format_report(problems, args.max_examples))
    if args.json_out:
        rows = [{**dataclasses.asdict(p), "severity": p.severity} for p in problems]
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 1 if has_errors(problems) else 0


COMMANDS = [_add_config, _add_info, _add_convert, _add_predict, _add_check_data]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nasfpn", description="RetinaNet with FPN / NAS-FPN pyramids.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
