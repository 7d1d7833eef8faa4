"""benchmarks/compare_pyramids.py: Student's t p-values, the paired test, the summary table."""

import math

import pytest

from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def cp():
    return load_benchmark("compare_pyramids")


@pytest.mark.parametrize(("t", "df"), [(12.706, 1), (4.303, 2), (2.228, 10), (1.960, 100000)])
def test_t_p_values_match_the_tables(cp, t, df):
    assert cp.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)
    assert cp.t_two_sided_p(-t, df) == pytest.approx(0.05, abs=2e-4)
    assert cp.t_two_sided_p(0.0, df) == pytest.approx(1.0)


def test_paired_test(cp):
    r = cp.paired_test([0.30, 0.32, 0.31], [0.28, 0.30, 0.30])
    assert r["mean_diff"] == pytest.approx(1 / 60) and r["se_diff"] == pytest.approx(1 / 300)
    assert r["t"] == pytest.approx(5.0) and r["p"] == pytest.approx(0.0377, abs=1e-4)  # t = 5, df = 2
    same = cp.paired_test([0.1, 0.2], [0.1, 0.2])
    assert same["mean_diff"] == 0 and same["p"] == 1.0
    assert math.isnan(cp.paired_test([0.1], [0.2])["p"])
    with pytest.raises(ValueError):
        cp.paired_test([0.1, 0.2], [0.1])


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
