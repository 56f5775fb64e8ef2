"""A run's summary: one row per iteration, read from the files its stages wrote, and the tables the
run prints at the end (`visplay.run_loop` writes the rows to RUN/summary.jsonl).

Everything here is read back from the run directory, so a resumed run reports exactly what an
uninterrupted one does.
"""

import json
import os

import numpy as np

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


def iteration_summary(run_dir, iteration):
    """Iteration `iteration`'s row: question statistics (from iteration 1 on) and evaluation."""
    row = {"iteration": iteration}
    if iteration > 0:
        generated = read_jsonl(os.path.join(run_dir, f"questions_v{iteration}.jsonl"))
        labeled = read_jsonl(os.path.join(run_dir, f"labeled_v{iteration}.jsonl"))
        kept = read_jsonl(os.path.join(run_dir, f"kept_v{iteration}.jsonl"))
        confidences = [r["confidence"] for r in labeled if r["silver_answer"] is not None]
        invalid = sum(not r["valid"] for r in generated)
        row.update(generated=len(generated), invalid_rate=invalid / max(len(generated), 1),
                   labeled=len(labeled), kept=len(kept),
                   kept_confidence_mean=(float(np.mean([r["confidence"] for r in kept]))
                                         if kept else None),
                   confidence_histogram=np.histogram(confidences, bins=10,
                                                     range=(0, 1))[0].tolist(),
                   **question_diversity([r["question"] for r in generated if r["valid"]]))
    return eval_row(run_dir, iteration, row)


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
    lines = [f"| iteration{head} | kept | mean p kept | invalid | distinct | pairwise BLEU |",
             "|---" * (4 * len(benches) + 6) + "|"]
    for s in summaries:
        accuracy = "".join(f" | {fmt(s['eval'][b].get(k), '%.1f', 100)}" for b in benches
                           for k in ("accuracy", "pass@1", "majority@k", "pass@k"))
        lines.append(f"| {s['iteration']}{accuracy} | {s.get('kept', '-')}"
                     f" | {fmt(s.get('kept_confidence_mean'), '%.2f')}"
                     f" | {fmt(s.get('invalid_rate'), '%.2f')}"
                     f" | {fmt(s.get('distinct_ratio'), '%.2f')}"
                     f" | {fmt(s.get('mean_pairwise_bleu'), '%.2f')} |")
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
