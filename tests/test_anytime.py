"""Anytime detection (paper Sec. 3.2): exit a stacked NAS-FPN after any stack."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nasfpn.core.config import (
    AnchorConfig,
    BackboneConfig,
    Config,
    DataConfig,
    HeadConfig,
    ModelConfig,
    NeckConfig,
    TrainConfig,
)
from nasfpn.core.presets import get_config
from nasfpn.core.weights import load_into_model, read_weights
from nasfpn.engine.data_paths import DataPaths
from nasfpn.engine.evaluate import evaluate_model
from nasfpn.engine.trainer import train
from nasfpn.models import build_model

# Small tensors on a shared 2-core machine: one thread avoids contention.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model_config(stacks: int = 3, exit_stack: int = 0, deep_supervision: bool = False) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(depth=10, frozen_stages=0, pretrained=None),
        neck=NeckConfig(kind="nasfpn", channels=16, stacks=stacks, exit_stack=exit_stack),
        head=HeadConfig(num_classes=2, stacked_convs=1, feat_channels=16, deep_supervision=deep_supervision),
        anchors=AnchorConfig(octave_base_scale=2.0),
    )


def test_exit_stack_runs_only_the_first_stacks():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(stacks=3), pretrained_backbone=False).eval()
    calls = []
    for i, stage in enumerate(model.neck.fpn_stages):
        stage.register_forward_hook(lambda m, inp, out, i=i: calls.append(i))
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        full = model(images)
        assert calls == [0, 1, 2]
        calls.clear()
        early = model(images, stacks=1)
        assert calls == [0]
        per_stack = model.forward_stacks(images)
        model.exit_stack = 1
        calls.clear()
        default_exit = model(images)
        assert calls == [0]
    for a, b, c in zip(early[0], default_exit[0], per_stack[0][0]):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    for a, b in zip(full[0], per_stack[-1][0]):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(early[0][0], full[0][0])


def test_exit_stack_from_the_config():
    cfg = get_config("nasfpn_tiny", ["model.neck.exit_stack=1"])
    model = build_model(cfg.model, pretrained_backbone=False)
    assert model.exit_stack == 1 and model.num_stacks == cfg.model.neck.stacks
    with pytest.raises(ValueError, match=r"exits after 1\.\.3"):
        build_model(tiny_model_config(stacks=3, exit_stack=4), pretrained_backbone=False)
    with pytest.raises(ValueError, match="needs a NAS-FPN"):
        build_model(
            get_config(
                "retinanet_r50_fpn_crop640_50e", ["model.neck.exit_stack=1", "model.backbone.pretrained=null"]
            ).model
        )


def _shapes_dataset(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """Red squares and blue discs, 20-48 px, on grey noise: learnable in a minute on a CPU."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:128, :128]
    images, anns = [], []
    for i in range(n):
        img = rng.integers(60, 120, (128, 128, 3)).astype(np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            s = int(rng.integers(20, 48))
            x, y = int(rng.integers(0, 128 - s)), int(rng.integers(0, 128 - s))
            cat = int(rng.integers(1, 3))
            if cat == 1:
                img[y : y + s, x : x + s] = (230, 40, 40)
            else:
                img[(xx - x - s / 2) ** 2 + (yy - y - s / 2) ** 2 <= (s / 2) ** 2] = (40, 40, 230)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": cat,
                    "iscrowd": 0,
                    "bbox": [x, y, s, s],
                    "area": s * s,
                }
            )
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 128, "height": 128})
    ann = root / "ann.json"
    ann.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}],
            }
        )
    )
    return ann, root / "img"


@pytest.mark.slow  # the default suite must stay short on a slow 2-core CPU
def test_deep_supervision_gives_usable_detections_at_the_first_exit(tmp_path):
    """About 20 s on an idle 2-core CPU (96 images x 8 epochs at 128 px)."""
    train_ann, train_img = _shapes_dataset(tmp_path / "train", 96, 0)
    val_ann, val_img = _shapes_dataset(tmp_path / "val", 24, 1)
    epochs = 8
    cfg = Config(
        name="anytime_tiny",
        model=tiny_model_config(stacks=3, deep_supervision=True),
        data=DataConfig(image_size=128, pad_divisor=128, batch_size=8, workers=0),
        train=TrainConfig(
            epochs=epochs,
            base_lr=0.02,
            base_batch_size=8,
            warmup_iters=10,
            milestones=(epochs - 1,),
            eval_interval=epochs,
        ),
    )
    result = train(
        cfg, DataPaths(train_ann, train_img, val_ann, val_img), tmp_path / "run", quiet=True, check_images=False
    )
    assert result.status == "completed"
    model = build_model(result.config.model, pretrained_backbone=False)
    state, _, kind = read_weights(tmp_path / "run" / "last.safetensors")
    load_into_model(model, state, kind or "state_dict", "last.safetensors")
    ap50 = {}
    for k in (1, 2, 3):
        model.exit_stack = k
        metrics, _ = evaluate_model(model, result.config, val_ann, val_img, "cpu", 8, 0, progress=False)
        ap50[k] = metrics["AP50"]
    # Without deep supervision the head never sees stack 1 in training and its exit finds nothing
    # (AP50 0.00 in the same setting); with it, every exit detects.
    assert ap50[1] > 0.5, ap50
    assert min(ap50.values()) > 0.3, ap50
