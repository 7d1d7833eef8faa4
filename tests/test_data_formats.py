"""YOLO and Pascal VOC datasets: the same data in COCO, YOLO and VOC gives the same training targets
and the same COCO metrics; malformed labels are reported with their file and line (or object)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine_utils import tiny_config
from nasfpn.cli import build_parser, main
from nasfpn.core.config import config_to_yaml
from nasfpn.data.checks import DataCheckError, check_dataset, validate_dataset
from nasfpn.data.coco import CocoDataset
from nasfpn.data.formats import DataSource, detect_format
from nasfpn.data.synthetic import generate_dataset
from nasfpn.data.voc import read_voc_objects
from nasfpn.engine.coco_metrics import evaluate_detections
from nasfpn.engine.data_paths import DataPaths, split_data

SPLITS = ("train", "val")


# --------------------------------------------------------------------------- writers (COCO -> YOLO / VOC)
def _write_yolo(coco_root: Path, out: Path, splits: dict[str, dict]) -> Path:
    """YOLO copy of a COCO dataset; boxes as ``%.10g`` fractions (integer pixel boxes come back exactly)."""
    names = [c["name"] for c in sorted(next(iter(splits.values()))["categories"], key=lambda c: c["id"])]
    for split, coco in splits.items():
        label = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)
        for img in coco["images"]:
            shutil.copy(coco_root / split / img["file_name"], out / "images" / split / img["file_name"])
            W, H = img["width"], img["height"]
            lines = [
                f"{label[a['category_id']]} {(x + w / 2) / W:.10g} {(y + h / 2) / H:.10g} {w / W:.10g} {h / H:.10g}"
                for a in coco["annotations"]
                if a["image_id"] == img["id"]
                for x, y, w, h in [a["bbox"]]
            ]
            if lines:  # no label file at all for an image without objects
                (out / "labels" / split / img["file_name"]).with_suffix(".txt").write_text("\n".join(lines) + "\n")
    data_yaml = out / "data.yaml"
    data_yaml.write_text(
        "path: .\ntrain: images/train\nval: images/val\nnames:\n"
        + "".join(f"  {i}: {n}\n" for i, n in enumerate(names))
    )
    return data_yaml


def _voc_xml(img: dict, anns: list[dict], names: dict[int, str]) -> str:
    objects = "".join(
        f"<object><name>{names[a['category_id']]}</name><difficult>{int(a.get('iscrowd', 0))}</difficult>"
        f"<bndbox><xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
        for a in anns
        for x, y, w, h in [a["bbox"]]
    )
    return (
        f"<annotation><filename>{img['file_name']}</filename><size><width>{img['width']}</width>"
        f"<height>{img['height']}</height><depth>3</depth></size>{objects}</annotation>"
    )


def _write_voc(coco_root: Path, out: Path, splits: dict[str, dict]) -> Path:
    cats = sorted(next(iter(splits.values()))["categories"], key=lambda c: c["id"])
    names = {c["id"]: c["name"] for c in cats}
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (out / d).mkdir(parents=True)
    (out / "classes.txt").write_text("".join(f"{c['name']}\n" for c in cats))
    for split, coco in splits.items():
        ids = []
        for img in coco["images"]:
            stem = f"{split}_{Path(img['file_name']).stem}"  # the splits reuse file names
            ids.append(stem)
            shutil.copy(coco_root / split / img["file_name"], out / "JPEGImages" / f"{stem}.png")
            anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
            xml = _voc_xml({**img, "file_name": f"{stem}.png"}, anns, names)
            (out / "Annotations" / f"{stem}.xml").write_text(xml)
        (out / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same 8 images (96x64) and boxes as COCO files, a YOLO data.yaml and a VOC folder."""
    root = tmp_path_factory.mktemp("formats")
    ds = generate_dataset(root / "coco", 6, 2, image_size=(64, 96), seed=0)
    splits = {s: json.loads((ds.root / "annotations" / f"instances_{s}.json").read_text()) for s in SPLITS}
    # One training image without objects: YOLO then has no label file for it.
    empty = splits["train"]["images"][1]["id"]
    splits["train"]["annotations"] = [a for a in splits["train"]["annotations"] if a["image_id"] != empty]
    for s in SPLITS:
        (ds.root / "annotations" / f"instances_{s}.json").write_text(json.dumps(splits[s]))
    return {
        "coco": ds.root,
        "yolo": _write_yolo(ds.root, root / "yolo", splits),
        "voc": _write_voc(ds.root, root / "voc", splits),
        "splits": splits,
    }


def _targets(ann, images) -> dict[str, tuple[list, list]]:
    """Boxes and class names per image (keyed by the image's own name, without the VOC prefix)."""
    ds = CocoDataset(ann, images)
    out = {}
    for i in range(len(ds)):
        boxes, labels = ds.annotations(i)
        name = Path(ds.file_names[i]).stem.split("_")[-1]
        out[name] = (boxes.tolist(), [ds.class_names[k] for k in labels])
    return out


