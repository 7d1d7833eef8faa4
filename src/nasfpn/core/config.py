"""Configuration dataclasses: model, data and training settings.

A config is plain data. Named presets live in ``core/presets.py``; a user YAML file and
``key=value`` overrides refine them (``apply_overrides``; every entry point resolves its config
with ``presets.resolve_config``). ``read_yaml`` is the one reader of config files. ``config_to_dict`` and
``config_from_dict`` turn a config into JSON-able data and back, so a checkpoint can carry
the exact config it was trained with.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class BackboneConfig:
    depth: int = 50
    """ResNet depth: 10, 18, 34, 50 or 101 (10 is the paper's proxy-search backbone)."""
    frozen_stages: int = 1
    """Stages kept frozen (weights fixed, BN in eval mode): 0 = none, 1 = stem + layer1, ..."""
    norm_eval: bool = False
    """Keep every backbone BN in eval mode while training."""
    pretrained: str | None = None
    """ImageNet weights: "torchvision" (the torchvision ImageNet-1k v1 checkpoint; for ``kind="torchvision"`` the
    model's default weights), a URL or a file in torchvision's state-dict layout. ``kind="timm"``: a URL or a file
    in timm's state-dict layout, or "timm" (timm's own pretrained download from the Hugging Face Hub, online only)."""
    kind: str = "resnet"
    """"resnet" (this package's ResNet, sized by ``depth``), "torchvision" (a torchvision classifier's trunk,
    named by ``name``) or "timm" (a timm model's ``features_only`` trunk, named by ``name``; needs the optional
    ``nasfpn[timm]`` extra); see docs/backbones.md."""
    name: str = ""
    """``kind="torchvision"``: the model, e.g. "mobilenet_v2", "mobilenet_v3_large", "resnext50_32x4d",
    "efficientnet_b0", "regnet_y_400mf"; ``kind="timm"``: a timm model with maps at strides 8, 16 and 32, e.g.
    "mobilenetv3_large_100", "efficientnet_b0", "resnet50", "convnext_atto" (``depth`` is then unused)."""
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    """``kind="resnet"``: channels of layer1..layer4 (a bottleneck's inner width, its output is 4x); the stem
    gives ``widths[0]``. Other than ResNet's own (the default), no ImageNet weights fit: for training from
    scratch, e.g. the demo's (64, 128, 128, 128)."""
    stem: str = "conv7"
    """``kind="resnet"``: "conv7" (ResNet's 7x7 conv of stride 2 and 3x3 max-pool) or "conv3x2" (two 3x3
    convs of stride 2, the first of ``widths[0] // 2`` channels, no max-pool: cheaper on small images)."""


@dataclass(frozen=True)
class NeckConfig:
    kind: str = "nasfpn"
    """"fpn" (the crop-640 FPN: BN convs, P6 from C5, ReLU before P7) or "nasfpn"."""
    channels: int = 256
    stacks: int = 7
    """NAS-FPN: number of stacked pyramid networks."""
    genotype: str = "nasfpn"
    """NAS-FPN: a named genotype ("nasfpn"; "fpn_cells", a top-down FPN written as merging cells, not the
    ``kind="fpn"`` neck) or a genotype string (see models/nasfpn.py)."""
    checkpoint_stacks: bool = False
    """NAS-FPN: recompute each stack in the backward pass (activation checkpointing)."""
    exit_stack: int = 0
    """NAS-FPN anytime detection: inference exits after this many stacks (0 = all of them)."""
    separable: bool = False
    """Depthwise-separable 3x3 convs (NAS-FPNLite's merging cells; FPNLite's output and P6/P7 convs)."""


@dataclass(frozen=True)
class HeadConfig:
    num_classes: int = 80
    stacked_convs: int = 4
    feat_channels: int = 256
    separate_bn: bool = True
    """Shared convs with one BN per level (MMDetection's RetinaSepBNHead); False: plain shared head."""
    prior_prob: float = 0.01
    deep_supervision: bool = False
    """Anytime detection: also run the head on every intermediate NAS-FPN stack while training."""
    separable: bool = False
    """Depthwise-separable 3x3 convs in the towers and the predictors (the mobile "Lite" head)."""


@dataclass(frozen=True)
class AnchorConfig:
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    """Height / width ratios."""


@dataclass(frozen=True)
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cls_weight: float = 1.0
    box_weight: float = 1.0
    pos_iou_thr: float = 0.5
    neg_iou_thr: float = 0.5
    min_pos_iou: float = 0.0
    match_low_quality: bool = True


@dataclass(frozen=True)
class TestConfig:
    score_thr: float = 0.05
    nms_pre: int = 1000
    """(anchor, class) pairs kept per level before NMS."""
    nms_iou: float = 0.5
    max_per_img: int = 100
    min_bbox_size: float = 0.0
    wh_ratio_clip: float = 16 / 1000
    """Box-delta clamp: |dw|, |dh| <= |log(wh_ratio_clip)|."""


@dataclass(frozen=True)
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)


