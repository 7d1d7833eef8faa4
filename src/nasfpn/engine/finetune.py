"""Fine-tuning: start a training run from the weights of another detector, and freeze parts of it
for its first epochs.

``train.init_weights`` (``nasfpn train MODEL --weights W``) names the weights: our
``.safetensors``, a training checkpoint ``.pt``, an MMDetection ``.pth`` (renamed as
``core.mmdet`` does) or an http(s) URL to one of these. After the model is built for the new
dataset's classes, ``transfer_weights`` loads every tensor of the file whose name and shape fit:

- the class-dependent layer (``head.retina_cls``, the last conv of the classification tower) is
  kept only when the file's class set is the new one (the same names in the same order); else it
  stays as built, i.e. initialised exactly as at the start of any training (focal-loss prior
  bias, same seed);
- ``train.transfer`` limits the transfer to the backbone ("backbone"), backbone and neck
  ("neck") or takes every part ("all", the default); the other parts stay as built;
- a file that fits less than half of the parameters to transfer (the class layer aside when the
  class set differs) is refused, unless ``train.transfer_partial``: it is most likely the weights
  of another architecture.

A table of what was loaded, re-initialised, new (in the model, not in the file) and unused (in
the file, not in the model) is printed. A resumed run takes its weights from its checkpoint and
does not read ``init_weights`` again.

``train.freeze`` ("backbone:2", "neck:1", or both, comma-separated) freezes a part for its first
epochs: its parameters get no gradient (``requires_grad`` False, so SGD leaves them and their
momentum alone) and its BatchNorm layers run in eval mode; then it trains with the rest, in the
same run. "neck" means backbone and neck, as for ``train.transfer``. The optimizer is built with
every parameter, so its state has the same layout whatever is frozen, and the frozen parts are a
function of the epoch: a resumed run freezes exactly as the uninterrupted one. Stages that the
model config keeps frozen (``model.backbone.frozen_stages``) stay frozen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nasfpn.core.classes import label_names
from nasfpn.core.config import Config, TrainConfig
from nasfpn.core.mmdet import convert_state_dict, rename_key
from nasfpn.core.weights import WeightsError, read_weights, resolve_source, torch_load_safe

TRANSFER_SCOPES: dict[str, tuple[str, ...]] = {
    "backbone": ("backbone.",),
    "neck": ("backbone.", "neck."),
    "all": ("",),
}
"""``train.transfer`` -> the key prefixes that are loaded from ``train.init_weights``."""

FREEZE_PARTS: dict[str, tuple[str, ...]] = {"backbone": ("backbone.",), "neck": ("backbone.", "neck.")}
"""``train.freeze`` parts -> the key prefixes they freeze."""

CLASS_KEYS: tuple[str, ...] = (
    "head.retina_cls.weight",
    "head.retina_cls.bias",
    "head.retina_cls.pointwise.weight",  # a separable classifier: its depthwise part has no class channels
    "head.retina_cls.pointwise.bias",
)
"""The tensors whose meaning depends on the class set: one output channel per (anchor, class)."""

_KINDS = {
    "nasfpn": "nasfpn weights",
    "checkpoint": "training checkpoint",
    "mmdet": "MMDetection checkpoint",
    "state_dict": "state dict",
}

MIN_FIT = 0.5
"""Refuse weights that fit less than this share of the parameters to transfer."""

_FREEZE_HELP = (
    "expected PART:EPOCHS, comma-separated, with PART backbone or neck (backbone and neck) and EPOCHS >= 1, "
    "e.g. backbone:2"
)


# --------------------------------------------------------------------------- settings
def parse_freeze(text: str) -> tuple[tuple[str, int], ...]:
    """``"backbone:2,neck:1"`` -> ``(("backbone", 2), ("neck", 1))``; ``ValueError`` naming the setting."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        part, sep, epochs = item.partition(":")
        part = part.strip()
        if not sep or part not in FREEZE_PARTS or not epochs.strip().isdigit() or int(epochs) < 1:
            raise ValueError(f"train.freeze={text!r}: {item!r} is not valid; {_FREEZE_HELP}")
        out.append((part, int(epochs)))
    return tuple(out)


def check_settings(t: TrainConfig) -> None:
    """``ValueError`` for fine-tuning / EMA settings that cannot work (before any data is read)."""
    if t.transfer not in TRANSFER_SCOPES:
        raise ValueError(f"train.transfer={t.transfer!r}: use one of {', '.join(TRANSFER_SCOPES)}")
    parse_freeze(t.freeze)
    if t.ema != 0 and not 0 < t.ema < 1:
        raise ValueError(f"train.ema={t.ema}: the EMA decay must lie in (0, 1), e.g. 0.9998 (0 turns EMA off)")
    if t.ema_tau < 0:
        raise ValueError(f"train.ema_tau={t.ema_tau}: the EMA warm-up must be >= 0 steps (0: no warm-up)")


