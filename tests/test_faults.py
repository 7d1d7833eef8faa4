"""Training that survives faults: each test injects one and checks that the run stops cleanly with a
message naming the last checkpoint, that this checkpoint loads, and that ``--resume`` then finishes
the run exactly as an uninterrupted one (same per-step losses, same final weights).

Faults: SIGTERM / SIGINT (also a Ctrl-C that reaches the DataLoader workers, and a second signal),
a corrupt or torn ``last.pt`` (truncated, empty, random bytes, one flipped byte, missing), a crash
between the steps of a checkpoint write, a full disk while writing, a DataLoader worker killed by
SIGKILL, and the training image folder vanishing mid-run.

The runs are tiny (ResNet-10, 12 images of 128 px, 3 steps, no evaluation) and go through
``nasfpn train`` (``cli.main``) in this process; the curves are not drawn.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import nasfpn.engine.trainer as trainer_module
from engine_utils import read_log, synthetic_data, tiny_config, train_args
from nasfpn.cli import main
from nasfpn.core.config import config_to_yaml
from nasfpn.data.coco import CocoDataset
from nasfpn.engine.checkpoint import (
    checksums_path,
    load_resume_checkpoint,
    previous_path,
    save_checkpoint,
)
from nasfpn.engine.run_dir import RunFiles

STEPS = 3  # 12 images, batch 4, 1 epoch


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    monkeypatch.setattr(RunFiles, "plots", lambda self, step_log, history: None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = synthetic_data(root / "data", num_train=12, num_val=2)
    cfg_file = root / "tiny.yaml"
    cfg_file.write_text(config_to_yaml(tiny_config(epochs=1)))
    return cfg_file, data


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted run: its log and final weights."""
    cfg_file, data = setup
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RunFiles, "plots", lambda self, step_log, history: None)
        assert _cli(cfg_file, data, out) == 0
    return read_log(out), load_file(out / "last.safetensors")


def _cli(cfg_file: Path, data, out: Path, *extra: str) -> int:
    """``nasfpn train`` without validation data (no evaluation: the runs stay short)."""
    argv = train_args(cfg_file, data, out)
    for flag in ("--val-ann", "--val-images"):
        i = argv.index(flag)
        del argv[i : i + 2]
    return main([*argv, "--no-progress", *extra])


def _assert_matches(out: Path, reference) -> None:
    """The resumed run in ``out`` equals the uninterrupted one."""
    ref_log, ref_weights = reference
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(STEPS))
    for mine, ref in zip(log, ref_log):
        for key in ("loss", "loss_cls", "loss_bbox", "lr"):
            assert mine[key] == ref[key], (mine["step"], key, mine[key], ref[key])
    weights = load_file(out / "last.safetensors")
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    # A finished run keeps its last checkpoint only.
    assert not previous_path(out / "last.pt").exists()


def _signal_at_step(monkeypatch, step: int, *signals: int):
    """Send ``signals`` to this process when training step ``step`` (0-based) begins; returns the real step."""
    real = trainer_module.train_step
    calls = {"n": 0}

    def train_step(*args, **kwargs):
        if calls["n"] == step:
            for s in signals:
                os.kill(os.getpid(), s)
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", train_step)
    return real


def _in_worker_once_checkpointed(real_getitem, out: Path, marker: Path, act):
    """A ``CocoDataset.__getitem__`` that, in the training loader's worker, once the first checkpoint
    exists, calls ``act()`` (once: ``marker``). The worker fetches ahead, so it waits for the
    checkpoint at the first sample of the last batch."""
    calls = {"n": 0}

    def getitem(self, key):
        if torch.utils.data.get_worker_info() is not None and isinstance(key, tuple) and not marker.exists():
            calls["n"] += 1  # this worker's own count (a forked copy)
            if calls["n"] == 2 * 4 + 1:
                while not (out / "last.pt").exists():
                    time.sleep(0.01)
                marker.touch()
                act()
        return real_getitem(self, key)

    return getitem


