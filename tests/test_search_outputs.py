"""Search outputs: the comparison of finished searches, and the log read back for them."""

import json

from nasfpn.search.log import LOG_NAME, read_log, summarize, unique_counts
from nasfpn.search.outputs import compare_searches
from nasfpn.search.runner import search
from nasfpn.search.spec import SPEC_NAME, SearchSpec


def test_compare_searches_writes_one_row_per_search(tmp_path):
    dirs = []
    for controller in ("random", "random", "evolution"):
        d = tmp_path / f"{controller}{len(dirs)}"
        spec = SearchSpec(
            controller=controller,
            trials=4,
            seed=len(dirs),
            evaluator={"kind": "fake"},
            controller_options={"population_size": 2, "sample_size": 2} if controller == "evolution" else {},
        )
        search(spec, d, backend="inline", log=None)
        dirs.append(d)
    assert SearchSpec.from_file(dirs[0] / SPEC_NAME) == SearchSpec.from_dict(
        json.loads((dirs[0] / SPEC_NAME).read_text())
    )

    rows = compare_searches(dirs, tmp_path / "cmp")
    # Two searches with the same controller are told apart by their folder.
    assert [r["search"] for r in rows] == ["random", f"random ({dirs[1].name})", "evolution"]
    for row, d in zip(rows, dirs):
        s = summarize(read_log(d / LOG_NAME))
        assert row["trials"] == 4 and row["best_reward"] == s["best"]["reward"]
        assert row["unique"] == unique_counts(read_log(d / LOG_NAME))[-1]
    text = (tmp_path / "cmp" / "compare.md").read_text()
    assert text.count("\n| random") == 2 and "| baseline nasfpn |" in text and "| baseline fpn_cells |" in text
    assert (tmp_path / "cmp" / "compare_best.png").is_file() and (tmp_path / "cmp" / "compare_unique.png").is_file()
