"""VisPlay: a vision-language model improves itself from unlabeled images by playing two roles.

    python visplay.py --config config.yaml                           # embedded default (CPU, offline)
    python visplay.py --config configs/qwen2.5-vl-3b.yaml \\
        --set model.path=/models/Qwen2.5-VL-3B-Instruct --set data.images=/data/images
    torchrun --nproc_per_node 8 visplay.py --config configs/qwen2.5-vl-7b.yaml ...   # FSDP2

Iteration i = 1..T, with Q_0 = S_0 = the base model (SPEC section 2):
  1. questioner stage  `train_questioner`: GRPO on Q_{i-1}; a question's reward is the frozen
     S_{i-1}'s uncertainty about it minus a diversity penalty; an unparsable one gets -1.
  2. generation        `generate_questions`: Q_i writes k questions for every pool image.
  3. silver labels     `label_questions`: S_{i-1} answers each n times; the majority answer is the
     silver label, its share p the confidence; keep p_low <= p <= p_high (informative filter).
  4. reasoner stage    `train_reasoner`: GRPO on S_{i-1} with reward 0.9 * matches-silver + 0.1 * boxed.
  5. evaluation        `evaluate_solver`: greedy accuracy of S_i on the labeled benchmarks.

Every stage writes its result atomically into the run directory; rerunning the same command skips
the stages whose result exists and resumes an interrupted one (README, "Run directory").
Under torchrun every rank samples and scores its share of each batch; what needs the whole batch
(the diversity penalty, the loss normalisation, the metrics) is gathered.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time

import numpy as np
import torch

import distributed
from config import ConfigError, load_config
from data import load_image, read_jsonl, write_json, write_jsonl
from eval import evaluate, summarize
from grpo import Sampling, decode, gathered, rollout, special_tokens
from rewards import (bleu_distance_matrix, diversity_penalty, extract_boxed, majority_vote, questioner_reward,
                     reasoner_reward)
from roles import parse_question, questioner_prompt, reasoner_prompt
from run import Run, Timer, seed_for
from vlm import atomic_replace_dir

log = logging.getLogger("visplay")


def draw(seed, population, count):
    """`count` indices of range(population): shuffled passes over the whole population, end to end."""
    rng = np.random.default_rng(seed)
    passes = [rng.permutation(population) for _ in range(-(-count // population))]
    return np.concatenate(passes)[:count].tolist()


def my_part(items, blocks=1):
    """This rank's share of a batch (all of it in a single-process run).

    The batch is cut into `blocks` consecutive blocks (a GRPO step's mini-batches, one per optimizer
    update) and the rank takes its contiguous share of each, so every update sees the same global
    mini-batch whatever the number of processes.
    """
    size = len(items) // blocks
    return [items[b * size + i] for b in range(blocks) for i in distributed.my_share(size)]


def load_pool_images(run, indices):
    """Pool images at `indices`; an unreadable one is replaced by the next readable image."""
    images = []
    for index in indices:
        for offset in range(len(run.pool)):
            image = run.pool.load((index + offset) % len(run.pool))
            if image is not None:
                images.append(image)
                break
        else:
            raise RuntimeError(f"no readable image in the pool ({len(run.pool.bad)} unreadable)")
    return images


def answer_votes(solver, processor, images, questions, choices, samples, sampling, batch_size, generator):
    """The solver answers each (image, question) `samples` times; majority vote over boxed answers.

    questions: list of str; choices: per question the option texts or None.
    Returns per question (silver_answer or None, confidence p, the extracted answers).
    """
    if not questions:
        return []
    tokens = special_tokens(processor, solver)
    prompts = [reasoner_prompt(processor, image, q) for image, q in zip(images, questions)]
    result = rollout(solver, prompts, samples, sampling, tokens, batch_size, generator)
    answers = [extract_boxed(t) for t in decode(processor, result.completion_ids, result.completion_mask)]
    votes = []
    for i, options in enumerate(choices):
        mine = answers[i * samples:(i + 1) * samples]
        silver, confidence = majority_vote(mine, options)
        votes.append((silver, confidence, mine))
    return votes


def step_diversity_penalty(local_questions, threshold):
    """Diversity penalty of this rank's questions, clustered with the questions of EVERY rank."""
    per_rank = distributed.all_gather_list([list(local_questions)])
    offset = sum(len(questions) for questions in per_rank[:distributed.rank()])
    everyone = [q for questions in per_rank for q in questions]
    return diversity_penalty(everyone, threshold)[offset:offset + len(local_questions)]