def _step_of(path: Path) -> int:
    ckpt, used, bad = load_resume_checkpoint(path)
    assert used == path and not bad, bad
    return int(ckpt["step"])


# --------------------------------------------------------------------------- signals


def test_sigterm_checkpoints_the_step_and_resumes_exactly(setup, reference, tmp_path, monkeypatch, capfd):
    cfg_file, data = setup
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    real = _signal_at_step(monkeypatch, 1, signal.SIGTERM)
    assert _cli(cfg_file, data, out) == 128 + signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    err = capfd.readouterr().err
    assert "SIGTERM received: stopping after this step" in err
    assert "stopped by SIGTERM at step 2; checkpoint written:" in err
    assert f"resume with: nasfpn train {cfg_file}" in err and err.rstrip().endswith("--resume")
    # No --checkpoint-interval: the only checkpoint is the one the signal wrote, after step 2 of 3.
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert (ckpt["step"], ckpt["epoch"], ckpt["iter_in_epoch"]) == (2, 0, 2)
    assert _step_of(out / "last.pt") == 2
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"

    monkeypatch.setattr(trainer_module, "train_step", real)
    assert _cli(cfg_file, data, out, "--resume") == 0
    _assert_matches(out, reference)


def test_ctrl_c_reaching_the_loader_worker_stops_cleanly(setup, reference, tmp_path, monkeypatch, capsys):
    """A Ctrl-C in a terminal reaches the DataLoader worker too: it ignores it and the run stops after its step."""
    cfg_file, data = setup
    out = tmp_path / "run"
    marker = tmp_path / "sent"
    real = CocoDataset.__getitem__

    def ctrl_c():
        os.kill(os.getppid(), signal.SIGINT)  # the training process
        os.kill(os.getpid(), signal.SIGINT)  # and this worker, as a terminal does

    monkeypatch.setattr(CocoDataset, "__getitem__", _in_worker_once_checkpointed(real, out, marker, ctrl_c))
    rc = _cli(cfg_file, data, out, "--workers", "1", "--checkpoint-interval", "1")
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGINT, err
    assert "stopped by SIGINT at step" in err and "worker died" not in err
    step = _step_of(out / "last.pt")
    # After step 2, or 3 if this process was slow to see the signal (then the checkpoint ends the epoch).
    assert 1 <= step <= STEPS and f"stopped by SIGINT at step {step};" in err

    monkeypatch.setattr(CocoDataset, "__getitem__", real)
    assert _cli(cfg_file, data, out, "--resume") == 0
    _assert_matches(out, reference)


