"""The command line: every subcommand parses, keeps its flags, and shares one declaration of the
common options (model and config, device, fast path, data, batching)."""

from __future__ import annotations

import argparse
import json

import pytest

from nasfpn import cli
from nasfpn.cli import build_parser, main

# Every flag of every subcommand: a flag that disappears or is renamed breaks users' scripts.
FLAGS = {
    "config": "--config --json --list --set",
    "info": "--config --json --set --size --weights",
    "convert": "--config --model --set",
    "predict": "--batch-size --config --device --fast --no-vis --out --plain --precision --score-thr --set --vis-thr "
    "--weights",
    "search": "--cells --compare --controller --cost-model --cost-size --cost-weight --cost-weight-over --data "
    "--data-format --eta --fake-evaluator --final-baselines --full-preset --gp --held-out --heldout-ann "
    "--heldout-images --holdout --keep-weights --latency-runs --max-flops --max-latency-ms --max-steps "
    "--measure-latency --min-steps --no-baselines --no-reuse --out --population --ppo-batch --ppo-entropy "
    "--ppo-epochs --ppo-lr --proxy-batch --proxy-depth --proxy-ema --proxy-ema-tau --proxy-epochs "
    "--proxy-head-convs --proxy-lr --proxy-match-iou --proxy-optimizer --proxy-precision --proxy-seeds "
    "--proxy-separable --proxy-size --proxy-stacks --proxy-warmup --proxy-weight-decay --proxy-width "
    "--ray-address --resume --scheduler --seed --synthetic-images --synthetic-min-size --target-flops --target-latency-ms --threads --top-k --tournament --train-ann "
    "--train-images --trials --val-ann --val-images --val-split --workers",
    "export": "--batch --config --contract --dynamic-batch --dynamic-size --fixed-size --format --no-check --opset "
    "--out --precision --sample --set --size --weights",
    "serve": "--api-key --batch-timeout-ms --config --device --fast --host --max-batch --max-queue --max-upload-mb "
    "--plain --port --precision --set --timeout --weights",
    "check-data": "--data-format --json --max-examples --no-images --split --verify --workers",
    "convert-data": "--data-format --out --skip-invalid --split --to",
    "train": "--amp --batch-size --channels-last --checkpoint-interval --config --data --data-format --deterministic "
    "--device --train-split --val-split "
    "--epochs --eval-interval --grad-clip --max-steps --no-check-images --no-progress --out --resume --seed "
    "--set --size --skip-invalid --sync-bn --train-ann --train-images --val-ann --val-images --workers "
    "--weights --transfer --weights-partial --freeze --ema",
    "eval": "--ann --batch-size --config --data --data-format --device --fast --json --no-progress --out --plain "
    "--precision --results --set --split --val-ann --val-images --val-split --weights --workers",
    "demo": "--device --minutes --no-progress --out --seed --set",
    "bench": "--batch --channels-last --checkpoint-stacks --compile --config --decoder --device --fuse-bn --images "
    "--iters --json --mode --no-channels-last --no-checkpoint-stacks --no-fuse-bn --pairs-per-image --plain "
    "--precision --set --size --threads --warmup --weights",
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_subcommand_prints_its_help_and_keeps_its_flags(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: nasfpn {command}")
    flags = {o for a in _subparsers()[command]._actions for o in a.option_strings if o.startswith("--")}
    assert flags - {"--help"} == set(FLAGS[command].split())


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(command in out for command in FLAGS)


def test_shared_options_are_the_same_everywhere():
    """--set, --config, --device, the fast path and batching mean the same in every command that has them."""
    seen: dict[str, set[tuple]] = {}
    for parser in _subparsers().values():
        for a in parser._actions:
            for flag in ("--set", "--config", "--fast"):
                if flag in a.option_strings:
                    seen.setdefault(flag, set()).add((a.dest, type(a).__name__, repr(a.default), a.metavar))
    assert seen["--set"] == {("overrides", "_AppendAction", "[]", "KEY=VALUE")}
    assert seen["--config"] == {("config_file", "_StoreAction", "None", None)}
    assert seen["--fast"] == {("fast", "_StoreTrueAction", "False", None)}


def test_predict_command_line():
    args = _parse(
        "predict",
        "-",
        "a.jpg",
        "dir/",
        "--weights",
        "w.safetensors",
        "--out",
        "o",
        "--set",
        "model.test.nms_iou=0.6",
        "--set",
        "data.image_size=256",
        "--fast",
    )
    assert (args.model, args.sources, args.weights, args.out) == ("-", ["a.jpg", "dir/"], "w.safetensors", "o")
    assert args.overrides == ["model.test.nms_iou=0.6", "data.image_size=256"] and args.config_file is None
    assert (args.device, args.batch_size, args.score_thr, args.vis_thr, args.no_vis) == ("cpu", 4, None, 0.3, False)
    assert cli._optimize_arg(args) == {"precision": "fp32"}
    # The default: the fast path at $NASFPN_PRECISION (fp32 in the test suite, conftest.py); --plain: the plain model.
    assert cli._optimize_arg(_parse("predict", "m", "x", "--weights", "w", "--out", "o")) == {"precision": "fp32"}
    assert cli._optimize_arg(_parse("predict", "m", "x", "--weights", "w", "--out", "o", "--plain")) is False
    assert cli._optimize_arg(_parse("predict", "m", "x", "--weights", "w", "--out", "o", "--precision", "bf16")) == {
        "precision": "bf16"
    }
    with pytest.raises(SystemExit):
        _parse("predict", "m", "x", "--out", "o")  # --weights is required


def test_eval_and_train_defaults():
    args = _parse("eval", "--weights", "w.safetensors", "--val-ann", "a.json", "--val-images", "imgs")
    assert (args.model, args.device, args.batch_size, args.workers, args.no_progress) == (None, None, 8, 2, False)
    assert cli._val_paths(args) == ("a.json", "imgs")
    args = _parse("train", "nasfpn_tiny", "--data", "d", "--out", "run")
    assert (args.batch_size, args.workers, args.device, args.overrides) == (None, None, None, [])
    args = _parse("bench", "nasfpn_tiny", "--precision", "bf16")
    assert (args.device, args.precision, args.weights, args.fuse_bn) == ("cpu", "bf16", None, True)
    with pytest.raises(SystemExit):
        _parse("bench", "nasfpn_tiny", "--precision", "fp8")


def test_train_flags_refine_the_config_after_set(tmp_path):
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  base_lr: 0.01\n  epochs: 9\n")
    args = _parse(
        "train",
        "nasfpn_tiny",
        "--data",
        "d",
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(user),
        "--set",
        "train.epochs=5",
        "--set",
        "train.seed=3",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--sync-bn",
    )
    cfg = cli._train_config(args)
    assert (cfg.train.base_lr, cfg.train.epochs, cfg.train.seed) == (0.01, 2, 3)  # the flag wins over --set
    assert (cfg.data.batch_size, cfg.train.sync_bn, cfg.data.workers) == (4, True, 0)
    with pytest.raises(ValueError, match="--resume"):
        cli._train_config(_parse("train", "--data", "d", "--out", str(tmp_path / "run")))


def test_config_command_applies_file_and_set(tmp_path, capsys):
    user = tmp_path / "user.yaml"
    user.write_text("train:\n  base_lr: 0.01\n")
    assert main(["config", "nasfpn_tiny", "--config", str(user), "--set", "train.epochs=7", "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert (cfg["name"], cfg["train"]["epochs"], cfg["train"]["base_lr"]) == ("nasfpn_tiny", 7, 0.01)
    assert main(["config", "--list"]) == 0
    assert "nasfpn_tiny" in capsys.readouterr().out.split()


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["info", "-"]) == 2
    assert "error: no config: name a preset" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.yaml")]) == 2
    assert f"error: config file {tmp_path / 'missing.yaml'}: does not exist" in capsys.readouterr().err
    assert main(["config", "nasfpn_tiny", "--set", "train.epoch=3"]) == 2
    assert "unknown key" in capsys.readouterr().err
    assert main(["eval", "--val-ann", "a.json", "--val-images", "imgs"]) == 2
    assert "give --weights" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", "src.pth", "dst.safetensors"])  # --model is required


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"nasfpn {version('nasfpn')}"


def test_export_format_follows_the_file_name_or_refuses_a_contradiction():
    from nasfpn.cli import export_format

    assert export_format("m.onnx", None) == "onnx" and export_format("m.pt2", None) == "torch-export"
    assert export_format("m.PT2", "torch-export") == "torch-export" and export_format("model", "onnx") == "onnx"
    with pytest.raises(ValueError, match=r"m\.pt2 is a \.pt2 file but --format is onnx"):
        export_format("m.pt2", "onnx")
    with pytest.raises(ValueError, match="cannot tell the format"):
        export_format("model.bin", None)
