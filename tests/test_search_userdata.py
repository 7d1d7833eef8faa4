"""A search on a user's dataset: the held-out split rewards, the validation set is used once at the end;
a tiny end-to-end multi-fidelity search; the command line."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from nasfpn.cli import _cost_options, build_parser, main
from nasfpn.data.synthetic import generate_dataset
from nasfpn.search import proxy as proxy_module
from nasfpn.search.cost import CostModel
from nasfpn.search.data import dataset_split
from nasfpn.search.log import LOG_NAME, read_log, rung_results
from nasfpn.search.proxy import ProxySettings, prepare_proxy_task
from nasfpn.search.runner import search
from nasfpn.search.spec import SearchSpec, evaluator_spec


def _ids(path: Path) -> set[int]:
    return {int(img["id"]) for img in json.loads(Path(path).read_text())["images"]}


def test_holdout_split_is_deterministic_disjoint_and_leaves_the_validation_set_alone(tmp_path):
    ds = generate_dataset(tmp_path / "user", num_train=20, num_val=6, image_size=64, seed=0)
    val_before = Path(ds.val_annotations).read_bytes()

    def split(work, seed):
        return prepare_proxy_task(
            work,
            ProxySettings(),
            train_ann=ds.train_annotations,
            train_images=ds.train_images,
            held_out=0.25,
            split_seed=seed,
        )

    a, b, c = split(tmp_path / "a", 0), split(tmp_path / "b", 0), split(tmp_path / "c", 1)
    assert Path(a.train_ann).read_text() == Path(b.train_ann).read_text()  # same seed, same split
    assert Path(a.heldout_ann).read_text() == Path(b.heldout_ann).read_text()
    train, held = _ids(a.train_ann), _ids(a.heldout_ann)
    assert len(held) == 5 and not train & held and train | held == _ids(ds.train_annotations)
    assert _ids(c.heldout_ann) != held  # another seed, another split
    assert str(Path(ds.val_annotations).resolve()) not in (a.train_ann, a.heldout_ann)
    assert Path(ds.val_annotations).read_bytes() == val_before


def test_the_validation_set_is_evaluated_only_after_the_search(tmp_path, monkeypatch):
    ds = generate_dataset(tmp_path / "user", num_train=20, num_val=6, image_size=64, seed=0)
    calls = []

    def fake_train(cfg, data, out_dir, resume, device, quiet, check_images, max_steps):
        calls.append(data.val_ann)
        ap = 0.01 * (len(calls) % 7) + (0.5 if data.val_ann == str(ds.val_annotations) else 0.0)
        return SimpleNamespace(status="completed", message="", last_metrics={"AP": ap}, wall_time=0.0, steps=max_steps)

    monkeypatch.setattr(proxy_module, "train", fake_train)
    monkeypatch.setattr(proxy_module, "count_flops", lambda model, size: 0)
    settings = ProxySettings(image_size=128, width=16, head_convs=1, batch_size=4, max_steps=9)
    task = prepare_proxy_task(
        tmp_path / "search", settings, train_ann=ds.train_annotations, train_images=ds.train_images, held_out=0.25
    )
    spec = SearchSpec(
        controller="random",
        trials=6,
        evaluator=evaluator_spec(task),
        scheduler="asha",
        min_steps=1,
        max_steps=9,
        eta=3,
        final={"val_ann": str(ds.val_annotations), "val_images": str(ds.val_images), "top_k": 2, "baselines": True},
    )
    result = search(spec, tmp_path / "search", backend="inline", log=None)
    val = str(ds.val_annotations)
    searched = sum(1 for r in rung_results(result.records).values() if r["status"] == "ok") + 2  # + baselines
    assert calls[:searched] == [task.heldout_ann] * searched  # every reward of the search: the held-out split
    assert calls[searched:] == [val] * 4  # then the 2 best pyramids and 2 baselines, once each, on val
    records = read_log(tmp_path / "search" / LOG_NAME)
    last_search_line = max(i for i, r in enumerate(records) if "trial" in r or "baseline" in r)
    finals = [i for i, r in enumerate(records) if "final" in r]
    assert len(finals) == 4 and min(finals) > last_search_line
    assert all(records[i]["split"] == "val" and records[i]["steps"] == 9 for i in finals)
    assert {r["split"] for r in records if "trial" in r and r["status"] == "ok"} == {"heldout"}
    summary = json.loads((tmp_path / "search" / "summary.json").read_text())
    assert summary["reward_split"] == "heldout" and summary["final"]["split"] == "val"
    names = set(summary["final"]["results"])
    assert {"nasfpn", "fpn_cells", f"trial{result.best['trial']}"} <= names
    assert sum(name.startswith("trial") for name in names) == 2
    assert "validation set" in (tmp_path / "search" / "best.txt").read_text()
    # Resumed, nothing is evaluated again.
    search(spec, tmp_path / "search", backend="inline", resume=True, log=None)
    assert calls.count(val) == 4


def test_a_tiny_asha_search_end_to_end_on_synthetic_data(tmp_path, one_thread):
    settings = ProxySettings(image_size=128, width=16, head_convs=1, batch_size=4, warmup_iters=1, max_steps=4)
    task = prepare_proxy_task(tmp_path, settings, data="synthetic", synthetic_images=8)
    spec = SearchSpec(
        controller="random",
        trials=2,
        evaluator=evaluator_spec(task),
        baselines=False,
        scheduler="asha",
        min_steps=2,
        max_steps=4,
        eta=2,
    )
    result = search(spec, tmp_path, backend="inline", log=None)
    lines = rung_results(result.records)
    assert sorted(lines) == [(0, 0), (0, 1), (1, 0)]  # the better of two (a tie: the first) goes on
    top = lines[(0, 1)]
    assert top["status"] == "ok" and top["cost"]["steps"] == 4 and top["cost"]["resumed"]
    assert json.loads((tmp_path / "trials" / "0000" / "proxy_result_4.json").read_text())["steps_done"] == 4
    steps = [json.loads(x)["step"] for x in (tmp_path / "trials" / "0000" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and len(steps) == 4  # steps 2-3 continued after 0-1, none again
    assert not list((tmp_path / "trials").glob("*/last.pt"))  # checkpoints dropped once the search is over
    assert (tmp_path / "rungs.png").is_file() and result.best["trial"] == 0


def test_cli_asha_search_with_a_validation_set(tmp_path, capsys):
    out = tmp_path / "s"
    args = ["search", "--fake-evaluator", "--controller", "evolution", "--trials", "9", "--out", str(out)]
    args += ["--scheduler", "asha", "--min-steps", "10", "--max-steps", "90", "--eta", "3", "--no-baselines"]
    args += ["--val-ann", str(tmp_path / "val.json"), "--val-images", str(tmp_path), "--top-k", "1"]
    assert main(args) == 0
    spec = json.loads((out / "search.json").read_text())
    assert spec["scheduler"] == "asha" and spec["final"]["top_k"] == 1 and spec["cost"] == {}
    assert "validation set: trial" in capsys.readouterr().out
    records = read_log(out / LOG_NAME)
    assert any(r.get("rung") == 2 for r in records) and sum("final" in r for r in records) == 1
    assert main(["search", "--out", str(out), "--resume"]) == 0
    assert sum("final" in r for r in read_log(out / LOG_NAME)) == 1


def test_cli_cost_options():
    def cost(*extra):
        return _cost_options(build_parser().parse_args(["search", "--out", "x", *extra]))

    assert cost() == {}
    c = cost("--max-flops", "250", "--target-latency-ms", "900", "--cost-model", "proxy", "--latency-runs", "5")
    assert c["max_gflops"] == 250 and c["target_latency_ms"] == 900 and c["model"] == "proxy"
    assert c["weight"] == -0.07 and c["weight_over"] is None and c["latency_runs"] == 5
    model = CostModel(**c)  # what SearchSpec.build_evaluator builds from it
    assert model.needs_latency and model.violations({"gflops": 260.0, "latency_ms": 1.0}) == ["260.00 GFLOPs > max 250"]
    assert cost("--measure-latency")["measure_latency"] is True


def _to_yolo(ds, out: Path) -> Path:
    """A YOLO copy (data.yaml, images/, labels/) of a synthetic COCO dataset."""
    for split, ann in (("train", ds.train_annotations), ("val", ds.val_annotations)):
        coco = json.loads(Path(ann).read_text())
        src = Path(ds.train_images if split == "train" else ds.val_images)
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        label = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
        for img in coco["images"]:
            shutil.copy(src / img["file_name"], out / "images" / split / img["file_name"])
            W, H = img["width"], img["height"]
            rows = [
                f"{label[a['category_id']]} {(x + w / 2) / W} {(y + h / 2) / H} {w / W} {h / H}"
                for a in coco["annotations"]
                if a["image_id"] == img["id"]
                for x, y, w, h in [a["bbox"]]
            ]
            (out / "labels" / split / img["file_name"]).with_suffix(".txt").write_text("\n".join(rows) + "\n")
    names = sorted(json.loads(Path(ds.train_annotations).read_text())["categories"], key=lambda c: c["id"])
    (out / "data.yaml").write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {i}: {c['name']}\n" for i, c in enumerate(names))
    )
    return out / "data.yaml"


def test_dataset_splits_of_coco_and_yolo_folders(tmp_path):
    ds = generate_dataset(tmp_path / "coco", num_train=6, num_val=3, image_size=64, seed=0)
    ann, images = dataset_split(tmp_path / "coco", "val", tmp_path / "work")
    assert ann == Path(ds.val_annotations) and images == Path(ds.val_images)
    data_yaml = _to_yolo(ds, tmp_path / "yolo")
    ann, images = dataset_split(data_yaml, "train", tmp_path / "work", "yolo")
    assert ann == tmp_path / "work" / "data" / "train.json"
    coco = json.loads(ann.read_text())
    assert len(coco["images"]) == 6 and all((images / img["file_name"]).is_file() for img in coco["images"])
    n_boxes = len(json.loads(Path(ds.train_annotations).read_text())["annotations"])
    assert len(coco["annotations"]) == n_boxes
    with pytest.raises(ValueError, match="instances_test"):
        dataset_split(tmp_path / "coco", "test", tmp_path / "work")