@dataclass(frozen=True)
class DataConfig:
    image_size: int = 640
    """Test: the long side is resized to this (keep ratio)."""
    crop_size: int | None = None
    """Train: the square crop (None: ``image_size``, as in the crop-640 recipe). See ``train_crop``."""
    pad_divisor: int = 128
    """Test-time padding: height and width rounded up to a multiple of this."""
    train_pad_to_size: bool = True
    """Train: pad every image to train_crop x train_crop."""
    scale_range: tuple[float, float] = (0.8, 1.2)
    """Train: random resize of the long side to train_crop * U(lo, hi)."""
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    """RGB mean in 0..255 pixel units."""
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    batch_size: int = 8
    """Images per device."""
    workers: int = 4
    cache_images: bool = False
    """Train: decode each image once and keep it in memory (small datasets: the demo's 4,000
    images of 128 px take 200 MB); every loader process holds its own copy."""
    class_names: tuple[str, ...] = ()
    """Label names; empty means COCO's 80 classes."""
    category_ids: tuple[int, ...] = ()
    """Dataset category id of each label; empty means COCO's ids."""

    @property
    def train_crop(self) -> int:
        """The training crop (and pad) size: ``crop_size``, or ``image_size`` when it is not set."""
        return self.crop_size or self.image_size


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    base_lr: float = 0.08
    base_batch_size: int = 64
    """lr is base_lr * total_batch / base_batch_size."""
    optimizer: str = "sgd"
    """"sgd" (the recipe's) or "adamw" (then ``base_lr`` is AdamW's rate, ~1e-3 scale, and ``weight_decay``
    its decoupled decay)."""
    momentum: float = 0.9
    weight_decay: float = 1e-4
    norm_weight_decay: float = 0.0
    warmup_iters: int = 1000
    warmup_ratio: float = 0.1
    milestones: tuple[int, ...] = (30, 40)
    """Epochs after which lr is multiplied by gamma."""
    gamma: float = 0.1
    lr_decay: str = "step"
    """"step" (x gamma at each milestone, the recipe's) or "cosine" (from the peak to 0 over the
    run, by iteration; milestones and gamma unused)."""
    grad_clip: float = 0.0
    """Max global grad norm; 0 disables clipping."""
    amp: str = "none"
    """Mixed precision: "none", "bf16" or "fp16"."""
    max_bad_steps: int = 20
    """Stop after this many consecutive non-finite losses."""
    eval_interval: int = 1
    """Evaluate every this many epochs (and after the last)."""
    seed: int = 0
    deterministic: bool = False
    channels_last: bool = False
    sync_bn: bool = False
    init_weights: str | None = None
    """Fine-tuning: start from these weights (.safetensors, training checkpoint .pt, MMDetection .pth
    or URL): every tensor whose name and shape fit is loaded (``engine.finetune``); not read on resume."""
    transfer: str = "all"
    """The part of ``init_weights`` to load: "backbone", "neck" (backbone and neck) or "all"."""
    transfer_partial: bool = False
    """Accept ``init_weights`` that fit less than half of the parameters to transfer."""
    freeze: str = ""
    """Freeze parts for the first epochs: "backbone:2", "neck:1" (backbone and neck), comma-separated."""
    ema: float = 0.0
    """EMA decay of the weights (e.g. 0.9998; 0: off); when on, the EMA is evaluated and saved (``engine.ema``)."""
    ema_tau: float = 2000.0
    """EMA warm-up in steps: the decay of update n is ``ema * (1 - exp(-n / ema_tau))``."""
    tensorboard: bool = False
    """Also log losses, lr and evaluation metrics to ``out_dir/tb`` for TensorBoard (needs the
    ``tensorboard`` package: ``pip install 'nasfpn[tensorboard]'``)."""