# --------------------------------------------------------------------------- transfer
@dataclass
class TransferReport:
    """What ``transfer_weights`` did, key by key (model keys unless said otherwise)."""

    source: str
    kind: str
    """As ``core.weights.read_weights`` says: "nasfpn", "checkpoint", "mmdet" or "state_dict"."""
    scope: str
    file_classes: tuple[str, ...] | None
    """The file's class names (None: the file does not say)."""
    model_classes: tuple[str, ...]
    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, str] = field(default_factory=dict)
    """Key -> why it was not loaded (class set, shape)."""
    new: list[str] = field(default_factory=list)
    """In the part to transfer, not in the file."""
    unused: list[str] = field(default_factory=list)
    """In the file (its own names), not in the model."""
    kept: list[str] = field(default_factory=list)
    """Outside the part to transfer (``train.transfer``): as built."""
    numel: dict[str, int] = field(default_factory=dict)
    """Parameter count of each model key (0 for buffers)."""

    @property
    def same_classes(self) -> bool:
        return self.file_classes == self.model_classes

    def params(self, keys: Iterable[str]) -> int:
        return sum(self.numel.get(k, 0) for k in keys)

    @property
    def fraction(self) -> float:
        """Share of the parameters to transfer that the file provided (the class layer aside when
        the class set differs, since it is not meant to be loaded then)."""
        expected = set(self.loaded) | set(self.new) | set(self.reinitialised)
        if not self.same_classes:
            expected -= set(CLASS_KEYS)
        total = self.params(expected)
        return self.params(self.loaded) / total if total else 1.0

    def table(self) -> str:
        """A few lines: counts of tensors and parameters of each kind, and their main modules."""
        file_classes = f"{len(self.file_classes)} classes" if self.file_classes is not None else "classes not recorded"
        lines = [
            f"fine-tuning from {self.source} ({_KINDS.get(self.kind, self.kind)}, {file_classes}) for "
            f"{len(self.model_classes)} classes, transfer {self.scope}:",
            f"  {'':26}{'tensors':>8}{'parameters':>13}  modules",
        ]
        reasons = Counter(self.reinitialised.values())
        rows = [
            ("loaded", self.loaded, _modules(self.loaded)),
            (
                "re-initialised",
                list(self.reinitialised),
                "; ".join(
                    f"{_modules([k for k, r in self.reinitialised.items() if r == reason])} ({reason})"
                    for reason in reasons
                ),
            ),
            ("new (not in the file)", self.new, _modules(self.new)),
            ("unused (not in the model)", self.unused, _modules(self.unused)),
        ]
        if self.kept:
            rows.append(("kept as built", self.kept, _modules(self.kept)))
        for name, keys, modules in rows:
            params = f"{self.params(keys):,}" if name != "unused (not in the model)" else "-"
            lines.append(f"  {name:26}{len(keys):>8}{params:>13}  {modules or '-'}")
        lines.append(f"  loaded {100 * self.fraction:.1f}% of the parameters to transfer")
        return "\n".join(lines)


def _modules(keys: list[str], limit: int = 4) -> str:
    """The main module names of ``keys``: the modules themselves when few, else the top-level
    modules with their tensor counts."""
    modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in keys))
    if len(modules) <= limit:
        return ", ".join(modules)
    top = Counter(k.split(".", 1)[0] for k in keys)  # in model order
    return ", ".join(f"{name} ({n})" for name, n in list(top.items())[:limit]) + (", ..." if len(top) > limit else "")