@pytest.mark.parametrize("split", SPLITS)
def test_same_targets_in_every_format(datasets, split):
    coco = split_data(datasets["coco"], split)
    yolo = split_data(datasets["yolo"], split)
    voc = split_data(datasets["voc"], split)
    assert isinstance(yolo[0], DataSource) and isinstance(voc[0], DataSource)
    expected = _targets(*coco)
    assert sum(len(b) for b, _ in expected.values()) > 5
    assert _targets(*yolo) == expected
    assert _targets(*voc) == expected
    if split == "train":
        assert [] in [b for b, _ in expected.values()]  # the image without a label file is kept, with no boxes


def _detections(coco: dict) -> list[dict]:
    """Detections by file and class name: most boxes found (shifted 1 px), one missed, one false positive."""
    rng = np.random.default_rng(0)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    out = []
    for k, a in enumerate(coco["annotations"]):
        x, y, w, h = a["bbox"]
        if k % 5 == 4:
            continue
        out.append({"file": files[a["image_id"]], "name": names[a["category_id"]], "bbox": [x + 1, y, w, h - 1]})
        out.append({"file": files[a["image_id"]], "name": names[a["category_id"]], "bbox": [x + 8, y + 6, w, h]})
    for d in out:
        d["score"] = float(rng.uniform(0.05, 1.0))
    return out


def _results(ann, detections: list[dict]) -> list[dict]:
    """The detections in the COCO results of one format (its image and category ids)."""
    gt = ann if isinstance(ann, DataSource) else json.loads(Path(ann).read_text())
    ids = {Path(img["file_name"]).stem.split("_")[-1]: img["id"] for img in gt["images"]}
    cats = {c["name"]: c["id"] for c in gt["categories"]}
    return [
        {"image_id": ids[Path(d["file"]).stem], "category_id": cats[d["name"]], "bbox": d["bbox"], "score": d["score"]}
        for d in detections
    ]


def test_same_metrics_in_every_format(datasets):
    detections = _detections(datasets["splits"]["val"])
    metrics = [
        evaluate_detections(ann, _results(ann, detections))
        for ann, _ in (split_data(datasets[f], "val") for f in ("coco", "yolo", "voc"))
    ]
    assert 0.1 < metrics[0]["AP"] < 0.9
    assert metrics[1] == metrics[0]
    assert metrics[2] == metrics[0]


def test_voc_difficult_is_coco_crowd(tmp_path, datasets):
    """A difficult VOC object is ignored like a COCO crowd box: not a target, not a miss, not a false positive."""
    coco = json.loads(json.dumps(datasets["splits"]["val"]))
    coco["annotations"][0]["iscrowd"] = 1
    ann = tmp_path / "crowd.json"
    ann.write_text(json.dumps(coco))
    voc = _write_voc(datasets["coco"], tmp_path / "voc", {"val": coco})
    source = DataSource(voc, "val", "voc")
    images = datasets["coco"] / "val"
    assert _targets(source, source.image_dir) == _targets(ann, images)
    assert sum(len(b) for b, _ in _targets(ann, images).values()) == len(coco["annotations"]) - 1
    detections = _detections(datasets["splits"]["val"])
    expected = evaluate_detections(ann, _results(ann, detections))
    assert evaluate_detections(source, _results(source, detections)) == expected
    assert expected != evaluate_detections(
        datasets["coco"] / "annotations" / "instances_val.json", _results(ann, detections)
    )


def test_format_detection_and_data_paths(datasets):
    assert detect_format(datasets["yolo"]) == "yolo"
    assert detect_format(datasets["yolo"].parent) == "yolo"  # a folder holding data.yaml
    assert detect_format(datasets["voc"]) == "voc"
    assert detect_format(datasets["coco"]) == "coco"
    assert detect_format(datasets["coco"] / "annotations" / "instances_val.json") == "coco"
    for name in ("yolo", "voc"):
        paths = DataPaths.from_data(datasets[name])
        assert isinstance(paths.train_ann, DataSource) and paths.train_ann.split == "train"
        assert isinstance(paths.val_ann, DataSource) and paths.val_ann.split == "val"
    with pytest.raises(ValueError, match=r"no split 'test' \(ImageSets/Main has: train, val\)"):
        DataPaths.from_data(datasets["voc"], val_split="test")
    # The command line resolves --data the same way, for train and for eval.
    args = build_parser().parse_args(["train", "nasfpn_tiny", "--data", str(datasets["yolo"]), "--out", "x"])
    from nasfpn.cli import _data_paths, _val_paths

    assert _data_paths(args) == DataPaths.from_data(datasets["yolo"])
    args = build_parser().parse_args(
        ["eval", "m", "--weights", "w", "--data", str(datasets["voc"]), "--split", "train", "--data-format", "voc"]
    )
    ann, images = _val_paths(args)
    assert ann == DataSource(datasets["voc"], "train", "voc") and images == datasets["voc"] / "JPEGImages"