def test_second_signal_stops_at_once(setup, tmp_path, monkeypatch):
    _, data = setup
    before = signal.getsignal(signal.SIGINT)
    _signal_at_step(monkeypatch, 1, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer_module.train(
            tiny_config(epochs=1), data, tmp_path, quiet=True, checkpoint_interval=1, handle_signals=True
        )
    assert signal.getsignal(signal.SIGINT) == before
    assert _step_of(tmp_path / "last.pt") == 1  # the checkpoint before the signals, intact


# --------------------------------------------------------------------------- verified checkpoints


def _two_checkpoints(folder: Path) -> Path:
    path = folder / "last.pt"
    for step in (1, 2):
        save_checkpoint({"model": {"w": torch.full((64,), float(step))}, "step": step}, path)
    return path


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_byte(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    p.write_bytes(bytes(raw))


CORRUPTIONS = {
    "truncated": (_truncate, "truncated or torn"),
    "empty": (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
    "random bytes": (lambda p: p.write_bytes(os.urandom(p.stat().st_size)), "is corrupt"),
    "one byte flipped": (_flip_byte, "is corrupt"),
    "missing": (lambda p: p.unlink(), "does not exist"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_bad_last_checkpoint_falls_back_to_the_previous(tmp_path, kind):
    path = _two_checkpoints(tmp_path)
    assert _step_of(path) == 2
    assert torch.load(previous_path(path), weights_only=True)["step"] == 1
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(path)
    ckpt, used, bad = load_resume_checkpoint(path)
    assert used == previous_path(path) and ckpt["step"] == 1
    assert len(bad) == 1 and bad[0].startswith(str(path)) and reason in bad[0]


def test_both_checkpoints_bad_is_a_clear_error(tmp_path):
    path = _two_checkpoints(tmp_path)
    _truncate(path)
    previous_path(path).write_bytes(b"")
    with pytest.raises(ValueError, match="no usable checkpoint") as e:
        load_resume_checkpoint(path)
    assert f"{path} is " in str(e.value) and f"{previous_path(path)} is empty" in str(e.value)


def test_a_crash_at_any_step_of_a_write_leaves_a_verified_checkpoint(tmp_path, monkeypatch):
    """A kill between the steps of a checkpoint write (with and without hard links) leaves files
    that verify: the newest complete checkpoint is taken."""
    import nasfpn.engine.checkpoint as ck

    class Killed(BaseException):
        pass

    def crash(*args, **kwargs):
        raise Killed

    cases = [("_keep_as_previous", 2), ("os.replace", 2)]  # before the rotation / before the new file is in place
    for target, expected in cases:
        folder = tmp_path / target
        path = _two_checkpoints(folder)
        with monkeypatch.context() as m:
            if target == "os.replace":
                m.setattr(ck.os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))
                real_replace = os.replace

                def replace(src, dst, real_replace=real_replace):
                    if Path(src).name.startswith(".last.pt."):  # the new file: the kill comes first
                        raise Killed
                    real_replace(src, dst)

                m.setattr(ck.os, "replace", replace)
            else:
                m.setattr(ck, target, crash)
            with pytest.raises(Killed):
                save_checkpoint({"model": {"w": torch.zeros(64)}, "step": 3}, path)
        ckpt, used, bad = load_resume_checkpoint(path)
        assert ckpt["step"] == expected, (target, bad)
        assert "pending" in json.loads(checksums_path(path).read_text())["files"]
        # The next write sorts the listing out again.
        save_checkpoint({"model": {"w": torch.zeros(64)}, "step": 4}, path)
        assert _step_of(path) == 4
        assert torch.load(previous_path(path), weights_only=True)["step"] == expected
        path.write_bytes(b"")
        ckpt, used, bad = load_resume_checkpoint(path)
        assert used == previous_path(path) and ckpt["step"] == expected


def test_resume_with_a_corrupt_last_checkpoint(setup, reference, tmp_path, capsys):
    cfg_file, data = setup
    out = tmp_path / "run"
    assert _cli(cfg_file, data, out, "--checkpoint-interval", "1", "--max-steps", "2") == 0
    assert _step_of(out / "last.pt") == 2
    _flip_byte(out / "last.pt")
    capsys.readouterr()
    assert _cli(cfg_file, data, out, "--resume") == 0
    captured = capsys.readouterr()
    assert f"checkpoint {out / 'last.pt'} has sha256 " in captured.err and "the file is corrupt" in captured.err
    assert f"resuming from {out / 'last.prev.pt'} (step 1) instead" in captured.err
    assert (out / "last.pt.bad").is_file()
    assert f"resumed from {out / 'last.prev.pt'}: epoch 1, step 1" in captured.out
    _assert_matches(out, reference)


# --------------------------------------------------------------------------- disk full, dead worker, lost images


def test_disk_full_while_writing_a_checkpoint(setup, reference, tmp_path, monkeypatch, capsys):
    cfg_file, data = setup
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 2: half written, then the disk is full
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert _cli(cfg_file, data, out, "--checkpoint-interval", "1") == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out / 'last.pt'}: No space left on device (" in err
    assert " free on " in err and f"last checkpoint: {out / 'last.pt'} (step 1), intact" in err
    assert err.rstrip().endswith("--resume")
    assert _step_of(out / "last.pt") == 1  # the previous checkpoint, verified
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert json.loads((out / "summary.json").read_text())["status"] == "write_error"

    monkeypatch.setattr(torch, "save", real_save)
    assert _cli(cfg_file, data, out, "--resume") == 0
    _assert_matches(out, reference)


def test_a_killed_loader_worker(setup, reference, tmp_path, monkeypatch, capsys):
    cfg_file, data = setup
    out = tmp_path / "run"
    marker = tmp_path / "killed"
    real = CocoDataset.__getitem__

    def oom_killer():
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(CocoDataset, "__getitem__", _in_worker_once_checkpointed(real, out, marker, oom_killer))
    assert _cli(cfg_file, data, out, "--workers", "1", "--checkpoint-interval", "1") == 1
    err = capsys.readouterr().err
    assert "error: a data loader worker died (signal 9, SIGKILL) at step" in err
    step = _step_of(out / "last.pt")
    assert 1 <= step < STEPS and f"last checkpoint: {out / 'last.pt'} (step {step})" in err
    assert err.rstrip().endswith("--resume")
    assert json.loads((out / "summary.json").read_text())["status"] == "worker_died"

    assert _cli(cfg_file, data, out, "--workers", "1", "--resume") == 0  # the marker keeps the worker alive
    _assert_matches(out, reference)


def test_the_image_folder_vanishing_mid_run(setup, reference, tmp_path, monkeypatch, capsys):
    """The folder gone: a clear stop (not every remaining step skipped); back: the run resumes."""
    cfg_file, data = setup
    images = Path(data.train_images)
    aside = tmp_path / "aside"
    real = trainer_module.train_step
    calls = {"n": 0}

    def train_step(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            images.rename(aside)
        return result

    monkeypatch.setattr(trainer_module, "train_step", train_step)
    out = tmp_path / "run"
    try:
        assert _cli(cfg_file, data, out, "--checkpoint-interval", "1") == 1
    finally:
        if aside.exists():
            aside.rename(images)
    err = capsys.readouterr().err
    assert f"error: the training image folder {images} is gone (step 1" in err
    assert f"last checkpoint: {out / 'last.pt'} (step 1)" in err
    monkeypatch.setattr(trainer_module, "train_step", real)
    assert _cli(cfg_file, data, out, "--resume") == 0
    _assert_matches(out, reference)


# --------------------------------------------------------------------------- two processes


def _ddp_worker(rank: int, world: int, port: int, data, out_dir: str, result_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    if rank == 1:  # only rank 1 is told to stop, at its second step
        with pytest.MonkeyPatch.context() as patch:
            _signal_at_step(patch, 1, signal.SIGTERM)
            result = _ddp_train(data, out_dir)
    else:
        result = _ddp_train(data, out_dir)
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {"status": result.status, "steps": result.steps, "signal": result.signal, "message": result.message}, f
        )


def _ddp_train(data, out_dir: str):
    cfg = tiny_config(epochs=1)
    cfg = replace(cfg, data=replace(cfg.data, batch_size=2))  # 2 x 2 images a step: 3 steps
    return trainer_module.train(cfg, data, out_dir, device="cpu", quiet=True, handle_signals=True)


@pytest.mark.slow
def test_every_rank_stops_after_the_same_step(setup, tmp_path):
    """Under torchrun a signal that reaches one rank stops all of them after the same step; rank 0 checkpoints it."""
    _, data = setup
    results = tmp_path / "results"
    results.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, port, data, str(out), str(results)), nprocs=2, join=True)
    r0, r1 = (json.loads((results / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["status"] == r1["status"] == "interrupted" and r0["steps"] == r1["steps"] == 2
    assert r0["signal"] == r1["signal"] == signal.SIGTERM
    assert r0["message"].startswith("stopped by SIGTERM at step 2; checkpoint written:")
    assert "rank 0 holds the checkpoints" in r1["message"]
    assert _step_of(out / "last.pt") == 2
