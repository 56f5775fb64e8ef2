"""When the VisPlay loop stops before `iterations`: two guards against a run that has stopped
helping itself (config section `guard`). Each returns the reason to stop as one line, or None.

- `thin_filter` (guard.min_yield, label-free, on by default): after the silver labels of an
  iteration, before its reasoner stage. The informative filter's yield (kept / labeled) falls as
  the reasoner grows sure of the questioner's questions. On the embedded default's ten iterations
  (docs/toyworld.md, "Ten iterations") the silver labels' accuracy on the kept questions fell from
  the first iteration whose yield was under 0.05 (75.0% at 0.041, after 81.2% at 0.057): training
  on those labels teaches more wrong answers than before.
- `eval_drop` (guard.max_eval_drop, off by default): after an evaluation, the greedy accuracy on
  the first benchmark (eval.benchmarks' first; the embedded default's: the toy benchmark) more
  than this many points below the run's best so far. It reads a labeled benchmark, so a run it
  stops has chosen its length on it: keep it off where that benchmark is the one you report.

Resuming a stopped run stops it again at the same place (the guards read only the run's files);
set the guard to null to go on.
"""

import os

from data import read_jsonl


def after_labels(run_dir, iteration, min_yield):
    """`thin_filter` on the labeled and kept questions iteration `iteration` wrote to run_dir."""
    labeled, kept = (len(read_jsonl(os.path.join(run_dir, f"{name}_v{iteration}.jsonl")))
                     for name in ("labeled", "kept"))
    return thin_filter(iteration, labeled, kept, min_yield)


def thin_filter(iteration, labeled, kept, min_yield):
    """The reason to stop before iteration `iteration`'s reasoner stage when the filter kept less
    than `min_yield` of its `labeled` questions (None: go on; min_yield None: never stop). With
    nothing labeled (no valid question) there is no yield: the reasoner stage keeps S_i = S_{i-1}
    with its own warning."""
    if min_yield is None or labeled == 0 or kept / labeled >= min_yield:
        return None
    share = kept / labeled
    return (f"guard: stopped in iteration {iteration}, before its reasoner stage: the filter kept "
            f"{kept} of {labeled} labeled questions (yield {share:.3f} < guard.min_yield "
            f"{min_yield}); the run's last reasoner is "
            f"{'the base' if iteration == 1 else f'reasoner_v{iteration - 1}'} "
            "(guard.min_yield=null goes on)")


def accuracy(row):
    """A summary row's greedy accuracy on its first benchmark, in points."""
    return 100 * next(iter(row["eval"].values()))["accuracy"]


def eval_drop(summaries, max_drop):
    """The reason to stop after the last row of `summaries` (iterations 0..i, evaluated) when its
    `accuracy` is more than `max_drop` points below the best row's (None: go on; max_drop None:
    never stop)."""
    if max_drop is None:
        return None
    best = max(summaries, key=accuracy)  # the first of equal bests
    last = summaries[-1]
    drop = accuracy(best) - accuracy(last)
    if drop <= max_drop:
        return None
    name = "the base" if best["iteration"] == 0 else f"reasoner_v{best['iteration']}"
    return (f"guard: stopped after iteration {last['iteration']}: greedy accuracy "
            f"{accuracy(last):.1f} is {drop:.1f} points below the best, "
            f"{accuracy(best):.1f} at iteration {best['iteration']} (guard.max_eval_drop "
            f"{max_drop}); the run's best reasoner is {name} (guard.max_eval_drop=null goes on)")