def file_classes(source: str, kind: str, config: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The class names of a weights file, in label order: from our config, from MMDetection's
    ``meta`` (``dataset_meta.classes`` or ``CLASSES``), else None."""
    if config is not None:
        try:
            return label_names(int(config["model"]["head"]["num_classes"]), config["data"].get("class_names", ()))
        except (KeyError, TypeError, ValueError):
            return None
    if kind == "mmdet":
        obj = torch_load_safe(resolve_source(source))
        meta = obj.get("meta") if isinstance(obj, dict) else None
        if isinstance(meta, dict):
            names = (meta.get("dataset_meta") or {}).get("classes") or meta.get("CLASSES")
            if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
                return tuple(names)
    return None


def plan_transfer(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    scope: str,
    model_classes: tuple[str, ...],
    classes: tuple[str, ...] | None,
    source: str = "",
    kind: str = "state_dict",
    unmatched: list[str] | None = None,
) -> TransferReport:
    """Which tensors of ``state`` (in nasfpn names) go into ``model``: nothing is changed."""
    prefixes = TRANSFER_SCOPES[scope]
    expected = model.state_dict()
    numel = {name: p.numel() for name, p in model.named_parameters(remove_duplicate=False)}
    report = TransferReport(source, kind, scope, classes, model_classes, numel={k: numel.get(k, 0) for k in expected})
    for key, value in expected.items():
        if not key.startswith(prefixes):
            report.kept.append(key)
        elif key not in state:
            report.new.append(key)
        elif key in CLASS_KEYS and not report.same_classes:
            report.reinitialised[key] = (
                "class names not recorded in the file"
                if classes is None
                else f"{len(classes)} -> {len(model_classes)} classes"
                if len(classes) != len(model_classes)
                else "other class names or order"
            )
        elif tuple(state[key].shape) != tuple(value.shape):
            report.reinitialised[key] = "shape differs"
        else:
            report.loaded.append(key)
    report.unused = [k for k in state if k not in expected and k.startswith(prefixes)]
    if scope == "all":
        report.unused += list(unmatched or [])
    return report


def transfer_weights(
    model: nn.Module,
    cfg: Config,
    log: Callable[[str], None] = print,
    source: str | None = None,
    scope: str | None = None,
) -> TransferReport:
    """Load the fitting tensors of ``source`` (default ``cfg.train.init_weights``) into ``model``
    (built from ``cfg``, whose ``data.class_names`` are the new dataset's), print the table
    through ``log`` and return the report. ``WeightsError`` (a ``ValueError``) for a file that
    fits less than ``MIN_FIT`` of the parameters to transfer, unless ``cfg.train.transfer_partial``."""
    t = cfg.train
    source = source if source is not None else t.init_weights
    if not source:
        raise ValueError("no weights to fine-tune from (train.init_weights / --weights)")
    scope = scope or t.transfer
    if scope not in TRANSFER_SCOPES:
        raise ValueError(f"train.transfer={scope!r}: use one of {', '.join(TRANSFER_SCOPES)}")
    state, config, kind = read_weights(source)
    unmatched: list[str] = []
    if kind == "mmdet":
        unmatched = [k for k in state if rename_key(k) is None]
        state = convert_state_dict(state)
    model_classes = label_names(cfg.model.head.num_classes, cfg.data.class_names)
    report = plan_transfer(
        model, state, scope, model_classes, file_classes(str(source), kind, config), str(source), kind, unmatched
    )
    table = report.table()
    if report.fraction < MIN_FIT and not t.transfer_partial:
        hint = f" (the file's config is {config.get('name')!r})" if config and config.get("name") else ""
        raise WeightsError(
            f"{table}\n{source} fits only {100 * report.fraction:.1f}% of the parameters to transfer, less than "
            f"{100 * MIN_FIT:.0f}%: is the model config the one these weights were trained with{hint}? To "
            "fine-tune anyway, with the rest as built, pass --weights-partial (train.transfer_partial=true)"
        )
    target = model.state_dict()  # tensors that share storage with the model's
    with torch.no_grad():
        for key in report.loaded:
            target[key].copy_(state[key])
    log(table)
    return report


# --------------------------------------------------------------------------- freezing
class Freezer:
    """Freezes the parts named by ``train.freeze`` for their first epochs (``apply`` each epoch)."""

    def __init__(self, model: nn.Module, spec: str) -> None:
        self.model = model
        self.stages = parse_freeze(spec)
        # Only what trains now: stages frozen by the model config stay frozen when a part thaws.
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.current: tuple[str, ...] | None = None

    def prefixes(self, epoch: int) -> tuple[str, ...]:
        """The key prefixes frozen during ``epoch`` (0-based)."""
        out: list[str] = []
        for part, epochs in self.stages:
            if epoch < epochs:
                out += [p for p in FREEZE_PARTS[part] if p not in out]
        return tuple(sorted(out))

    def apply(self, epoch: int, log: Callable[[str], None] | None = None) -> bool:
        """Set gradients and BatchNorm modes for ``epoch``; call it after ``model.train()``.
        Returns True when the set of trainable parameters changed."""
        prefixes = self.prefixes(epoch)
        for name, p in self.params:
            p.requires_grad_(not name.startswith(prefixes))
        if prefixes:
            for name, m in self.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{name}.".startswith(prefixes):
                    m.eval()
        changed = prefixes != self.current
        if changed and log is not None and (prefixes or self.current):
            log(f"epoch {epoch + 1}: " + (self._describe(prefixes) if prefixes else "every part trains"))
        self.current = prefixes
        return changed

    def _describe(self, prefixes: tuple[str, ...]) -> str:
        until = {p: max(n for part, n in self.stages if p in FREEZE_PARTS[part]) for p in prefixes}
        return (
            ", ".join(f"{p.rstrip('.')} frozen through epoch {n}" for p, n in until.items())
            + " (no gradient, BatchNorm in eval mode)"
        )
