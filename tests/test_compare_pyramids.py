"""benchmarks/compare_pyramids.py: the summary table."""

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def cp():
    return load_benchmark("compare_pyramids")


def test_summary_and_table(cp):
    runs = {}
    for name, aps in (("found", [0.31, 0.33, 0.32]), ("nasfpn", [0.30, 0.31, 0.30])):
        for k, ap in enumerate(aps):
            runs[f"{name}|seed{k}"] = {"genotype": name, "AP": ap, "flops": 6.2e8}
    study = {
        "meta": {
            "settings": {
                "depth": 10,
                "image_size": 128,
                "stacks": 1,
                "width": 32,
                "epochs": 16,
                "optimizer": "adamw",
                "lr": 0.004,
                "precision": "bf16",
            },
            "val": "val.json",
        },
        "machine": {"cpu": "test CPU"},
        "genotypes": {"found": "g1", "nasfpn": "g2"},
        "runs": runs,
    }
    study["summary"] = cp.summarize(study, ["found", "nasfpn"], ["nasfpn"], 3)
    assert study["summary"]["table"]["found"]["mean"] == pytest.approx(0.32)
    test = study["summary"]["tests"]["found - nasfpn"]
    assert test["n"] == 3 and test["mean_diff"] == pytest.approx(0.05 / 3)
    text = cp.markdown(study)
    assert "| found | 0.620 | 0.3100, 0.3300, 0.3200 | 0.3200 ± 0.0058 |" in text
    assert "| found - nasfpn | +0.0167" in text
