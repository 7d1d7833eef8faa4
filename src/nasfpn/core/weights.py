"""Reading and writing weights: our safetensors format, MMDetection ``.pth`` files, URLs.

Loading never runs pickled code: ``.pth`` files go through ``torch.load(weights_only=True)``
(tensors, containers and plain values only; numpy arrays and scalars are also allowed since
older checkpoints carry them in their metadata). Anything else is refused with the names of
the objects the file wanted to build.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickletools
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nasfpn.core.fileio import atomic_path
from nasfpn.core.mmdet import _short, convert_state_dict, is_mmdet_state_dict

try:
    from numpy._core import multiarray  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray  # type: ignore[no-redef]  # the same module before numpy 2

FORMAT_NAME = "nasfpn"
FORMAT_VERSION = "1"


class WeightsError(ValueError):
    """A weights file that cannot be used, with the reason."""


def cache_dir() -> Path:
    return Path(os.environ.get("NASFPN_CACHE", Path.home() / ".cache" / "nasfpn"))


def resolve_source(source: str | Path) -> Path:
    """A local path for ``source``: an existing file, or an http(s) URL downloaded once to the cache."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        name = Path(urllib.parse.urlparse(text).path).name or "weights"
        digest = hashlib.sha256(text.encode()).hexdigest()[:12]
        target = cache_dir() / f"{digest}-{name}"
        if not target.is_file():
            try:
                with atomic_path(target) as tmp:
                    torch.hub.download_url_to_file(text, str(tmp), progress=True)
            except Exception as e:  # network errors come in many types
                raise WeightsError(f"cannot download {text}: {e}; download it by hand and pass the local file") from e
        return target
    path = Path(text).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    return path


def _numpy_safe_globals() -> list[Any]:
    allowed: list[Any] = [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int64", "int32", "bool", "uint8")]
    return allowed


def _unsafe_globals(path: Path) -> list[str]:
    """Names of the Python objects a pickle-based file would import (beyond the allowed ones)."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        pass
    # A legacy (non-zip) pickle: list the globals it imports without executing anything.
    found, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name == "GLOBAL":
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:
        return found
    safe_prefixes = ("torch.", "collections.OrderedDict", "numpy.", "_codecs.encode", "builtins.set")
    return [g for g in found if not g.startswith(safe_prefixes)]


def torch_load_safe(path: Path) -> Any:
    """``torch.load`` that only builds tensors, containers, plain values and numpy arrays."""
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = _unsafe_globals(path)
        if unsafe:
            raise WeightsError(
                f"refusing to load {path}: it is a pickle that would construct or call {', '.join(unsafe[:8])}; "
                "only tensors, containers and plain values are accepted (a checkpoint never needs code)"
            ) from e
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint or safetensors file: {e}") from e


def save_safetensors(
    state: dict[str, torch.Tensor],
    path: str | Path,
    config: dict[str, Any] | None = None,
    extra: dict[str, str] | None = None,
) -> None:
    """Write weights (+ the resolved config as JSON metadata) atomically: temp file, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    if config is not None:
        meta["config"] = json.dumps(config)
    meta.update(extra or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def read_weights(source: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """Read any supported weights file.

    Returns ``(state_dict, config_dict_or_None, kind)``; kind is "nasfpn" (our safetensors),
    "checkpoint" (our training checkpoint), "mmdet" (MMDetection, keys not yet converted) or
    "state_dict" (a bare state dict in nasfpn names).
    """
    path = resolve_source(source)
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (a safe_open handle is not iterable)
        except Exception as e:
            raise WeightsError(f"{path} is not a valid safetensors file: {e}") from e
        config = json.loads(meta["config"]) if "config" in meta else None
        return state, config, "nasfpn"
    obj = torch_load_safe(path)
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    if "model" in obj and "config" in obj and isinstance(obj.get("model"), dict):
        return obj["model"], obj["config"], "checkpoint"
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} has no state_dict of tensors (top-level keys: {list(obj)[:8]})")
    if is_mmdet_state_dict(state):
        return state, None, "mmdet"
    return state, None, "state_dict"


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A bare state dict from a ``.pth``/``.safetensors`` file (e.g. ImageNet backbone weights)."""
    state, _, _ = read_weights(path)
    return state


def load_into_model(model: torch.nn.Module, state: dict[str, torch.Tensor], kind: str, source: str = "") -> None:
    """Load ``state`` (of ``kind`` as returned by ``read_weights``) strictly, with a clear report on mismatch."""
    expected = model.state_dict()
    if kind == "mmdet":
        state = convert_state_dict(state, list(expected))
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if missing or unexpected or misshaped:
        lines = [f"weights {source} do not fit the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_short(unexpected)}")
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): {_short(misshaped)}")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)
