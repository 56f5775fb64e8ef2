"""The ceiling the method is measured against: the reasoner stage (step 4) of `visplay.py`, same
config, steps and settings, but on questions about the pool's scenes with their TRUE answers (the
toy world's generator, `world.balanced_questions`) instead of the questioner's questions with
silver labels. Nothing here is part of the method; `python -m toyworld.claim --settings oracle`
runs it next to the method.

    python -m toyworld.oracle --config config.yaml --set run_dir=runs/oracle

Iteration i writes questions_v{i}.jsonl, labeled_v{i}.jsonl and kept_v{i}.jsonl (the same rows:
`questions_per_image` true-labeled questions per pool image, confidence 1), trains reasoner_v{i}
from reasoner_v{i-1} with `visplay.train_reasoner` and evaluates it with
`eval.evaluate_reasoner`; summary.jsonl and the table as `visplay.py` writes them. Resumes.
"""

import argparse
import logging
import os
import sys

import torch

import visplay
from config import load_config
from data import write_jsonl
from eval import evaluate_reasoner
from run import Run, free_memory
from summary import format_summary, iteration_summary
from toyworld.world import WorldConfig, balanced_questions, pool_scenes


def true_questions(run, iteration):
    """`generation.questions_per_image` questions with true answers for every pool image (the
    pool's scenes redrawn from the seed, `world.pool_scenes`)."""
    seed = run.cfg.seed
    world = WorldConfig(language=run.cfg.data.toy_language)
    pool = pool_scenes(world, seed)
    assert len(pool) == len(run.pool), "the oracle needs the embedded default's pool"
    per_image = run.cfg.generation.questions_per_image
    questions = balanced_questions(pool, seed + 100 + iteration, world.families,
                                   per_scene=per_image)
    return [{"image": run.pool.paths[index // per_image], "image_index": index // per_image,
             "valid": True, "type": q.type, "question": q.question, "questioner_answer": q.answer,
             "choices": q.choices, "answers": [q.answer], "silver_answer": q.answer,
             "confidence": 1.0}
            for index, (_, q) in enumerate(questions)]


def oracle_loop(cfg):
    run = Run(cfg)
    run.check_config()
    if not os.path.exists(run.path("eval_v0.json")):
        evaluate_reasoner(run, 0, reasoner_path=run.base, out_path=run.path("eval_v0.json"))
        free_memory()
    summaries = [iteration_summary(run.dir, 0, run.truth)]
    for i in range(1, cfg.iterations + 1):
        before = run.base if i == 1 else run.path(f"reasoner_v{i - 1}")
        if not os.path.exists(run.path(f"kept_v{i}.jsonl")):
            rows = true_questions(run, i)
            for name in ("questions", "labeled", "kept"):
                write_jsonl(run.path(f"{name}_v{i}.jsonl"), rows)
        if not os.path.exists(run.path(f"reasoner_v{i}")):
            visplay.train_reasoner(run, i, reasoner_path=before,
                                   kept_path=run.path(f"kept_v{i}.jsonl"),
                                   out_path=run.path(f"reasoner_v{i}"))
            free_memory()
        if not os.path.exists(run.path(f"eval_v{i}.json")):
            evaluate_reasoner(run, i, reasoner_path=run.path(f"reasoner_v{i}"),
                              out_path=run.path(f"eval_v{i}.json"))
            free_memory()
        summaries.append(iteration_summary(run.dir, i, run.truth))
        write_jsonl(run.path("summary.jsonl"), summaries)
    print(format_summary(summaries))
    return summaries


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(args.config, args.set)
    if cfg.model.path is not None or cfg.data.images is not None:
        sys.exit("error: the oracle needs the embedded default (model.path and data.images null)")
    torch.manual_seed(cfg.seed)
    oracle_loop(cfg)


if __name__ == "__main__":
    main()
