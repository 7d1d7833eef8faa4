"""MMDetection checkpoint keys <-> nasfpn keys: one rename table, checked one-to-one and total.

Backbone and neck keys are identical. The head differs: RetinaSepBNHead stores each shared
tower conv once per level (``bbox_head.cls_convs.{level}.{i}.conv.weight``, 5 aliases of one
tensor) with a BN per level (``...{level}.{i}.bn.*``); nasfpn stores the conv once
(``head.cls_convs.{i}.weight``) and the BNs as ``head.cls_norms.{level}.{i}.*``.
"""

from __future__ import annotations

import re

import torch

# (MMDetection pattern, nasfpn replacement). First match wins.
RENAMES: list[tuple[str, str]] = [
    # RetinaSepBNHead: shared conv, listed once per level (aliases of level 0).
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(\d+)\.conv\.weight$", r"head.\1_convs.\3.weight"),
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.(\d+)\.bn\.(.+)$", r"head.\1_norms.\2.\3.\4"),
    # Plain RetinaHead: one conv (with bias) per tower layer, no norm.
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)$", r"head.\1_convs.\2.\3"),
    (r"^bbox_head\.(retina_cls|retina_reg)\.(weight|bias)$", r"head.\1.\2"),
    (r"^(backbone|neck)\.(.+)$", r"\1.\2"),
]


def rename_key(key: str) -> str | None:
    """nasfpn name of an MMDetection key, or None if no rule applies."""
    for pattern, repl in RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def is_mmdet_state_dict(state: dict[str, object]) -> bool:
    return any(k.startswith("bbox_head.") for k in state) and any(k.startswith("backbone.") for k in state)


def convert_state_dict(
    mmdet_state: dict[str, torch.Tensor], model_keys: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Rename an MMDetection state dict to nasfpn keys.

    Aliases of a shared conv must hold equal tensors (they are one tensor in MMDetection); the
    result has each once. With ``model_keys``, the mapping must cover them exactly: missing and
    unexpected keys are reported on both sides in MMDetection's and nasfpn's names.
    """
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    unmatched = []
    for key, value in mmdet_state.items():
        new = rename_key(key)
        if new is None:
            unmatched.append(key)
            continue
        if new in out:
            if out[new].shape != value.shape or not torch.equal(out[new], value):
                raise ValueError(
                    f"MMDetection keys {source[new]!r} and {key!r} are aliases of one shared conv "
                    f"({new!r}) but hold different values; the checkpoint is inconsistent"
                )
            continue
        out[new] = value
        source[new] = key
    if model_keys is not None:
        expected = set(model_keys)
        missing = sorted(expected - set(out))
        unexpected = sorted(set(out) - expected)
        if unmatched or missing or unexpected:
            lines = ["the MMDetection checkpoint does not fit this model:"]
            if missing:
                lines.append(f"  missing in the checkpoint ({len(missing)}): {_short(missing)}")
            if unexpected:
                unexpected_src = [source[k] for k in unexpected]
                lines.append(f"  not used by the model ({len(unexpected)}): {_short(unexpected_src)}")
            if unmatched:
                lines.append(f"  no rename rule ({len(unmatched)}): {_short(unmatched)}")
            lines.append("  (is the --model / config the one this checkpoint was trained with?)")
            raise ValueError("\n".join(lines))
    return out


def _short(keys: list[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")
