"""Training checkpoints: everything needed to continue a run exactly, in a file that loads with
``torch.load(weights_only=True)``.

A checkpoint is a dict of tensors, containers and plain values::

    format          "nasfpn-train"          version   CHECKPOINT_VERSION
    config          the resolved Config as a plain dict (rebuilds the model)
    model           state dict of the unwrapped model (no "module." / "_orig_mod." prefixes)
    optimizer       optimizer state dict          scaler   GradScaler state dict or None
    step            optimizer steps taken (global), the learning rate is a function of it
    epoch           epoch in progress (0-based)   iter_in_epoch   batches of it already done
    rng             python / numpy / torch / cuda generator states (lists and uint8 tensors)
    data            data-order state: seed, batch layout (order is derived from seed and epoch)
    history         one dict per finished epoch (losses, lr, COCO metrics)
    best            {"AP": ..., "epoch": ...} of the best evaluation so far
    counters        skipped (non-finite) steps, wall time so far

Files are written to a temporary name in the same folder, flushed to the disk and moved into
place with ``os.replace``, so a run killed while saving leaves the previous checkpoint intact.

Verified checkpoints (``save_checkpoint`` / ``load_resume_checkpoint``): each write records the
file's size and sha256 in ``<name>.checksums.json`` beside it and keeps the checkpoint it replaces
as ``<name>.prev.pt`` (``last.pt`` -> ``last.prev.pt``). The steps of a write, each atomic:

1. the new checkpoint is written to a temporary file, fsynced and hashed;
2. the checksum file lists the new file's digest with those of the current and previous files;
3. ``last.pt`` is hard-linked as ``last.prev.pt`` (renamed where the file system has no links);
4. the temporary file replaces ``last.pt``; 5. the checksum file lists the two files kept.

A process killed between any two steps leaves files whose digests are listed, so on resume a
file whose size or digest is not listed was torn or corrupted after it was written. A resume
takes ``last.pt`` if it verifies and loads, else ``last.prev.pt``, and says which and why
(``ValueError`` when neither is usable). A run folder without a checksum file (an older run)
is checked by loading only. A write that fails (disk full, ...) raises ``CheckpointWriteError``
naming the file and the free space; the files already there are left as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nasfpn.core.fileio import atomic_path, write_json_atomic
from nasfpn.core.weights import torch_load_safe

CHECKPOINT_FORMAT = "nasfpn-train"
CHECKPOINT_VERSION = 1


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# --------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Generator states as tensors and lists (safe for ``weights_only`` loading)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt), gauss],
        "numpy": [
            str(name),
            torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- model state


def model_is_finite(state: dict[str, torch.Tensor]) -> bool:
    """True if every floating-point tensor of a state dict is finite."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies with wrapper prefixes (``module.``, ``_orig_mod.``) removed."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v.detach().cpu().clone()
    return out


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (tensors and plain values only); ``ValueError`` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    obj = torch_load_safe(path)
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a nasfpn training checkpoint")
    if obj.get("version") != CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {obj.get('version')} is not supported "
            f"(this nasfpn writes version {CHECKPOINT_VERSION})"
        )
    return obj