def train_questioner(run, iteration, questioner_path, solver_path, out_path):
    """Stage 1: GRPO on the questioner; reward = uncertainty of the frozen solver - diversity penalty."""
    qcfg = run.cfg.questioner
    solver = run.load(solver_path, trainable=False)[0]
    sampling = Sampling(qcfg.temperature, qcfg.top_p, qcfg.top_k, qcfg.max_new_tokens)
    answer_sampling = Sampling(qcfg.answer_temperature, qcfg.answer_top_p, 0, qcfg.answer_max_new_tokens)

    def make_batch(policy, processor, tokens, step):
        timer = Timer()
        indices = my_part(draw(seed_for(run.cfg.seed, iteration, "questioner-images", step), len(run.pool),
                               qcfg.prompts_per_step), qcfg.updates_per_step)
        images = load_pool_images(run, indices)
        prompts = [questioner_prompt(processor, image) for image in images]
        with gathered(policy):
            result = rollout(policy, prompts, qcfg.group_size, sampling, tokens, qcfg.rollout_batch_size,
                             run.generator(iteration, "questioner", step))
        parsed = [parse_question(t) for t in decode(processor, result.completion_ids, result.completion_mask)]
        seconds_sampling = timer.lap()

        valid = [i for i, q in enumerate(parsed) if q is not None]
        prompt_of = result.prompt_index.tolist()
        with gathered(solver):
            votes = answer_votes(solver, processor, [images[prompt_of[i]] for i in valid],
                                 [parsed[i].question for i in valid], [parsed[i].choices for i in valid],
                                 qcfg.answer_samples, answer_sampling, qcfg.rollout_batch_size,
                                 run.generator(iteration, "questioner-answers", step))
        confidence = dict(zip(valid, (p for _, p, _ in votes)))
        penalty = step_diversity_penalty([q.question if q else "" for q in parsed], qcfg.diversity_threshold)
        rewards = torch.tensor([questioner_reward(q is not None, confidence.get(i), float(penalty[i]),
                                                  qcfg.uncertainty_scale, qcfg.diversity_weight,
                                                  qcfg.invalid_reward) for i, q in enumerate(parsed)])
        valid_count, count, confidence_sum, penalty_sum = distributed.all_reduce_sum(
            [len(valid), len(parsed), sum(confidence.values()), float(penalty.sum())])
        extra = {"invalid_rate": 1 - valid_count / count, "confidence_mean": confidence_sum / max(valid_count, 1),
                 "diversity_penalty_mean": penalty_sum / count,
                 "seconds_sampling": seconds_sampling, "seconds_scoring": timer.lap()}
        return prompts, result, rewards, extra

    run.train("questioner", iteration, questioner_path, out_path, make_batch)


