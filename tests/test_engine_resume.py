"""A training process killed with SIGKILL and resumed continues exactly.

``nasfpn train`` runs in a subprocess on tiny synthetic data, writing ``last.pt`` after every step
(``--checkpoint-interval 1``). As soon as a checkpoint exists the process gets SIGKILL; the same
command with ``--resume`` then finishes the run. Its per-step losses and final weights must equal
those of an uninterrupted run (started at the same time, in another folder).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from engine_utils import read_log, synthetic_data, tiny_config, train_args
from nasfpn.core.config import config_to_yaml


def _command(cfg_file, data, out, *extra):
    return [
        sys.executable,
        "-m",
        "nasfpn",
        *train_args(cfg_file, data, out),
        "--deterministic",
        "--checkpoint-interval",
        "1",
        "--no-progress",
        *extra,
    ]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    data = synthetic_data(tmp_path / "data")
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(config_to_yaml(tiny_config(epochs=1)))  # 12 images, batch 4: 3 steps
    killed, reference = tmp_path / "killed", tmp_path / "reference"

    ref_proc = subprocess.Popen(
        _command(cfg_file, data, reference), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    proc = subprocess.Popen(
        _command(cfg_file, data, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 600
    while not (killed / "last.pt").exists():
        assert proc.poll() is None, f"training ended before a checkpoint: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "no checkpoint within the time limit"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    at_kill = torch.load(killed / "last.pt", weights_only=True)
    assert 1 <= at_kill["step"] < 3, "the kill must interrupt the run"

    resumed = subprocess.run(
        _command(cfg_file, data, killed, "--resume"), env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step {at_kill['step']}" in resumed.stdout  # "resumed from ...: epoch E, step S"
    assert ref_proc.wait(timeout=600) == 0, ref_proc.stderr.read().decode()[-3000:]

    log, ref_log = read_log(killed), read_log(reference)
    assert [r["step"] for r in log] == [r["step"] for r in ref_log] == list(range(3))
    for mine, ref in zip(log, ref_log):
        for key in ("loss", "loss_cls", "loss_bbox", "lr", "num_pos"):
            assert abs(mine[key] - ref[key]) <= 1e-6 * max(1.0, abs(ref[key])), (mine["step"], key, mine[key], ref[key])
    exact = all(mine[k] == ref[k] for mine, ref in zip(log, ref_log) for k in ("loss", "loss_cls", "loss_bbox"))
    weights, ref_weights = load_file(killed / "last.safetensors"), load_file(reference / "last.safetensors")
    assert weights.keys() == ref_weights.keys()
    worst = max(float((weights[k].double() - ref_weights[k].double()).abs().max()) for k in weights)
    assert worst <= 1e-6, f"final weights differ by {worst}"
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    print(f"resumed from step {at_kill['step']}; losses bit-identical: {exact}; max weight difference {worst:g}")