# --------------------------------------------------------------------------- verified writes and loads


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written (disk full, ...); the message names the file, the
    reason and the free space. The files already in place are left as they were."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def previous_path(path: str | Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept: ``last.pt`` -> ``last.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checksums_path(path: str | Path) -> Path:
    """The sizes and digests of ``path`` and its previous file: ``last.pt`` -> ``last.checksums.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.checksums.json")


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def write_error_message(path: str | Path, err: BaseException, size_hint: int | None = None) -> str:
    """``cannot write PATH: REASON (N GB free on FOLDER; ...)``."""
    folder = Path(path).parent
    try:
        free = f"{format_bytes(shutil.disk_usage(folder).free)} free on {folder}"
    except OSError:
        free = f"free space on {folder} unknown"
    reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    need = f"; a checkpoint of this run takes about {format_bytes(size_hint)}" if size_hint else ""
    return f"cannot write {path}: {reason} ({free}{need})"


_NO_SPACE = ("No space left on device", "StorageFull", "Disk quota exceeded")


@contextmanager
def writing(path: str | Path, size_hint: int | None = None) -> Iterator[None]:
    """Turns an error of the file system while writing ``path`` into a ``CheckpointWriteError``."""
    try:
        yield
    except CheckpointWriteError:
        raise
    except OSError as e:
        raise CheckpointWriteError(write_error_message(path, e, size_hint), Path(path)) from e
    except Exception as e:
        # Writers in native code (safetensors, torch's zip writer) report a full disk in their own
        # exception types; anything else is not a file-system error and goes on as it is.
        if not any(text in str(e) for text in (*_NO_SPACE, "file write failed")):
            raise
        raise CheckpointWriteError(write_error_message(path, e, size_hint), Path(path)) from e


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex digest}`` of a file."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _is_entry(e: Any) -> bool:
    return isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)


def read_checksums(path: str | Path) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """``(entries by file name, note)`` of ``path``'s checksum file; None when there is none, or
    when it cannot be read (the note says why)."""
    file = checksums_path(path)
    if not file.is_file():
        return None, None
    try:
        doc = json.loads(file.read_text())
        files = doc["files"]
        return {str(k): v for k, v in files.items() if _is_entry(v)}, None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{file} cannot be read ({type(e).__name__}: {e}); the checkpoints are checked by loading only"


def _write_checksums(path: Path, files: dict[str, dict[str, Any] | None]) -> None:
    listed = {k: v for k, v in files.items() if v is not None}
    write_json_atomic({"format": "nasfpn-checksums", "files": listed}, checksums_path(path))


def _digest_if_file(path: Path) -> dict[str, Any] | None:
    return file_digest(path) if path.is_file() else None


def _matching(path: Path, known: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry of ``known`` that ``path`` holds (None: no file, or none matches)."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    if not any(e["size"] == size for e in known):
        return None
    digest = file_digest(path)["sha256"]
    return next((e for e in known if e["size"] == size and e["sha256"] == digest), None)


def _keep_as_previous(path: Path, prev: Path) -> None:
    """``path`` also as ``prev``, atomically; ``path`` stays in place where hard links exist."""
    link = prev.with_name(f".{prev.name}.{os.getpid()}.link")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:  # no hard links on this file system: a rename (path is missing until step 4)
        os.replace(path, prev)
        return
    os.replace(link, prev)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system syncs folders
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: bool = True) -> dict[str, Any]:
    """Write a training checkpoint atomically (``state`` as built by the trainer); returns its
    ``{"size", "sha256", "step"}``.

    With ``keep_previous`` the file ``path`` replaces is kept as ``previous_path(path)`` and both
    are listed in ``checksums_path(path)`` (the module's docstring has the steps).
    ``CheckpointWriteError`` when a file cannot be written: the files in place stay as they were.
    """
    path = Path(path)
    obj = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state}
    size_hint = path.stat().st_size if path.is_file() else _tensor_bytes(obj)
    prev = previous_path(path)
    with writing(path, size_hint):
        sums, _ = read_checksums(path) if keep_previous else ({}, None)
        if sums is None:  # no checksum file: a new run, or one written before checksums were kept
            current, previous = _digest_if_file(path), _digest_if_file(prev)
        elif "pending" in sums:  # a write was cut short: which listed file is where
            known = list(sums.values())
            current, previous = _matching(path, known), _matching(prev, known)
        else:
            current, previous = sums.get(path.name), sums.get(prev.name)
        had_current = path.is_file()
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            new = {**file_digest(tmp), "step": state.get("step"), "time": round(time.time(), 3)}
            if keep_previous:
                _write_checksums(path, {path.name: current, prev.name: previous, "pending": new})
                if had_current:
                    _keep_as_previous(path, prev)
        if keep_previous:
            _write_checksums(path, {path.name: new, prev.name: current if had_current else previous})
        _fsync_dir(path.parent)
    return new


def discard_previous(path: str | Path) -> None:
    """Remove ``previous_path(path)`` (a finished run keeps only its last checkpoint)."""
    path = Path(path)
    sums, _ = read_checksums(path)
    previous_path(path).unlink(missing_ok=True)
    if sums is not None and path.name in sums:
        _write_checksums(path, {path.name: sums[path.name]})


def checkpoint_problem(file: str | Path, known: list[dict[str, Any]] | None) -> str | None:
    """What is wrong with checkpoint ``file`` before it is even loaded (None: nothing seen):
    missing, empty, or, with ``known`` (the entries of its checksum file), a size or sha256 that
    no write recorded."""
    file = Path(file)
    if not file.is_file():
        return "does not exist"
    size = file.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if known is None:
        return None
    if not any(e["size"] == size for e in known):
        sizes = " or ".join(sorted({format_bytes(e["size"]) for e in known})) or "none"
        return f"is {format_bytes(size)}, not the size recorded when it was written ({sizes}): truncated or torn"
    digest = file_digest(file)["sha256"]
    if not any(e["sha256"] == digest for e in known):
        return f"has sha256 {digest[:12]}..., not the one recorded when it was written: the file is corrupt"
    return None


def load_resume_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path, list[str]]:
    """The newest usable checkpoint of ``path`` and ``previous_path(path)``: ``(checkpoint, the file
    it came from, a line per file that was not usable)``.

    A file is usable when its size and sha256 are ones its checksum file lists (when there is
    one) and it loads as a training checkpoint. ``ValueError`` naming both files when neither is.
    """
    path = Path(path)
    sums, note = read_checksums(path)
    known = list(sums.values()) if sums is not None else None
    notes = [note] if note else []
    bad: list[str] = []
    for file in (path, previous_path(path)):
        problem = checkpoint_problem(file, known)
        if problem is None:
            try:
                return load_checkpoint(file), file, notes + bad
            except ValueError as e:
                problem = f"cannot be loaded ({e})"
        bad.append(f"{file} {problem}")
    raise ValueError(
        f"no usable checkpoint to resume from in {path.parent}:\n  "
        + "\n  ".join(notes + bad)
        + "\nstart a new run in another folder (--out), or remove these files to start afresh in this one"
    )