def test_convert_data_to_coco(tmp_path, datasets, capsys):
    out = tmp_path / "converted"
    assert main(["convert-data", str(datasets["yolo"]), "--to", "coco", "--out", str(out)]) == 0
    assert "instances_train.json" in capsys.readouterr().out
    for split in SPLITS:
        converted = _targets(out / f"instances_{split}.json", datasets["yolo"].parent)
        assert converted == _targets(*split_data(datasets["coco"], split))
    assert (
        main(["convert-data", str(datasets["voc"]), "--to", "coco", "--out", str(tmp_path / "v"), "--split", "val"])
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["instances_val.json"]


# --------------------------------------------------------------------------- malformed data
def _png(path: Path, w: int = 40, h: int = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


@pytest.fixture
def broken_yolo(tmp_path):
    _png(tmp_path / "images" / "train" / "a.png")
    _png(tmp_path / "images" / "train" / "b.png")
    labels = tmp_path / "labels" / "train"
    labels.mkdir(parents=True)
    (labels / "a.txt").write_text(
        "0 0.5 0.5 0.2 0.2\n"  # fine
        "0 0.5 0.5 0.2\n"  # 4 fields
        "7 0.5 0.5 0.2 0.2\n"  # class out of range
        "1 0.5 abc 0.2 0.2\n"  # not a number
        "\n"
        "1 1.5 0.5 0.2 0.2\n"  # outside 0..1 (line 6)
        "1 0.5 0.5 0 0.2\n"  # zero width
    )
    (labels / "b.txt").write_text("1.5 0.5 0.5 0.1 0.1\n")
    (labels / "gone.txt").write_text("0 0.5 0.5 0.1 0.1\n")  # no image
    (tmp_path / "list.txt").write_text("./images/train/a.png\n./images/train/missing.png\n")
    data_yaml = tmp_path / "data.yaml"
    data_yaml.write_text("train: images/train\nval: list.txt\nnames: [cat, dog]\n")
    return data_yaml


def test_yolo_problems_name_label_file_and_line(broken_yolo):
    labels = broken_yolo.parent / "labels" / "train"
    problems = check_dataset(DataSource(broken_yolo, "train", "yolo"))
    found = {(p.kind, p.location) for p in problems}
    assert found == {
        ("bad_label_line", f"{labels / 'a.txt'}:2"),
        ("unknown_category_id", f"{labels / 'a.txt'}:3"),
        ("bad_coordinates", f"{labels / 'a.txt'}:4"),
        ("not_normalized", f"{labels / 'a.txt'}:6"),
        ("nonpositive_box", f"{labels / 'a.txt'}:7"),
        ("unknown_category_id", f"{labels / 'b.txt'}:1"),
        ("unmatched_label", str(labels / "gone.txt")),
    }
    text = {p.kind: str(p) for p in problems if p.location and p.location.endswith("a.txt:3")}
    assert "class '7' is not a class index 0..1" in text["unknown_category_id"]
    assert str(labels / "a.txt:6") in "\n".join(map(str, problems))
    # The list file's missing image, by list file and line.
    (missing,) = [p for p in check_dataset(DataSource(broken_yolo, "val", "yolo")) if p.kind == "missing_image"]
    assert (missing.kind, missing.location) == ("missing_image", f"{broken_yolo.parent / 'list.txt'}:2")

    source = DataSource(broken_yolo, "train", "yolo")
    with pytest.raises(DataCheckError, match=r"a\.txt:2: 4 field\(s\) '0 0\.5 0\.5 0\.2', expected 5"):
        validate_dataset(source, None)
    # Skipping invalid data leaves out the bad lines, not their images.
    ds = CocoDataset(source, source.image_dir, exclude=validate_dataset(source, None, skip_invalid=True))
    assert ds.file_names == ["images/train/a.png", "images/train/b.png"]
    assert ds.annotations(0)[0].tolist() == [[16.0, 12.0, 24.0, 18.0]] and len(ds.annotations(1)[0]) == 0


def test_voc_problems_name_xml_file_and_object(tmp_path):
    for d in ("Annotations", "ImageSets/Main"):
        (tmp_path / d).mkdir(parents=True)
    _png(tmp_path / "JPEGImages" / "a.jpg")
    _png(tmp_path / "JPEGImages" / "c.jpg", 50, 30)
    obj = "<object><name>{}</name><bndbox><xmin>{}</xmin><ymin>2</ymin><xmax>{}</xmax><ymax>9</ymax></bndbox></object>"
    (tmp_path / "Annotations" / "a.xml").write_text(
        "<annotation><filename>a.jpg</filename><size><width>40</width><height>30</height></size>"
        + obj.format("dog", 3, 10)
        + obj.format("dgo", 3, 10)
        + "<object><name>cat</name></object>"
        + obj.format("cat", "x", 10)
        + obj.format("cat", 60, 70)
        + "</annotation>"
    )
    (tmp_path / "Annotations" / "b.xml").write_text("<annotation><filename>b.jpg")
    (tmp_path / "Annotations" / "c.xml").write_text(
        "<annotation><size><width>40</width><height>30</height></size></annotation>"
    )
    (tmp_path / "ImageSets" / "Main" / "train.txt").write_text("a\nb\nc\nd\na\n")
    xml = tmp_path / "Annotations"
    problems = check_dataset(DataSource(tmp_path, "train", "voc"))
    found = {(p.kind, p.location) for p in problems}
    split_list = tmp_path / "ImageSets" / "Main" / "train.txt"
    assert found == {
        ("unknown_category_id", f"{xml / 'a.xml'} object 2"),
        ("missing_key", f"{xml / 'a.xml'} object 3"),
        ("bad_coordinates", f"{xml / 'a.xml'} object 4"),
        ("box_outside_image", f"{xml / 'a.xml'} object 5"),
        ("bad_label_file", str(xml / "b.xml")),
        ("size_mismatch", str(xml / "c.xml")),
        ("bad_label_file", f"{split_list}:4"),
        ("duplicate_image_id", f"{split_list}:5"),
    }
    text = "\n".join(map(str, problems))
    assert f"{xml / 'a.xml'} object 2: name 'dgo' is not one of the 20 classes" in text
    assert "<xmin>x</xmin> is not a number" in text


def test_one_voc_file_reads_its_objects_as_written_or_names_the_bad_one(tmp_path):
    obj = "<object><name>{}</name>{}<bndbox><xmin>3</xmin><ymin>2</ymin><xmax>{}</xmax><ymax>9</ymax></bndbox></object>"
    xml = tmp_path / "a.xml"
    xml.write_text(
        f"<annotation>{obj.format('cat', '', 10)}{obj.format('dog', '<difficult>1</difficult>', 7.5)}</annotation>"
    )
    assert read_voc_objects(xml, ("dog", "cat")) == [(1, [3.0, 2.0, 10.0, 9.0], 0), (0, [3.0, 2.0, 7.5, 9.0], 1)]
    with pytest.raises(ValueError, match=r"a.xml object 2: name 'dog' is not one of the 1 classes \(given: cat\)"):
        read_voc_objects(xml, ("cat",))
    xml.write_text(f"<annotation>{obj.format('cat', '', 'ten')}</annotation>")
    with pytest.raises(ValueError, match="object 1: <xmax>ten</xmax> is not a number"):
        read_voc_objects(xml, ("cat",))


def test_check_data_command(datasets, broken_yolo, tmp_path, capsys):
    assert main(["check-data", str(datasets["yolo"])]) == 0
    assert main(["check-data", str(datasets["voc"]), "--split", "val"]) == 0
    coco = datasets["coco"]
    assert main(["check-data", str(coco / "annotations" / "instances_val.json"), str(coco / "val")]) == 0
    capsys.readouterr()
    assert main(["check-data", str(broken_yolo), "--json", str(tmp_path / "p.json")]) == 1
    out = capsys.readouterr().out
    assert f"{broken_yolo.parent / 'labels' / 'train' / 'a.txt'}:4: cy 'abc' is not a number" in out
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["location"] for r in rows if r["kind"] == "missing_image" and r["split"] == "val"] == [
        f"{broken_yolo.parent / 'list.txt'}:2"
    ]
    # A broken data.yaml: one clear line, no traceback.
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: images/train\nnames: 3\n")
    assert main(["check-data", str(bad)]) == 1
    assert "'names' (the class names) is missing or not a list or mapping" in capsys.readouterr().out
    assert main(["train", "nasfpn_tiny", "--data", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


@pytest.mark.slow
def test_train_on_yolo_and_evaluate_on_voc(datasets, tmp_path):
    """The command line end to end: two training steps on the YOLO copy, evaluation on the VOC copy."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(config_to_yaml(tiny_config()))
    run = tmp_path / "run"
    argv = ["train", str(cfg), "--data", str(datasets["yolo"]), "--out", str(run), "--max-steps", "2", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["steps"]) == ("max_steps", 2)
    weights = str(run / "last.safetensors")
    assert main(["eval", "-", "--weights", weights, "--data", str(datasets["voc"]), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_images"] == 2
