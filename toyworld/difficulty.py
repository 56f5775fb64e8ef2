"""The difficulty curve of a finished embedded-default run: how hard the questioner's questions
are for the base reasoner, iteration by iteration, and whether their silver labels stay right.

    python -m toyworld.difficulty RUN             # RUN: a finished `visplay.py` run directory
    python -m toyworld.difficulty RUN --model M   # another reasoner than the run's base

For each iteration i with questions_v{i}.jsonl, the valid questions the pool's truth answers
(`toyworld.world.pool_truth`, the scenes redrawn from the run's seed) become labeled items; the
base answers them greedily (`eval.evaluate`, the run's eval settings), once for all of them and
once for the kept ones (kept_v{i}.jsonl). Questions that get harder as the questioner trains show
as a falling accuracy from Q_1 to Q_3; the silver labels' accuracy on the kept questions is the
summary's (`summary.silver_accuracy`).
"""

import argparse
import logging
import os
import sys

from answers import infer_answer_type
from benchmark_files import Item
from config import load_config
from data import read_jsonl
from eval import EvalSetting, evaluate
from models.load import load_vlm
from summary import silver_accuracy
from toyworld.world import pool_truth


def difficulty_items(rows, truth):
    """Labeled `benchmark_files.Item`s of the questions in `rows` (questions, labeled or kept
    rows) that the truth answers, categorised by family."""
    items = []
    for n, row in enumerate(rows):
        if not row.get("valid", True):
            continue
        family, answer = truth(row["image_index"], row["question"])
        if answer is not None:
            items.append(Item(f"{row['image_index']}-{n}", [row["image"]], row["question"],
                              answer, row.get("choices"), family or "other",
                              infer_answer_type(answer, row.get("choices"))))
    return items


def accuracy(results):
    return sum(r["correct"] for r in results) / len(results) if results else None


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--model", help="the reasoner to ask (default: RUN/embedded/base)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config_path = os.path.join(args.run_dir, "config.yaml")
    if not os.path.isfile(config_path):
        sys.exit(f"error: {config_path}: not found; give a visplay run directory")
    cfg = load_config(config_path)
    if cfg.model.path is not None or cfg.data.images is not None:
        sys.exit("error: the difficulty curve needs an embedded-default run (its pool's truth)")
    model, processor = load_vlm(args.model or os.path.join(args.run_dir, "embedded", "base"))
    setting = EvalSetting(cfg.model.min_pixels, cfg.model.max_pixels, cfg.eval.max_new_tokens,
                          cfg.eval.batch_size)
    truth = pool_truth(cfg.seed)
    print("| questions of | valid with a true answer | base accuracy | kept | base accuracy on "
          "kept | silver labels right on kept |")
    print("|---|---|---|---|---|---|")
    for i in range(1, cfg.iterations + 1):
        path = os.path.join(args.run_dir, f"questions_v{i}.jsonl")
        if not os.path.isfile(path):
            break
        kept_rows = read_jsonl(os.path.join(args.run_dir, f"kept_v{i}.jsonl"))
        every, kept = difficulty_items(read_jsonl(path), truth), difficulty_items(kept_rows, truth)
        on_every = accuracy(evaluate(model, processor, every, setting, progress=False))
        on_kept = accuracy(evaluate(model, processor, kept, setting, progress=False))
        silver = silver_accuracy(kept_rows, truth)
        print(f"| Q_{i} | {len(every)} | {pct(on_every)} | {len(kept)} | {pct(on_kept)} "
              f"| {pct(silver)} |", flush=True)


if __name__ == "__main__":
    main()
