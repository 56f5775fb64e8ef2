"""A run's summary: one row per iteration, read from the files its stages wrote, the tables the
run prints at the end (`visplay.run_loop` writes the rows to RUN/summary.jsonl), and its plots.

    python summary.py RUN                            # the run's tables again
    python summary.py RUN --plot                     # PNG figures in RUN/plots/
    python summary.py --compare RUN_A RUN_B --out DIR  # the runs overlaid, in DIR/

Everything here is read back from the run directory, so a resumed run reports exactly what an
uninterrupted one does. The plots need matplotlib (requirements-extras.txt).
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

from answers import answers_equivalent
from data import read_jsonl
from rewards import bleu_distance_matrix


def question_diversity(questions, limit=2000):
    """Distinct-question ratio and mean pairwise BLEU of (at most `limit` of) the questions."""
    if not questions:
        return {"distinct_ratio": None, "mean_pairwise_bleu": None}
    sample = questions[:limit]
    n = len(sample)
    pairwise = None
    if n > 1:
        pairwise = float(1 - bleu_distance_matrix(sample)[np.triu_indices(n, 1)].mean())
    return {"distinct_ratio": len(set(questions)) / len(questions), "mean_pairwise_bleu": pairwise}


def iteration_summary(run_dir, iteration, truth=None):
    """Iteration `iteration`'s row: question statistics (from iteration 1 on) and evaluation.

    The questions' statistics: how many were written, labeled and kept; the majority share p of
    the labeled ones (`confidence_mean`: how certain the frozen reasoner is of the questioner's
    questions) and of the kept ones; their diversity. truth: where the pool has true answers (the
    embedded default, `toyworld.world.pool_truth`), (image index, question) -> (family, answer),
    and the row also gets each family's share of the valid and of the kept questions
    (`family_mix`, `kept_family_mix`) and the silver labels' accuracy on the kept questions the
    truth can answer (`silver_accuracy`)."""
    row = {"iteration": iteration}
    if iteration > 0:
        generated = read_jsonl(os.path.join(run_dir, f"questions_v{iteration}.jsonl"))
        labeled = read_jsonl(os.path.join(run_dir, f"labeled_v{iteration}.jsonl"))
        kept = read_jsonl(os.path.join(run_dir, f"kept_v{iteration}.jsonl"))
        confidences = [r["confidence"] for r in labeled if r["silver_answer"] is not None]
        valid = [r for r in generated if r["valid"]]
        invalid = len(generated) - len(valid)
        row.update(generated=len(generated), invalid_rate=invalid / max(len(generated), 1),
                   labeled=len(labeled), kept=len(kept),
                   confidence_mean=float(np.mean(confidences)) if confidences else None,
                   kept_confidence_mean=(float(np.mean([r["confidence"] for r in kept]))
                                         if kept else None),
                   confidence_histogram=np.histogram(confidences, bins=10,
                                                     range=(0, 1))[0].tolist(),
                   **question_diversity([r["question"] for r in valid]))
        if truth is not None:
            row.update(family_mix=_family_shares(valid, truth),
                       kept_family_mix=_family_shares(kept, truth),
                       silver_accuracy=silver_accuracy(kept, truth))
    return eval_row(run_dir, iteration, row)


def _family_shares(rows, truth):
    """{family: share of `rows`} (None: a question in no family of the world)."""
    families = [truth(r["image_index"], r["question"])[0] or "other" for r in rows]
    return {f: families.count(f) / len(families) for f in sorted(set(families))}


def silver_accuracy(rows, truth):
    """The share of labeled `rows` whose silver answer equals the true one, over the rows the
    truth answers (None when it answers none)."""
    right = [answers_equivalent(r["silver_answer"], answer, r.get("choices"))
             for r in rows
             if (answer := truth(r["image_index"], r["question"])[1]) is not None]
    return sum(right) / len(right) if right else None


def question_yield(row):
    """The informative filter's yield of an iteration: the share of its labeled questions kept
    (None before any question was labeled)."""
    return row["kept"] / row["labeled"] if row.get("labeled") else None


def eval_row(run_dir, iteration, row=None):
    """`row` (default {"iteration": iteration}) with eval_v{iteration}.json's scores under
    "eval"."""
    row = {"iteration": iteration} if row is None else row
    with open(os.path.join(run_dir, f"eval_v{iteration}.json")) as f:
        evals = json.load(f)
    row["eval"] = {}
    for name, scores in evals.items():
        by_category = {c: round(x["accuracy"], 4) for c, x in scores["by_category"].items()}
        row["eval"][name] = {k: v for k, v in scores.items() if k != "by_category"}
        row["eval"][name]["by_category"] = by_category
    return row


def format_summary(summaries):
    """The run's tables: per iteration, greedy accuracy, sampled pass@1, majority@k and pass@k per
    benchmark with the question statistics; then, per benchmark, greedy accuracy per category."""
    benches = list(summaries[0]["eval"])

    def fmt(value, pattern, scale=1.0):
        return pattern % (scale * value) if value is not None else "-"

    head = "".join(f" | {b} acc | pass@1 | maj@k | pass@k" for b in benches)
    lines = [f"| iteration{head} | kept | yield | mean p | mean p kept | silver acc kept "
             "| invalid | distinct | pairwise BLEU |",
             "|---" * (4 * len(benches) + 9) + "|"]
    for s in summaries:
        accuracy = "".join(f" | {fmt(s['eval'][b].get(k), '%.1f', 100)}" for b in benches
                           for k in ("accuracy", "pass@1", "majority@k", "pass@k"))
        lines.append(f"| {s['iteration']}{accuracy} | {s.get('kept', '-')}"
                     f" | {fmt(question_yield(s), '%.2f')}"
                     f" | {fmt(s.get('confidence_mean'), '%.2f')}"
                     f" | {fmt(s.get('kept_confidence_mean'), '%.2f')}"
                     f" | {fmt(s.get('silver_accuracy'), '%.1f', 100)}"
                     f" | {fmt(s.get('invalid_rate'), '%.2f')}"
                     f" | {fmt(s.get('distinct_ratio'), '%.2f')}"
                     f" | {fmt(s.get('mean_pairwise_bleu'), '%.2f')} |")
    mixes = [s for s in summaries if s.get("family_mix")]
    if mixes:
        families = sorted({f for s in mixes for mix in (s["family_mix"], s["kept_family_mix"])
                           for f in mix})
        lines += ["", "questions per family, % of the valid / of the kept", "",
                  "| iteration | " + " | ".join(families) + " |",
                  "|---" * (len(families) + 1) + "|"]
        for s in mixes:
            cells = " | ".join(f"{100 * s['family_mix'].get(f, 0):.0f} / "
                               f"{100 * s['kept_family_mix'].get(f, 0):.0f}"
                               for f in families)
            lines.append(f"| {s['iteration']} | {cells} |")
    for b in benches:
        categories = sorted({c for s in summaries for c in s["eval"][b].get("by_category", {})})
        if len(categories) < 2:
            continue
        lines += ["", f"{b}: greedy accuracy per category", "",
                  "| iteration | " + " | ".join(categories) + " |",
                  "|---" * (len(categories) + 1) + "|"]
        for s in summaries:
            by = s["eval"][b].get("by_category", {})
            cells = " | ".join(fmt(by.get(c), "%.1f", 100) for c in categories)
            lines.append(f"| {s['iteration']} | {cells} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Plots

CURVES = ("reward_mean", "kl", "entropy", "response_length_mean")  # per step, per stage


def read_run(run_dir):
    """(summary rows, metrics rows) of a run directory; summary rows from summary.jsonl."""
    with open(os.path.join(run_dir, "summary.jsonl")) as f:
        summaries = [json.loads(line) for line in f if line.strip()]
    metrics = []
    if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            metrics = [json.loads(line) for line in f if line.strip()]
    return summaries, metrics


def _axes(rows, columns):
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.4 * rows), squeeze=False)
    return plt, figure, axes.flatten()


def plot_run(run_dir, out_dir):
    """PNG figures of one run: held-out accuracy per iteration by benchmark and category
    (iterations.png), the questions per iteration (questions.png: kept, the filter's yield,
    invalid and distinct rates, silver-label accuracy when the rows have it), and the step curves
    of each stage (steps.png). Returns the paths written."""
    summaries, metrics = read_run(run_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    benches = list(summaries[0]["eval"])
    plt, figure, axes = _axes(1, len(benches))
    for axis, bench in zip(axes, benches):
        iterations = [s["iteration"] for s in summaries]
        axis.plot(iterations, [100 * s["eval"][bench]["accuracy"] for s in summaries], "k-o",
                  label="all", linewidth=2)
        categories = sorted({c for s in summaries for c in s["eval"][bench]["by_category"]})
        for category in categories if len(categories) > 1 else []:
            axis.plot(iterations, [100 * s["eval"][bench]["by_category"].get(category, np.nan)
                                   for s in summaries], "--.", label=category)
        axis.set(title=f"{bench}: greedy accuracy", xlabel="iteration", ylabel="%")
        axis.legend(fontsize=7)
        axis.xaxis.get_major_locator().set_params(integer=True)
    written.append(_save(plt, figure, out_dir, "iterations.png"))
    trained = [s for s in summaries if "kept" in s]
    if trained:
        keys = ["kept", "yield", "invalid_rate", "distinct_ratio", "silver_accuracy"]
        keys = [k for k in keys if k == "yield" or any(k in s for s in trained)]
        plt, figure, axes = _axes(1, len(keys))
        for axis, key in zip(axes, keys):
            values = [question_yield(s) if key == "yield" else s.get(key) for s in trained]
            axis.plot([s["iteration"] for s in trained],
                      [np.nan if v is None else v for v in values], "o-")
            axis.set(title=key if key != "yield" else "yield (kept / labeled)",
                     xlabel="iteration")
            axis.xaxis.get_major_locator().set_params(integer=True)
        written.append(_save(plt, figure, out_dir, "questions.png"))
    if metrics:
        plt, figure, axes = _axes(1, len(CURVES))
        for axis, key in zip(axes, CURVES):
            for stage in sorted({m["stage"] for m in metrics}):
                points = [(step, m[key]) for step, m in enumerate(metrics)
                          if m["stage"] == stage and key in m]
                if points:
                    axis.plot(*zip(*points), ".", markersize=3, label=stage)
            axis.set(title=key, xlabel="GRPO step (metrics.jsonl row)")
            axis.legend(fontsize=7)
        written.append(_save(plt, figure, out_dir, "steps.png"))
    return written


def plot_compare(run_dirs, out_dir):
    """The runs overlaid: held-out accuracy per iteration for every benchmark they share
    (compare_iterations.png) and each stage's reward per step (compare_steps.png)."""
    runs = {os.path.basename(os.path.normpath(d)) or d: read_run(d) for d in run_dirs}
    os.makedirs(out_dir, exist_ok=True)
    benches = [b for b in next(iter(runs.values()))[0][0]["eval"]
               if all(b in s[0][0]["eval"] for s in runs.values())]
    plt, figure, axes = _axes(1, max(len(benches), 1))
    for axis, bench in zip(axes, benches):
        for name, (summaries, _) in runs.items():
            axis.plot([s["iteration"] for s in summaries],
                      [100 * s["eval"][bench]["accuracy"] for s in summaries], "o-", label=name)
        axis.set(title=f"{bench}: greedy accuracy", xlabel="iteration", ylabel="%")
        axis.legend(fontsize=7)
        axis.xaxis.get_major_locator().set_params(integer=True)
    written = [_save(plt, figure, out_dir, "compare_iterations.png")]
    stages = sorted({m["stage"] for _, metrics in runs.values() for m in metrics})
    if stages:
        plt, figure, axes = _axes(1, len(stages))
        for axis, stage in zip(axes, stages):
            for name, (_, metrics) in runs.items():
                rewards = [m["reward_mean"] for m in metrics if m["stage"] == stage]
                axis.plot(range(len(rewards)), rewards, "-", label=name)
            axis.set(title=f"{stage}: reward", xlabel=f"{stage} step (all iterations)")
            axis.legend(fontsize=7)
        written.append(_save(plt, figure, out_dir, "compare_steps.png"))
    return written


