"""guard.py: when the loop stops early, against hand-worked yields and accuracy drops."""

import guard


def rows(accuracies):
    """Summary rows of iterations 0.. with these first-benchmark accuracies (a second benchmark,
    which the guard must not read, always at 0)."""
    return [{"iteration": i, "eval": {"heldout": {"accuracy": a}, "pool": {"accuracy": 0.0}}}
            for i, a in enumerate(accuracies)]


def test_thin_filter_stops_below_the_yield_floor():
    # 84 / 2048 = 0.0410 < 0.05: stop before reasoner_v8, keep reasoner_v7
    reason = guard.thin_filter(8, 2048, 84, 0.05)
    assert reason.startswith("guard: stopped in iteration 8, before its reasoner stage")
    assert "kept 84 of 2048" in reason and "yield 0.041 < guard.min_yield 0.05" in reason
    assert "last reasoner is reasoner_v7" in reason and "\n" not in reason
    assert guard.thin_filter(1, 100, 4, 0.05).count("last reasoner is the base") == 1
    # 117 / 2048 = 0.0571 and exactly 5 / 100 = 0.05 go on; no floor never stops
    assert guard.thin_filter(7, 2048, 117, 0.05) is None
    assert guard.thin_filter(3, 100, 5, 0.05) is None
    assert guard.thin_filter(3, 100, 0, None) is None
    # nothing labeled: no yield to judge (the reasoner stage keeps the weights, with a warning)
    assert guard.thin_filter(2, 0, 0, 0.05) is None


def test_eval_drop_against_the_best_so_far():
    # best 96.3 (iteration 2); 95.6 is 0.7 below it, 93.0 is 3.3 below
    history = rows([0.857, 0.913, 0.963, 0.956])
    assert guard.eval_drop(history, 2.0) is None
    reason = guard.eval_drop(history, 0.5)
    assert reason.startswith("guard: stopped after iteration 3: greedy accuracy 95.6 is 0.7 "
                             "points below the best, 96.3 at iteration 2")
    assert "best reasoner is reasoner_v2" in reason
    reason = guard.eval_drop(rows([0.90, 0.87]), 2.0)  # 3.0 below the base
    assert "3.0 points below" in reason and "best reasoner is the base" in reason
    assert guard.eval_drop(rows([0.90, 0.70]), None) is None
    assert guard.eval_drop(rows([0.90]), 0.0) is None  # the best itself
    # a drop of exactly max_drop goes on (0.25 and 0.5 are exact in binary)
    assert guard.eval_drop(rows([0.5, 0.25]), 25.0) is None
