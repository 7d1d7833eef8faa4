"""nasfpn.search.stats: ranks and Spearman's correlation, Student's t p-values, the paired test."""

import math
import sys

import pytest

from nasfpn.search import stats


def test_ranks_and_spearman(monkeypatch):
    assert stats.ranks([0.3, 0.1, 0.3, 0.2]) == [3.5, 1.0, 3.5, 2.0]
    assert stats.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks 1..5 against 2,1,4,3,5: sum d^2 = 4, rho = 1 - 6*4 / (5*24) = 0.8
    xs, ys = [0.1, 0.2, 0.3, 0.4, 0.5], [0.2, 0.1, 0.4, 0.3, 0.5]
    assert stats.spearman(xs, ys) == pytest.approx(0.8)
    assert stats.spearman([1, 2], [2, 1]) is None and stats.spearman([1, 1, 1], [1, 2, 3]) is None
    # Without scipy: the rank implementation gives the same values, ties included.
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert stats.spearman(xs, ys) == pytest.approx(0.8)
    ties = ([0.1, 0.1, 0.3, 0.5], [1.0, 2.0, 2.0, 3.0])
    monkeypatch.undo()
    with_scipy = stats.spearman(*ties)
    monkeypatch.setitem(sys.modules, "scipy.stats", None)
    assert stats.spearman(*ties) == pytest.approx(with_scipy)


@pytest.mark.parametrize(("t", "df"), [(12.706, 1), (4.303, 2), (2.228, 10), (1.960, 100000)])
def test_t_p_values_match_the_tables(t, df):
    assert stats.t_two_sided_p(t, df) == pytest.approx(0.05, abs=2e-4)
    assert stats.t_two_sided_p(-t, df) == pytest.approx(0.05, abs=2e-4)
    assert stats.t_two_sided_p(0.0, df) == pytest.approx(1.0)


def test_paired_test():
    r = stats.paired_test([0.30, 0.32, 0.31], [0.28, 0.30, 0.30])
    assert r["mean_diff"] == pytest.approx(1 / 60) and r["se_diff"] == pytest.approx(1 / 300)
    assert r["t"] == pytest.approx(5.0) and r["p"] == pytest.approx(0.0377, abs=1e-4)  # t = 5, df = 2
    same = stats.paired_test([0.1, 0.2], [0.1, 0.2])
    assert same["mean_diff"] == 0 and same["p"] == 1.0
    assert math.isnan(stats.paired_test([0.1], [0.2])["p"])
    with pytest.raises(ValueError):
        stats.paired_test([0.1, 0.2], [0.1])