def generate_questions(run, iteration, questioner_path, out_path):
    """Stage 2: the trained questioner writes k questions per pool image -> questions_v{i}.jsonl."""
    gcfg = run.cfg.generation
    model, processor = run.load(questioner_path, trainable=False)
    tokens = special_tokens(processor, model)
    sampling = Sampling(gcfg.temperature, gcfg.top_p, 0, gcfg.max_new_tokens)

    def work(chunk):
        loaded = [(i, run.pool.load(i)) for i in range(chunk * gcfg.batch_size,
                                                         min((chunk + 1) * gcfg.batch_size, len(run.pool)))]
        indices = [i for i, image in loaded if image is not None]
        if not indices:
            return []
        prompts = [questioner_prompt(processor, image) for _, image in loaded if image is not None]
        result = rollout(model, prompts, gcfg.questions_per_image, sampling, tokens, gcfg.batch_size,
                         run.generator(iteration, "generate", chunk))
        rows = []
        for row, text in enumerate(decode(processor, result.completion_ids, result.completion_mask)):
            index = indices[result.prompt_index[row]]
            q = parse_question(text)
            rows.append({"image": run.pool.paths[index], "image_index": index, "raw": text, "valid": q is not None,
                         "type": q.type if q else None, "question": q.question if q else None,
                         "questioner_answer": q.answer if q else None, "choices": q.choices if q else None})
        return rows

    with gathered(model):
        rows = run.in_parts(out_path, -(-len(run.pool) // gcfg.batch_size), work)
    if distributed.is_main():
        write_jsonl(out_path, rows)
        log.info("[iter %d generate] %d questions for %d images, %.1f%% invalid", iteration, len(rows),
                 len(run.pool), 100 * sum(not r["valid"] for r in rows) / max(len(rows), 1))
    run.done_parts(out_path)


def label_questions(run, iteration, solver_path, questions_path, labeled_path, kept_path):
    """Stage 3: silver labels by majority vote of the frozen solver, then the informative filter."""
    lcfg, mcfg = run.cfg.labeling, run.cfg.model
    rows = [r for r in read_jsonl(questions_path) if r["valid"]]
    model, processor = run.load(solver_path, trainable=False)
    sampling = Sampling(lcfg.temperature, lcfg.top_p, 0, lcfg.max_new_tokens)

    def work(chunk):
        images, ok = [], []
        for r in rows[chunk * lcfg.batch_size:(chunk + 1) * lcfg.batch_size]:
            try:
                images.append(load_image(r["image"], mcfg.min_pixels, mcfg.max_pixels))
                ok.append(r)
            except ValueError as error:
                log.warning("labeling skipped a question: %s", error)
        votes = answer_votes(model, processor, images, [r["question"] for r in ok], [r["choices"] for r in ok],
                             lcfg.answers_per_question, sampling, lcfg.batch_size,
                             run.generator(iteration, "label", chunk))
        return [{**r, "answers": answers, "silver_answer": silver, "confidence": confidence}
                for r, (silver, confidence, answers) in zip(ok, votes)]

    with gathered(model):
        labeled = run.in_parts(labeled_path, -(-len(rows) // lcfg.batch_size), work)
    if distributed.is_main():
        kept = [r for r in labeled if r["silver_answer"] is not None and lcfg.p_low <= r["confidence"] <= lcfg.p_high]
        write_jsonl(labeled_path, labeled)
        write_jsonl(kept_path, kept)  # last: its existence marks the stage done
        log.info("[iter %d label] %d labeled, %d kept (p in [%.2f, %.2f])", iteration, len(labeled), len(kept),
                 lcfg.p_low, lcfg.p_high)
    run.done_parts(labeled_path)


def train_reasoner(run, iteration, solver_path, kept_path, out_path):
    """Stage 4: GRPO on the solver over the kept questions, reward 0.9 * matches silver + 0.1 * boxed."""
    rcfg, mcfg = run.cfg.reasoner, run.cfg.model
    kept = read_jsonl(kept_path)
    if not kept:
        log.warning("[iter %d reasoner] no question passed the informative filter: S_%d = S_%d unchanged",
                    iteration, iteration, iteration - 1)
        if distributed.is_main():
            shutil.rmtree(out_path + ".tmp", ignore_errors=True)
            shutil.copytree(solver_path, out_path + ".tmp")
            atomic_replace_dir(out_path + ".tmp", out_path)
        distributed.barrier()
        return
    sampling = Sampling(rcfg.temperature, rcfg.top_p, rcfg.top_k, rcfg.max_new_tokens)
    order = draw(seed_for(run.cfg.seed, iteration, "reasoner-questions"), len(kept), rcfg.steps * rcfg.prompts_per_step)

    def make_batch(policy, processor, tokens, step):
        timer = Timer()
        batch = my_part([kept[i] for i in order[step * rcfg.prompts_per_step:(step + 1) * rcfg.prompts_per_step]],
                        rcfg.updates_per_step)
        prompts = [reasoner_prompt(processor, load_image(r["image"], mcfg.min_pixels, mcfg.max_pixels),
                                   r["question"]) for r in batch]
        with gathered(policy):
            result = rollout(policy, prompts, rcfg.group_size, sampling, tokens, rcfg.rollout_batch_size,
                             run.generator(iteration, "reasoner", step))
        texts = decode(processor, result.completion_ids, result.completion_mask)
        seconds_sampling = timer.lap()
        rewards = torch.tensor([reasoner_reward(text, batch[p]["silver_answer"], batch[p]["choices"],
                                                rcfg.accuracy_weight, rcfg.format_weight)
                                for text, p in zip(texts, result.prompt_index.tolist())])
        return prompts, result, rewards, {"seconds_sampling": seconds_sampling, "seconds_scoring": timer.lap()}

    run.train("reasoner", iteration, solver_path, out_path, make_batch)


def evaluate_solver(run, iteration, solver_path, out_path):
    """Stage 5: greedy accuracy (and sampled pass@1 / majority@k) of a solver on every benchmark."""
    ecfg, mcfg = run.cfg.eval, run.cfg.model
    model, processor = run.load(solver_path, trainable=False)
    summaries, items_rows = {}, []
    for name, items in run.benchmarks.items():
        items = items[:ecfg.max_items] if ecfg.max_items else items
        with gathered(model):
            mine = evaluate(model, processor, my_part(items), mcfg.min_pixels, mcfg.max_pixels, ecfg.max_new_tokens,
                            ecfg.batch_size, ecfg.samples, seed_for(run.cfg.seed, "eval", distributed.rank()),
                            progress=distributed.is_main())
        results = distributed.all_gather_list(mine)
        summaries[name] = summarize(results)
        items_rows += [{"benchmark": name, **r} for r in results]
        log.info("[iter %d eval] %s: accuracy %.1f%% (%d items)", iteration, name,
                 100 * summaries[name]["accuracy"], len(results))
    if distributed.is_main():
        write_jsonl(out_path.replace(".json", "_items.jsonl"), items_rows)
        write_json(out_path, summaries)
    distributed.barrier()


def question_diversity(questions, limit=2000):
    """Distinct-question ratio and mean pairwise BLEU of (at most `limit` of) the generated questions."""
    if not questions:
        return {"distinct_ratio": None, "mean_pairwise_bleu": None}
    sample = questions[:limit]
    n = len(sample)
    pairwise = float(1 - bleu_distance_matrix(sample)[np.triu_indices(n, 1)].mean()) if n > 1 else None
    return {"distinct_ratio": len(set(questions)) / len(questions), "mean_pairwise_bleu": pairwise}


def iteration_summary(run, iteration):
    """One line per iteration from the files the stages wrote (so a resumed run writes the same)."""
    row = {"iteration": iteration}
    if iteration > 0:
        generated = read_jsonl(run.path(f"questions_v{iteration}.jsonl"))
        labeled = read_jsonl(run.path(f"labeled_v{iteration}.jsonl"))
        kept = read_jsonl(run.path(f"kept_v{iteration}.jsonl"))
        confidences = [r["confidence"] for r in labeled if r["silver_answer"] is not None]
        row.update(generated=len(generated), invalid_rate=sum(not r["valid"] for r in generated) / max(len(generated), 1),
                   labeled=len(labeled), kept=len(kept),
                   kept_confidence_mean=float(np.mean([r["confidence"] for r in kept])) if kept else None,
                   confidence_histogram=np.histogram(confidences, bins=10, range=(0, 1))[0].tolist(),
                   **question_diversity([r["question"] for r in generated if r["valid"]]))
    with open(run.path(f"eval_v{iteration}.json")) as f:
        evals = json.load(f)
    row["eval"] = {name: {k: v for k, v in s.items() if k != "by_category"} | {
        "by_category": {c: round(x["accuracy"], 4) for c, x in s["by_category"].items()}} for name, s in evals.items()}
    return row


def run_loop(cfg):
    """The whole VisPlay run: evaluate the base, then T iterations of the five stages, resuming."""
    started = time.perf_counter()
    run = Run(cfg)
    run.check_config()
    log.info("run %s: %d pool images, base %s, device %s, %d process(es)", run.dir, len(run.pool), run.base,
             run.device, distributed.world_size())
    if not os.path.exists(run.path("eval_v0.json")):
        evaluate_solver(run, 0, run.base, run.path("eval_v0.json"))
    summaries = [iteration_summary(run, 0)]
    for i in range(1, cfg.iterations + 1):
        questioner_prev = run.base if i == 1 else run.path(f"questioner_v{i - 1}")
        solver_prev = run.base if i == 1 else run.path(f"solver_v{i - 1}")
        stages = [
            (f"questioner_v{i}", lambda out: train_questioner(run, i, questioner_prev, solver_prev, out)),
            (f"questions_v{i}.jsonl", lambda out: generate_questions(run, i, run.path(f"questioner_v{i}"), out)),
            (f"kept_v{i}.jsonl", lambda out: label_questions(run, i, solver_prev, run.path(f"questions_v{i}.jsonl"),
                                                             run.path(f"labeled_v{i}.jsonl"), out)),
            (f"solver_v{i}", lambda out: train_reasoner(run, i, solver_prev, run.path(f"kept_v{i}.jsonl"), out)),
            (f"eval_v{i}.json", lambda out: evaluate_solver(run, i, run.path(f"solver_v{i}"), out)),
        ]
        for name, stage in stages:
            out = run.path(name)
            if os.path.exists(out):
                log.info("[iter %d] %s exists: stage skipped", i, name)
                continue
            stage(out)
        summaries.append(iteration_summary(run, i))
        if distributed.is_main():
            write_jsonl(run.path("summary.jsonl"), summaries)
    if distributed.is_main():
        log.info("done in %.1f s", time.perf_counter() - started)
        print(format_summary(summaries))
    return summaries


def format_summary(summaries):
    """The run's tables: per iteration, greedy accuracy, sampled pass@1 and majority@k per benchmark with
    the question statistics; then, per benchmark, greedy accuracy per category."""
    benches = list(summaries[0]["eval"])

    def fmt(value, pattern, scale=1.0):
        return pattern % (scale * value) if value is not None else "-"

    head = "".join(f" | {b} acc | pass@1 | maj@k" for b in benches)
    lines = [f"| iteration{head} | kept | mean p kept | invalid | distinct | pairwise BLEU |",
             "|---" * (3 * len(benches) + 6) + "|"]
    for s in summaries:
        acc = "".join(f" | {fmt(s['eval'][b].get(k), '%.1f', 100)}" for b in benches
                      for k in ("accuracy", "pass@1", "majority@k"))
        lines.append(f"| {s['iteration']}{acc} | {s.get('kept', '-')} | {fmt(s.get('kept_confidence_mean'), '%.2f')}"
                     f" | {fmt(s.get('invalid_rate'), '%.2f')} | {fmt(s.get('distinct_ratio'), '%.2f')}"
                     f" | {fmt(s.get('mean_pairwise_bleu'), '%.2f')} |")
    for b in benches:
        categories = sorted({c for s in summaries for c in s["eval"][b].get("by_category", {})})
        if len(categories) < 2:
            continue
        lines += ["", f"{b}: greedy accuracy per category", "",
                  "| iteration | " + " | ".join(categories) + " |", "|---" * (len(categories) + 1) + "|"]
        for s in summaries:
            by = s["eval"][b].get("by_category", {})
            lines.append(f"| {s['iteration']} | " + " | ".join(fmt(by.get(c), "%.1f", 100) for c in categories) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (config.yaml is the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set questioner.lr=1e-5 (repeatable)")
    args = parser.parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports progress
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        cfg = load_config(args.config, args.set)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    torch.manual_seed(cfg.seed)
    run_loop(cfg)


if __name__ == "__main__":
    main()
