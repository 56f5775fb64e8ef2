"""toyworld/gates.py's scoring on four hand-made items: the figures per family, the
count families split at the lazy annotator's cut, and overall, each worked out by hand."""

from types import SimpleNamespace

import pytest

from toyworld import gates


def _item(category, answer, answer_type):
    return SimpleNamespace(category=category, answer=answer, choices=None,
                           answer_type=answer_type)


def test_score_by_family_and_the_lazy_split():
    items = [_item("count_total", "2", "integer"), _item("count_total", "5", "integer"),
             _item("exists", "yes", "yes_no"), _item("count_or", "4", "integer")]
    greedy = ["\\boxed{2}", "a b c. \\boxed{3}", "\\boxed{no}", "\\boxed{4}"]
    sampled = [["\\boxed{2}", "\\boxed{3}", "\\boxed{2}", "\\boxed{3}"],   # maj@3 2: right
               ["\\boxed{5}", "\\boxed{5}", "\\boxed{3}", "\\boxed{4}"],   # maj@3 5: right, 2 of 4
               ["\\boxed{no}"] * 4,                                       # never right
               ["\\boxed{4}"] * 4]                                        # always right
    scores = gates.score(items, greedy, sampled, ks=(3,), lazy_after=3)
    expected = {
        # n, greedy, maj@3, pass@8, pass@1 (percent)
        "count_total": (2, 50.0, 100.0, 100.0, 50.0),
        "count_total, at most 3 things": (1, 100.0, 100.0, 100.0, 50.0),
        "count_total, more than 3 things": (1, 0.0, 100.0, 100.0, 50.0),
        "exists": (1, 0.0, 0.0, 0.0, 0.0),
        "count_or": (1, 100.0, 100.0, 100.0, 100.0),
        "count_or, more than 3 things": (1, 100.0, 100.0, 100.0, 100.0),
        "overall": (4, 50.0, 75.0, 75.0, 50.0),
    }
    assert set(scores) == set(expected)
    for key, (n, greedy_acc, maj, pass8, pass1) in expected.items():
        got = scores[key]
        assert got["n"] == n, key
        assert [got["greedy"], got["maj@3"], got["pass@8"], got["pass@1"]] == pytest.approx(
            [greedy_acc, maj, pass8, pass1]), key
    # without the split, only the families and overall
    assert set(gates.score(items, greedy, sampled, ks=(3,))) == {"count_total", "exists",
                                                                 "count_or", "overall"}
    lines = gates.table("t", scores).splitlines()
    assert [line.split(" | ")[0] for line in lines[4:]] == [
        "| count_total", "| count_or", "| exists", "| count_or, more than 3 things",
        "| count_total, at most 3 things",
        "| count_total, more than 3 things", "| overall"]
