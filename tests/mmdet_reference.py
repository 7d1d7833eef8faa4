"""The MMDetection parity fixtures: where they live, and the weights they were computed with.

The fixtures (``tests/fixtures/mmdet/``, see its README.md) are MMDetection 3.3 outputs for
checkpoints whose every tensor is a pure function of its key name, shape, dtype and a seed string
(rule ``uniform-v1``). This module rebuilds those checkpoints from the key lists
(``mmdet_keys_<short>.json``) and computes the digest that the fixtures record, so the tests can
prove they start from exactly the weights MMDetection ran on.

Rule ``uniform-v1``, for every key ``k`` visited in sorted order:

- a ``torch.Generator`` seeded with ``zlib.crc32((seed + k).encode("utf-8"))`` draws
  ``torch.rand(shape, dtype=float64)``, mapped to ``[lo, hi)`` in float64 and cast once;
- integer tensors and ``*num_batches_tracked`` are zeros (no draw);
- ``*running_mean`` in [-0.2, 0.2), ``*running_var`` in [0.5, 1.5);
- ``*weight`` with two or more dims in [-b, b), ``b = sqrt(G / fan_in)``,
  ``fan_in = numel // shape[0]``, ``G = 6`` under ``bbox_head.`` and 3 elsewhere;
- other ``*weight`` (norm layers) in [0.7, 1.1); everything else (biases) in [-0.2, 0.2);
- the keys of a tied group (one tensor saved under several names) all take the value of the
  group's first key in sorted order.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "mmdet"
RULE = "uniform-v1"
SEED = "public"
MODELS = ("r50_fpn", "r50_nasfpn")

_MARKER = "detections_r50_fpn.json"
_HEAD_PREFIX = "bbox_head."
_RANGES = {"running_mean": (-0.2, 0.2), "running_var": (0.5, 1.5)}
_NORM_WEIGHT = (0.7, 1.1)
_OTHER = (-0.2, 0.2)


def reference_root() -> Path | None:
    """The fixture folder: the vendored copy, else ``$NASFPN_SHARED/reference`` or ``../shared/reference``.

    Returns ``None`` when none of them holds the fixtures.
    """
    shared = Path(os.environ.get("NASFPN_SHARED", ROOT.parent / "shared"))
    for folder in (FIXTURES, shared / "reference"):
        if (folder / _MARKER).is_file():
            return folder
    return None


def _bounds(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """The uniform range of one floating-point key."""
    for suffix, bounds in _RANGES.items():
        if key.endswith(suffix):
            return bounds
    if key.endswith("weight"):
        if len(shape) < 2:
            return _NORM_WEIGHT
        gain = 6.0 if key.startswith(_HEAD_PREFIX) else 3.0
        bound = math.sqrt(gain / (math.prod(shape) // shape[0]))
        return -bound, bound
    return _OTHER


def rule_value(key: str, shape: Iterable[int], dtype: torch.dtype, seed: str = SEED) -> torch.Tensor:
    """The value rule ``uniform-v1`` gives one key (ties are the caller's business)."""
    shape = tuple(int(n) for n in shape)
    if not dtype.is_floating_point or key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    lo, hi = _bounds(key, shape)
    gen = torch.Generator().manual_seed(zlib.crc32((seed + key).encode("utf-8")))
    draw = torch.rand(shape, generator=gen, dtype=torch.float64)
    return (lo + (hi - lo) * draw).to(dtype)


def _representatives(keys: Iterable[str], tied: Iterable[Iterable[str]]) -> dict[str, str]:
    """Each key -> the first key (in sorted order) of its tied group; overlapping groups merge."""
    rep = {k: k for k in keys}

    def root(k: str) -> str:
        while rep[k] != k:
            k = rep[k]
        return k

    for group in tied:
        members = [k for k in group if k in rep]
        for other in members[1:]:
            a, b = root(members[0]), root(other)
            if a != b:
                rep[max(a, b)] = min(a, b)
    return {k: root(k) for k in rep}


def fill(
    state: Mapping[str, torch.Tensor], seed: str = SEED, tied: Iterable[Iterable[str]] = ()
) -> OrderedDict[str, torch.Tensor]:
    """A new state dict (same key order) filled by rule ``uniform-v1``.

    Only the shapes and dtypes of ``state`` are read. The keys of one tied group map to one tensor
    object, as in MMDetection's own checkpoints.
    """
    reps = _representatives(state, tied)
    values: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        rep = reps[key]
        if rep not in values:  # a group's first key in sorted order is visited first
            values[rep] = rule_value(rep, state[rep].shape, state[rep].dtype, seed)
        values[key] = values[rep]
    return OrderedDict((k, values[k]) for k in state)


def read_keys(path: str | Path) -> tuple[OrderedDict[str, torch.Tensor], list[list[str]]]:
    """An ``mmdet_keys_<short>.json`` file -> (name -> empty tensor in file order, tied groups)."""
    spec = json.loads(Path(path).read_text())
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for item in spec["keys"]:
        dtype = getattr(torch, item.get("dtype", "float32"))
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{item['name']}: unknown dtype {item['dtype']!r}")
        state[item["name"]] = torch.empty([int(n) for n in item["shape"]], dtype=dtype)
    return state, [list(group) for group in spec.get("tied_groups", [])]


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each key's UTF-8 name followed by its tensor's contiguous little-endian bytes."""
    digest = hashlib.sha256()
    for key, tensor in state.items():
        array = tensor.detach().cpu().contiguous().numpy()
        digest.update(key.encode("utf-8"))
        digest.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


def filled_state_dict(short: str, root: Path, seed: str = SEED) -> OrderedDict[str, torch.Tensor]:
    """The reference checkpoint (MMDetection key names) of model ``short`` (``r50_fpn``, ``r50_nasfpn``)."""
    state, tied = read_keys(root / f"mmdet_keys_{short}.json")
    return fill(state, seed, tied)


def to_mmdet_keys(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Our keys -> MMDetection's, with the shared head conv listed once per level (as mmdet saves it)."""
    out: OrderedDict[str, Any] = OrderedDict()
    for k, v in state.items():
        if k.startswith("head.") and "_norms." in k:
            branch, level, i, rest = k.split(".", 4)[1:]
            out[f"bbox_head.{branch.replace('norms', 'convs')}.{level}.{i}.bn.{rest}"] = v
        elif k.startswith("head.") and "_convs." in k:
            branch, i, _ = k.split(".")[1:]
            for n in range(5):
                out[f"bbox_head.{branch}.{n}.{i}.conv.weight"] = v
        else:
            out[k.replace("head.", "bbox_head.", 1)] = v
    return out
