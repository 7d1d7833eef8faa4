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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nasfpn.core.config import Config, config_from_dict, config_to_dict
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
    return _from_pickled(torch_load_safe(path), path)


def _from_pickled(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """``read_weights`` of a loaded ``.pth`` / ``.pt`` object."""
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


def _carried_config(info: dict[str, Any], config: Any) -> None:
    """The name and classes of a carried config dict, into ``info``."""
    if not isinstance(config, dict):
        return
    head = config.get("model", {}).get("head", {}) if isinstance(config.get("model"), dict) else {}
    data = config.get("data", {}) if isinstance(config.get("data"), dict) else {}
    info["config"] = config.get("name")
    info["num_classes"] = head.get("num_classes") if isinstance(head, dict) else None
    info["class_names"] = list(data.get("class_names") or [])
    info["category_ids"] = list(data.get("category_ids") or [])


def _plain(value: Any) -> Any:
    """JSON-able numbers of a checkpoint's metadata (tensors and numpy scalars become floats)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (torch.Tensor, np.generic, np.ndarray)) and np.asarray(value).size == 1:
        return np.asarray(value).item()
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def weights_info(source: str | Path) -> dict[str, Any]:
    """What a weights file carries besides its tensors, for ``nasfpn info --weights``.

    ``kind`` (as ``read_weights``), ``tensors`` and ``values``; with a carried config its ``config``
    name, ``num_classes``, ``class_names``, ``category_ids``; and the training state where the file
    stores one: ``epoch``, ``step`` and ``best`` metrics (our training checkpoints, MMDetection's
    ``meta``, or ``epoch`` / ``step`` / ``metrics`` entries of a safetensors file's metadata).
    A safetensors file is read from its header only.
    """
    path = resolve_source(source)
    info: dict[str, Any] = {"file": str(source)}
    if _is_safetensors(path):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                shapes = [f.get_slice(k).get_shape() for k in f.keys()]  # noqa: SIM118  (not iterable)
        except Exception as e:
            raise WeightsError(f"{path} is not a valid safetensors file: {e}") from e
        info.update(kind="nasfpn", tensors=len(shapes), values=int(sum(np.prod(s) for s in shapes)))
        if "config" in meta:
            _carried_config(info, json.loads(meta["config"]))
        for key in ("epoch", "step", "metrics"):
            if key in meta:
                try:
                    info[key] = json.loads(meta[key])
                except ValueError:
                    info[key] = meta[key]
        return info
    obj = torch_load_safe(path)
    state, config, kind = _from_pickled(obj, path)
    info.update(kind=kind, tensors=len(state), values=sum(t.numel() for t in state.values()))
    _carried_config(info, config)
    if kind == "checkpoint":
        for key in ("epoch", "step"):
            if key in obj:
                info[key] = _plain(obj[key])
        if obj.get("best"):
            info["best"] = _plain(obj["best"])
    elif kind == "mmdet":
        meta = obj.get("meta") or {}
        for key in ("epoch", "iter"):
            if isinstance(meta, dict) and key in meta:
                info["step" if key == "iter" else key] = _plain(meta[key])
    return info


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A bare state dict from a ``.pth``/``.safetensors`` file (e.g. ImageNet backbone weights)."""
    state, _, _ = read_weights(path)
    return state


def _leaves(data: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(_leaves(v, f"{prefix}.{k}"))
    return out


def config_difference(config: Config, file_config: dict[str, Any]) -> list[str]:
    """The model settings (not test-time or loss ones) in which ``config`` differs from the config a
    weights file carries: ``["model.backbone.depth 50 (file: 10)", ...]``."""
    try:
        theirs = config_to_dict(config_from_dict(file_config))["model"]
    except (TypeError, ValueError):
        theirs = file_config.get("model", {})
    ours = config_to_dict(config)["model"]
    mine, other = _leaves(ours, "model"), _leaves(theirs, "model")
    skip = ("model.test.", "model.loss.")
    return [
        f"{k} {mine[k]} (file: {other[k]})"
        for k in mine
        if k in other and mine[k] != other[k] and not k.startswith(skip)
    ]


def adopt_file_classes(config: Config, file_config: dict[str, Any] | None) -> Config:
    """``config`` with the classes a weights file names (``model.head.num_classes``,
    ``data.class_names``, ``data.category_ids``): weights trained on another dataset (e.g. 1 class
    under a preset of 80) load under the preset and predict the file's classes."""
    if not file_config:
        return config
    head = file_config.get("model", {}).get("head", {})
    data = file_config.get("data", {})
    if not isinstance(head, dict) or not isinstance(data, dict) or not isinstance(head.get("num_classes"), int):
        return config
    num_classes = head["num_classes"]
    names = tuple(data.get("class_names") or ())
    ids = tuple(data.get("category_ids") or ())
    if (num_classes, names, ids) == (config.model.head.num_classes, config.data.class_names, config.data.category_ids):
        return config
    return replace(
        config,
        model=replace(config.model, head=replace(config.model.head, num_classes=num_classes)),
        data=replace(config.data, class_names=names, category_ids=ids),
    )


def load_into_model(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    kind: str,
    source: str = "",
    config: Config | None = None,
    file_config: dict[str, Any] | None = None,
) -> None:
    """Load ``state`` (of ``kind`` as returned by ``read_weights``) strictly, with a clear report on mismatch.

    Given the ``config`` the model was built from and the ``file_config`` the file carries, the
    report names the config the file was made for and how the two differ."""
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
        if config is not None and file_config is not None:
            made_for = file_config.get("name", "?")
            diff = config_difference(config, file_config)
            differ = f" in {_short(diff, 8)}" if diff else ""
            if made_for == config.name:  # the file's own config, refined by overrides
                lines = [
                    f"weights {source} do not fit their own config {made_for!r} as refined here (it differs{differ}):"
                ]
            else:
                lines = [
                    f"weights {source} were made for config {made_for!r}, not {config.name!r} (it differs{differ}). "
                    f"Name the model as '-' (e.g. `nasfpn eval - --weights {source}`; None in Python) to use the "
                    "config the file carries. In detail:"
                ]
        if missing:
            lines.append(f"  missing ({len(missing)}): {_short(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {_short(unexpected)}")
        if misshaped:
            lines.append(f"  wrong shape ({len(misshaped)}): {_short(misshaped)}")
        raise WeightsError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def key_list(keys: list[str], limit: int = 8) -> str:
    """The first ``limit`` state-dict keys of ``keys`` as a list, "..." after it when there are more:
    the form every weights-do-not-fit error names its missing / unexpected keys in."""
    return f"{keys[:limit]}{'...' if len(keys) > limit else ''}"