@dataclass(frozen=True)
class Config:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- conversion


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able nested dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert ``value`` (from JSON/YAML/CLI) to the dataclass field type ``tp``."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} fits none of {tp}: {errors}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        if len(args) != len(value):
            raise ValueError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {tp}")


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where or 'config'}: unknown key(s) {unknown}; valid: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    return _from_dict(Config, data, "")


def merge_dict(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: values of ``update`` win, nested mappings merge."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_dict(out[k], v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"train.epochs=12"`` -> ``{"train": {"epochs": "12"}}`` (typed later by the dataclass)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, value = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ValueError(f"override {text!r} has an empty key")
    import yaml

    parsed: Any = yaml.safe_load(value) if value.strip() else ""
    # Keep strings that YAML would turn into dates etc. as written.
    if not isinstance(parsed, (int, float, bool, list, dict, type(None), str)):
        parsed = value
    out: dict[str, Any] = {parts[-1]: parsed}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (or JSON) config file; an empty file is ``{}``.

    Every problem is a ``ValueError`` naming the file and what is wrong with it."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ValueError(f"config file {path}: does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"config file {path}: cannot be read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path}: not valid YAML: {e}") from e
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {path}: must hold a mapping at top level, not a {type(loaded).__name__}")
    return loaded


def scale_milestones(milestones: tuple[int, ...], epochs: int, new_epochs: int) -> tuple[int, ...]:
    """The lr milestones of an ``epochs``-epoch schedule moved proportionally to ``new_epochs``.

    Each becomes ``round(m * new_epochs / epochs)`` within ``1 .. new_epochs - 1`` (duplicates
    merged); milestones at or past ``epochs``, which never applied, are dropped; a 1-epoch run has
    none. E.g. nasfpn_tiny's 19, 22 of 24 epochs are 48, 55 of 60 and 13, 15 of 16.
    """
    if new_epochs == epochs or epochs <= 0:
        return tuple(milestones)
    if new_epochs <= 1:
        return ()
    scale = new_epochs / epochs
    return tuple(sorted({max(1, min(new_epochs - 1, round(m * scale))) for m in milestones if m < epochs}))


def _milestones_follow_epochs(before: Config, after: Config, given: dict[str, Any]) -> Config:
    """``after`` (``before`` refined by the settings ``given``) with the lr milestones moved with the
    epochs (``scale_milestones``) when ``given`` sets ``train.epochs`` but not ``train.milestones``;
    milestones given explicitly win."""
    train = given.get("train")
    if not isinstance(train, dict) or "epochs" not in train or "milestones" in train:
        return after
    t = after.train
    if t.epochs == before.train.epochs:
        return after
    return dataclasses.replace(
        after,
        train=dataclasses.replace(
            t, milestones=scale_milestones(before.train.milestones, before.train.epochs, t.epochs)
        ),
    )


def config_from_file(path: str | Path, base: Config | None = None) -> Config:
    """``base`` (default: ``Config()``) refined by a YAML/JSON config file; errors name the file.
    A file that sets ``train.epochs`` but not ``train.milestones`` moves the milestones with the epochs."""
    base = base if base is not None else Config()
    update = read_yaml(path)
    data = merge_dict(config_to_dict(base), update)
    try:
        return _milestones_follow_epochs(base, config_from_dict(data), update)
    except ValueError as e:
        raise ValueError(f"config file {path}: {e}") from e


def apply_overrides(cfg: Config, overrides: list[str] | None = None, file: str | Path | None = None) -> Config:
    """Refine ``cfg`` by a YAML/JSON file, then by ``key=value`` overrides. Either that changes
    ``train.epochs`` without naming ``train.milestones`` moves the milestones proportionally
    (``scale_milestones``): ``train.epochs=60`` on a preset of 24 epochs with milestones 19, 22
    gives 48, 55. Every entry point (CLI flags and ``--set``, ``load``, ``resolve_config``) gets
    its config through here."""
    if file is not None:
        cfg = config_from_file(file, cfg)
    data = config_to_dict(cfg)
    given: dict[str, Any] = {}
    for text in overrides or []:
        update = parse_override(text)
        data, given = merge_dict(data, update), merge_dict(given, update)
    return _milestones_follow_epochs(cfg, config_from_dict(data), given)


def config_to_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