def _save(plt, figure, out_dir, name):
    path = os.path.join(out_dir, name)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv=None):
    """Command line: print a run's tables, plot it, or plot several runs together."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", help="a run directory")
    parser.add_argument("--plot", action="store_true", help="write RUN/plots/*.png")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="runs to overlay")
    parser.add_argument("--out", help="folder for the figures (default RUN/plots, or "
                                      "runs/compare with --compare)")
    args = parser.parse_args(argv)
    runs = args.compare or ([args.run] if args.run else [])
    if not runs:
        parser.error("give a run directory, or --compare RUN_A RUN_B ...")
    for run in runs:
        if not os.path.isfile(os.path.join(run, "summary.jsonl")):
            sys.exit(f"error: {run}: no summary.jsonl (not a run directory, or no iteration "
                     "finished yet)")
    if (args.plot or args.compare) and importlib.util.find_spec("matplotlib") is None:
        sys.exit("error: plotting needs the package matplotlib: pip install -r "
                 "requirements-extras.txt")
    if args.compare:
        written = plot_compare(runs, args.out or os.path.join("runs", "compare"))
    elif args.plot:
        written = plot_run(args.run, args.out or os.path.join(args.run, "plots"))
    else:
        print(format_summary(read_run(args.run)[0]))
        return
    print("\n".join(written))


if __name__ == "__main__":
    main()
