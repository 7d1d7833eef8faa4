"""timm models as detection backbones, returning the maps at strides 8, 16, 32.

The trunk is timm's own ``features_only`` model (``timm.create_model(name, features_only=True,
out_indices=...)``, no copied code). Which feature levels are used is read from timm's ``feature_info``:
the last level at each of the strides 8, 16 and 32 (``feature_info.reduction()``), with the channels of
``feature_info.channels()``. Parameter names stay timm's, so a state dict of the timm classifier (timm's own
layout) loads as it is; the layers ``features_only`` drops (classifier, head conv) are skipped.

timm is an optional dependency (``pip install "nasfpn[timm]"``); it is imported only when a timm backbone is
built.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from nasfpn.core.weights import key_list, load_state_dict_file, resolve_source
from nasfpn.models.frozen import StageFreezing

STRIDES = (8, 16, 32)


def import_timm() -> ModuleType:
    """The ``timm`` package, or an ``ImportError`` that says how to install it."""
    try:
        return importlib.import_module("timm")
    except ImportError as e:
        raise ImportError(
            'model.backbone.kind="timm" needs the timm package, which is an optional extra: pip install "nasfpn[timm]"'
        ) from e


def _out_indices(reductions: list[int], name: str) -> tuple[int, ...]:
    """The index of the last feature level at each of ``STRIDES``."""
    last = {r: i for i, r in enumerate(reductions)}  # later levels at the same stride win
    if not set(STRIDES) <= set(last):
        raise ValueError(
            f"timm model {name!r} gives feature maps at strides {sorted(set(reductions))}, not all of "
            f"{list(STRIDES)} (a detection backbone needs strides 8, 16 and 32)"
        )
    return tuple(last[s] for s in STRIDES)


def _units(body: nn.Module) -> list[str]:
    """The body's top-level modules in forward order, a ``Sequential`` (e.g. timm's ``blocks``) split into
    its children, so that freezing can stop inside it."""
    units: list[str] = []
    for name, child in body.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 0:
            units += [f"{name}.{n}" for n, _ in child.named_children()]
        else:
            units.append(name)
    return units


def _unit_strides(body: nn.Module, units: list[str], size: int = 64) -> dict[str, int]:
    """The output stride of each unit that runs on a ``size`` x ``size`` input (units that never run, or
    return no map, are left out)."""
    out: dict[str, int] = {}

    def record(unit: str, y: Any) -> None:
        while isinstance(y, (list, tuple)) and y:
            y = y[0]
        if isinstance(y, torch.Tensor) and y.dim() == 4:
            out[unit] = max(1, round(size / y.shape[-1]))

    hooks = [body.get_submodule(u).register_forward_hook(lambda _m, _i, y, u=u: record(u, y)) for u in units]
    was_training = body.training
    body.eval()
    try:
        with torch.no_grad():
            body(torch.zeros(1, 3, size, size))
    finally:
        body.train(was_training)
        for h in hooks:
            h.remove()
    return out


class TimmBackbone(StageFreezing):
    """A timm model's ``features_only`` trunk. ``forward(x)`` returns ``[C3, C4, C5]`` (strides 8, 16, 32);
    ``out_channels`` (also ``feature_channels``) gives their channel counts.

    ``frozen_stages`` k freezes (no gradient, BN in eval mode) every block up to stride ``2**(k+1)``, as for
    the torchvision trunks; ``norm_eval`` keeps every BN in eval mode while training. ``pretrained``: a local
    file or an http(s) URL holding a state dict in timm's layout, or ``"timm"`` for timm's own pretrained
    weights (which timm downloads from the Hugging Face Hub: not possible offline).
    """

    def __init__(
        self, name: str, frozen_stages: int = 1, norm_eval: bool = False, pretrained: str | Path | None = None
    ) -> None:
        super().__init__()
        timm = import_timm()
        if not timm.is_model(name):
            raise ValueError(
                f"model.backbone.name {name!r} is not a timm model; "
                "e.g. mobilenetv3_large_100, efficientnet_b0, resnet50, regnetx_002, convnext_atto"
            )
        if not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in 0..4, got {frozen_stages}")
        info = _feature_info(timm, name)
        indices = _out_indices(list(info.reduction()), name)
        channels = [info.channels()[i] for i in indices]
        self.return_nodes = tuple(info.module_name()[i] for i in indices)
        source = str(pretrained) if pretrained else ""
        self.body = _create(timm, name, indices, timm_pretrained=source == "timm")
        if source and source != "timm":
            _load_timm_state(self.body, name, source)
        self.name = name
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.out_indices = indices
        self.out_channels = tuple(channels)
        self.feature_channels = list(self.out_channels)
        self.feature_strides = list(STRIDES)
        units = _units(self.body)
        strides = _unit_strides(self.body, units)
        limit = 2 ** (frozen_stages + 1) if frozen_stages else 0
        # A unit that did not run (or gave no map) is frozen with the units before it.
        self._frozen: list[str] = []
        for u in units:
            if strides.get(u, 0) > limit:
                break
            self._frozen.append(u)
        self._freeze()

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.body.get_submodule(u) for u in self._frozen]

    @torch.no_grad()
    def fold_batchnorm(self) -> list[str]:
        """Fold every BN (eval statistics) that directly follows a conv, and whose conv feeds nothing else, into
        that conv, in place, for inference; returns the names of the BN layers left as they are.

        The pairs are found on a torch.fx trace of the trunk (convs and norms kept as leaves, timm's own
        no-trace modules and functions respected); the modules themselves are then swapped, so the trunk keeps
        timm's forward. timm's ``BatchNormAct2d`` becomes its activation (and drop) alone. A BN that cannot be
        folded stays unfused: one before its conv (pre-activation nets), one whose conv output has other users,
        a BN type this function does not know, or every BN of a trunk that torch.fx cannot trace.
        """
        if self.training:
            raise ValueError("fold BN on an eval-mode backbone (BN must use its running statistics)")
        pairs = _conv_bn_pairs(self.body)
        timm = import_timm()
        for conv_name, bn_name in pairs:
            conv, bn = self.body.get_submodule(conv_name), self.body.get_submodule(bn_name)
            self.body.set_submodule(conv_name, fuse_conv_bn_eval(cast(nn.Conv2d, conv), cast(nn.BatchNorm2d, bn)))
            if isinstance(bn, timm.layers.BatchNormAct2d):
                self.body.set_submodule(bn_name, nn.Sequential(bn.drop, bn.act))
            else:
                self.body.set_submodule(bn_name, nn.Identity())
        return [n for n, m in self.body.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def _foldable_bn_types() -> tuple[type[nn.Module], ...]:
    """BN layers whose forward is the BN alone (``nn.BatchNorm2d``) or the BN then drop then activation
    (timm's ``BatchNormAct2d``): exact types, a subclass may change the forward."""
    return (nn.BatchNorm2d, import_timm().layers.BatchNormAct2d)


class _LeafTracer(fx.Tracer):
    """Traces down to convs and norms (kept whole) and to timm's no-trace modules and functions."""

    def __init__(self, notrace_modules: list[type[nn.Module]], notrace_functions: list[Any]) -> None:
        super().__init__(autowrap_functions=tuple(f for f in notrace_functions if callable(f)))
        self._notrace = tuple(notrace_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, *self._notrace)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _conv_bn_pairs(body: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` module names where the BN's only input is the conv's output and nothing else uses it;
    empty when the trunk cannot be traced."""
    layers = import_timm().layers
    tracer = _LeafTracer(layers.get_notrace_modules(), layers.get_notrace_functions())
    try:
        graph = tracer.trace(body)
    except Exception:  # any tracing failure: keep the BN as it is
        return []
    bn_types = _foldable_bn_types()
    modules = dict(body.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(modules[node.target]) not in bn_types or len(node.args) != 1:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or node.kwargs:
            continue
        conv, bn = modules[src.target], modules[node.target]
        # A conv called twice (shared weights) would be folded twice: skip it.
        shared = sum(1 for n in graph.nodes if n.op == "call_module" and n.target == src.target) > 1
        if (
            isinstance(conv, nn.Conv2d)
            and not shared
            and len(src.users) == 1
            and bn.running_mean is not None
            and conv.out_channels == bn.num_features
        ):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _feature_info(timm: ModuleType, name: str) -> Any:
    """timm's ``feature_info`` of every level of ``name``, read from a parameter-free copy on the meta device (no
    memory, no init time) or, for a model whose init does not run there, from a CPU one."""
    try:
        try:
            with torch.device("meta"):
                return timm.create_model(name, pretrained=False, features_only=True).feature_info
        except (NotImplementedError, RuntimeError, ValueError):
            return timm.create_model(name, pretrained=False, features_only=True).feature_info
    except RuntimeError as e:  # timm: "features_only not implemented for ..."
        raise ValueError(f"timm model {name!r} has no features_only trunk: {e}") from e


def _create(timm: ModuleType, name: str, indices: tuple[int, ...], timm_pretrained: bool) -> nn.Module:
    """timm's ``features_only`` model of ``name`` giving the levels ``indices``."""
    if not timm_pretrained:
        return timm.create_model(name, pretrained=False, features_only=True, out_indices=indices)
    try:
        return timm.create_model(name, pretrained=True, features_only=True, out_indices=indices)
    except Exception as e:  # a download or hub failure of any kind
        raise RuntimeError(
            f'model.backbone.pretrained="timm": timm could not fetch its pretrained weights for {name!r} '
            f"({type(e).__name__}: {e}). timm downloads them from the Hugging Face Hub, which needs a network; "
            "offline, fetch the model's weights file elsewhere and set model.backbone.pretrained to its path "
            "(a state dict in timm's layout, .pth or .safetensors); HF_HUB_OFFLINE=1 makes timm fail at once"
        ) from e


def _file_key(key: str, state: dict[str, torch.Tensor]) -> str | None:
    """The key in ``state`` (timm's classifier layout) of the trunk's ``key``: the same, or, where
    ``features_only`` flattened a nested name (``stages_0.blocks...`` for ``stages.0.blocks...``), the nested one."""
    if key in state:
        return key
    head, _, rest = key.partition(".")
    for i, ch in enumerate(head):
        if ch == "_":
            nested = f"{head[:i]}.{head[i + 1 :]}" + (f".{rest}" if rest else "")
            if nested in state:
                return nested
    return None


def _load_timm_state(body: nn.Module, name: str, source: str) -> None:
    """A state dict in timm's layout (the whole classifier's, or the trunk's) into the ``features_only`` body.

    Keys of layers the trunk does not have (classifier, head conv) are skipped; every trunk tensor must be in
    the file, with its shape, and no other key may point into a layer the trunk has (a file of another
    variant fails here)."""
    state = load_state_dict_file(resolve_source(source))
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = body.state_dict()
    found = {k: _file_key(k, state) for k in own}
    missing = [k for k, f in found.items() if f is None]
    wrong = [k for k, f in found.items() if f is not None and state[f].shape != own[k].shape]
    # Each top-level layer of the trunk as the file names it ("stages.0" for "stages_0"), to tell the keys
    # of a layer the trunk has from those of one it dropped.
    prefixes = set()
    for child, _ in body.named_children():
        prefix = child
        for k, f in found.items():
            if f is not None and k.startswith(child + "."):
                prefix = f[: len(f) - len(k) + len(child)]
                break
        prefixes.add(prefix + ".")
    used = set(found.values())
    unexpected = [k for k in state if k not in used and any(k.startswith(p) for p in prefixes)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"weights {source} do not fit timm {name} (a state dict in timm's layout is expected): "
            f"missing {key_list(missing)}, "
            f"unexpected {key_list(unexpected)}, "
            f"wrong shape {key_list(wrong)}"
        )
    body.load_state_dict({k: state[f] for k, f in found.items() if f is not None})
