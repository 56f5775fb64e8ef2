"""VisPlay: a vision-language model improves itself from unlabeled images by playing two roles.

    python visplay.py --config config.yaml                           # embedded default (CPU, offline)
    python visplay.py --config configs/qwen2.5-vl-3b.yaml \\
        --set model.path=/models/Qwen2.5-VL-3B-Instruct --set data.images=/data/images

Iteration i = 1..T, with Q_0 = S_0 = the base model (SPEC section 2):
  1. questioner stage  `train_questioner`: GRPO on Q_{i-1}; a question's reward is the frozen
     S_{i-1}'s uncertainty about it minus a diversity penalty; an unparsable one gets -1.
  2. generation        `generate_questions`: Q_i writes k questions for every pool image.
  3. silver labels     `label_questions`: S_{i-1} answers each n times; the majority answer is the
     silver label, its share p the confidence; keep p_low <= p <= p_high (informative filter).
  4. reasoner stage    `train_reasoner`: GRPO on S_{i-1} with reward 0.9 * matches-silver + 0.1 * boxed.
  5. evaluation        `evaluate_solver`: greedy accuracy of S_i on the labeled benchmarks.

Every stage writes its result atomically into the run directory; rerunning the same command skips
the stages whose result exists (see README, "Run directory").
"""

import argparse
import json
import logging
import os
import shutil
import sys
import time
import zlib

import numpy as np
import torch
import yaml

from config import ConfigError, config_to_dict, load_config
from data import ImagePool, list_images, load_image, read_jsonl, write_json, write_jsonl
from eval import evaluate, load_benchmark, summarize
from grpo import Sampling, decode, make_optimizer, rollout, special_tokens, train_step
from rewards import (bleu_distance_matrix, diversity_penalty, extract_boxed, majority_vote, questioner_reward,
                     reasoner_reward)
from roles import parse_question, questioner_prompt, reasoner_prompt
from vlm import atomic_replace_dir, check_model_dir, load_vlm, save_vlm

log = logging.getLogger("visplay")


def seed_for(seed, *parts):
    """A seed for one random choice of the run, derived from the config's seed and where it is made."""
    return zlib.crc32("/".join(map(str, (seed,) + parts)).encode())


class Run:
    """Where a run lives and what every stage needs: config, device, images, benchmarks, metrics file."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dir = cfg.run_dir
        os.makedirs(self.dir, exist_ok=True)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if cfg.device == "auto" else cfg.device))
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
        self.base, images, benchmarks = self._sources()
        check_model_dir(self.base)
        paths = list_images(images)
        if cfg.data.max_images is not None:
            paths = paths[:cfg.data.max_images]
        self.pool = ImagePool(paths, cfg.model.min_pixels, cfg.model.max_pixels)
        self.benchmarks = {name: load_benchmark(path) for name, path in benchmarks.items()}
        self.metrics_path = self.path("metrics.jsonl")

    def _sources(self):
        """(base model folder, image source, benchmarks): the config's, or the embedded toy world's."""
        cfg = self.cfg
        if cfg.model.path is not None:
            if cfg.data.images is None:
                raise ConfigError("data.images: a run on model.path needs a folder or manifest of images")
            return cfg.model.path, cfg.data.images, cfg.eval.benchmarks
        import toyworld
        world = toyworld.build_embedded(self.path("embedded"), cfg.seed)
        return world["base"], cfg.data.images or world["pool"], cfg.eval.benchmarks or {"toyworld": world["benchmark"]}

    def path(self, *names):
        return os.path.join(self.dir, *names)

    def load(self, path, trainable):
        model, processor = load_vlm(path, dtype=self.dtype, device=self.device,
                                    attn_implementation=self.cfg.model.attn_implementation)
        processor.image_processor.size = {"shortest_edge": self.cfg.model.min_pixels,
                                          "longest_edge": self.cfg.model.max_pixels}
        model.eval()
        for name, param in model.named_parameters():
            param.requires_grad_(trainable and not (self.cfg.model.freeze_vision and ".visual." in f".{name}"))
        return model, processor

    def generator(self, *parts):
        return torch.Generator(self.device).manual_seed(seed_for(self.cfg.seed, *parts))

    def restart_metrics(self, iteration, stage):
        """Drop the metric rows a previous, interrupted attempt at this stage wrote."""
        if os.path.exists(self.metrics_path):
            rows = [r for r in read_jsonl(self.metrics_path)
                    if not (r.get("iteration") == iteration and r.get("stage") == stage)]
            write_jsonl(self.metrics_path, rows)

    def log_metrics(self, row):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def draw(rng, population, count):
    """`count` indices of range(population): shuffled passes over the whole population, end to end."""
    passes = [rng.permutation(population) for _ in range(-(-count // population))]
    return np.concatenate(passes)[:count].tolist()


def load_images(run, indices):
    """Images of the pool at `indices`; unreadable ones are replaced by the next readable image."""
    images, chosen = [], []
    for index in indices:
        for offset in range(len(run.pool)):
            candidate = (index + offset) % len(run.pool)
            image = run.pool.load(candidate)
            if image is not None:
                images.append(image)
                chosen.append(candidate)
                break
        else:
            raise RuntimeError(f"no readable image in the pool ({len(run.pool.bad)} unreadable)")
    return images, chosen


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


def _step_log(iteration, stage, step, steps, m):
    log.info("[iter %d %s %d/%d] reward %.3f±%.3f  kl %.4f  entropy %.2f  len %.1f  grad %.3f  "
             "time sample %.1fs score %.1fs train %.1fs", iteration, stage, step + 1, steps, m["reward_mean"],
             m["reward_std"], m["kl"], m["entropy"], m["response_length_mean"], m["grad_norm"],
             m["seconds_sampling"], m["seconds_scoring"], m["seconds_training"])


def train_questioner(run, iteration, questioner_path, solver_path, out_path):
    """Stage 1: GRPO on the questioner; reward = uncertainty of the frozen solver - diversity penalty."""
    cfg, qcfg = run.cfg, run.cfg.questioner
    run.restart_metrics(iteration, "questioner")
    policy, processor = run.load(questioner_path, trainable=True)
    reference = run.load(questioner_path, trainable=False)[0] if qcfg.kl_coef > 0 else None
    solver = run.load(solver_path, trainable=False)[0]
    tokens = special_tokens(processor, policy)
    optimizer = make_optimizer(policy, qcfg)
    sampling = Sampling(qcfg.temperature, qcfg.top_p, qcfg.top_k, qcfg.max_new_tokens)
    answer_sampling = Sampling(qcfg.answer_temperature, qcfg.answer_top_p, 0, qcfg.answer_max_new_tokens)
    rng = np.random.default_rng(seed_for(cfg.seed, iteration, "questioner-images"))
    for step in range(qcfg.steps):
        started = time.perf_counter()
        images, _ = load_images(run, draw(rng, len(run.pool), qcfg.prompts_per_step))
        prompts = [questioner_prompt(processor, image) for image in images]
        result = rollout(policy, prompts, qcfg.group_size, sampling, tokens, qcfg.rollout_batch_size,
                         run.generator(iteration, "questioner", step))
        parsed = [parse_question(t) for t in decode(processor, result.completion_ids, result.completion_mask)]
        sampled = time.perf_counter()

        valid = [i for i, q in enumerate(parsed) if q is not None]
        prompt_of = result.prompt_index.tolist()
        votes = answer_votes(solver, processor, [images[prompt_of[i]] for i in valid],
                             [parsed[i].question for i in valid], [parsed[i].choices for i in valid],
                             qcfg.answer_samples, answer_sampling,
                             qcfg.rollout_batch_size, run.generator(iteration, "questioner-answers", step))
        confidence = dict(zip(valid, (p for _, p, _ in votes)))
        penalty = diversity_penalty([q.question if q else "" for q in parsed], qcfg.diversity_threshold)
        rewards = torch.tensor([questioner_reward(q is not None, confidence.get(i), float(penalty[i]),
                                                  qcfg.uncertainty_scale, qcfg.diversity_weight,
                                                  qcfg.invalid_reward) for i, q in enumerate(parsed)])
        scored = time.perf_counter()

        metrics = train_step(policy, reference, optimizer, prompts, result, rewards, tokens, qcfg)
        metrics.update(iteration=iteration, stage="questioner", step=step,
                       invalid_rate=1 - len(valid) / len(parsed),
                       confidence_mean=float(np.mean(list(confidence.values()))) if valid else None,
                       diversity_penalty_mean=float(penalty.mean()),
                       seconds_sampling=sampled - started, seconds_scoring=scored - sampled)
        run.log_metrics(metrics)
        _step_log(iteration, "questioner", step, qcfg.steps, metrics)
    save_vlm(policy, processor, out_path)


def generate_questions(run, iteration, questioner_path, out_path):
    """Stage 2: the trained questioner writes k questions per pool image -> questions_v{i}.jsonl."""
    gcfg = run.cfg.generation
    model, processor = run.load(questioner_path, trainable=False)
    tokens = special_tokens(processor, model)
    sampling = Sampling(gcfg.temperature, gcfg.top_p, 0, gcfg.max_new_tokens)
    rows = []
    for start in range(0, len(run.pool), gcfg.batch_size):
        indices = [i for i in range(start, min(start + gcfg.batch_size, len(run.pool)))
                   if run.pool.load(i) is not None]
        if not indices:
            continue
        prompts = [questioner_prompt(processor, run.pool.load(i)) for i in indices]
        result = rollout(model, prompts, gcfg.questions_per_image, sampling, tokens, gcfg.batch_size,
                         run.generator(iteration, "generate", start))
        for row, text in enumerate(decode(processor, result.completion_ids, result.completion_mask)):
            index = indices[result.prompt_index[row]]
            q = parse_question(text)
            rows.append({"image": run.pool.paths[index], "image_index": index, "raw": text, "valid": q is not None,
                         "type": q.type if q else None, "question": q.question if q else None,
                         "questioner_answer": q.answer if q else None, "choices": q.choices if q else None})
    write_jsonl(out_path, rows)
    log.info("[iter %d generate] %d questions for %d images (%d unreadable), %.1f%% invalid", iteration, len(rows),
             len(run.pool) - len(run.pool.bad), len(run.pool.bad),
             100 * sum(not r["valid"] for r in rows) / max(len(rows), 1))


def label_questions(run, iteration, solver_path, questions_path, labeled_path, kept_path):
    """Stage 3: silver labels by majority vote of the frozen solver, then the informative filter."""
    lcfg = run.cfg.labeling
    rows = [r for r in read_jsonl(questions_path) if r["valid"]]
    model, processor = run.load(solver_path, trainable=False)
    sampling = Sampling(lcfg.temperature, lcfg.top_p, 0, lcfg.max_new_tokens)
    labeled = []
    for start in range(0, len(rows), lcfg.batch_size):
        batch = rows[start:start + lcfg.batch_size]
        images, ok = [], []
        for r in batch:
            try:
                images.append(load_image(r["image"], run.cfg.model.min_pixels, run.cfg.model.max_pixels))
                ok.append(r)
            except ValueError as error:
                log.warning("labeling skipped a question: %s", error)
        votes = answer_votes(model, processor, images, [r["question"] for r in ok], [r["choices"] for r in ok],
                             lcfg.answers_per_question, sampling, lcfg.batch_size,
                             run.generator(iteration, "label", start))
        for r, (silver, confidence, answers) in zip(ok, votes):
            labeled.append({**r, "answers": answers, "silver_answer": silver, "confidence": confidence})
    kept = [r for r in labeled if r["silver_answer"] is not None and lcfg.p_low <= r["confidence"] <= lcfg.p_high]
    write_jsonl(labeled_path, labeled)
    write_jsonl(kept_path, kept)
    log.info("[iter %d label] %d labeled, %d kept (p in [%.2f, %.2f])", iteration, len(labeled), len(kept),
             lcfg.p_low, lcfg.p_high)


def train_reasoner(run, iteration, solver_path, kept_path, out_path):
    """Stage 4: GRPO on the solver over the kept questions, reward 0.9 * matches silver + 0.1 * boxed."""
    cfg, rcfg = run.cfg, run.cfg.reasoner
    kept = read_jsonl(kept_path)
    if not kept:
        log.warning("[iter %d reasoner] no question passed the informative filter: S_%d = S_%d unchanged",
                    iteration, iteration, iteration - 1)
        tmp = out_path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(solver_path, tmp)
        atomic_replace_dir(tmp, out_path)
        return
    run.restart_metrics(iteration, "reasoner")
    policy, processor = run.load(solver_path, trainable=True)
    reference = run.load(solver_path, trainable=False)[0] if rcfg.kl_coef > 0 else None
    tokens = special_tokens(processor, policy)
    optimizer = make_optimizer(policy, rcfg)
    sampling = Sampling(rcfg.temperature, rcfg.top_p, rcfg.top_k, rcfg.max_new_tokens)
    rng = np.random.default_rng(seed_for(cfg.seed, iteration, "reasoner-questions"))
    order = draw(rng, len(kept), rcfg.steps * rcfg.prompts_per_step)
    for step in range(rcfg.steps):
        started = time.perf_counter()
        batch = [kept[i] for i in order[step * rcfg.prompts_per_step:(step + 1) * rcfg.prompts_per_step]]
        prompts = [reasoner_prompt(processor, load_image(r["image"], cfg.model.min_pixels, cfg.model.max_pixels),
                                   r["question"]) for r in batch]
        result = rollout(policy, prompts, rcfg.group_size, sampling, tokens, rcfg.rollout_batch_size,
                         run.generator(iteration, "reasoner", step))
        texts = decode(processor, result.completion_ids, result.completion_mask)
        sampled = time.perf_counter()
        rewards = torch.tensor([reasoner_reward(text, batch[p]["silver_answer"], batch[p]["choices"],
                                                rcfg.accuracy_weight, rcfg.format_weight)
                                for text, p in zip(texts, result.prompt_index.tolist())])
        scored = time.perf_counter()
        metrics = train_step(policy, reference, optimizer, prompts, result, rewards, tokens, rcfg)
        metrics.update(iteration=iteration, stage="reasoner", step=step,
                       seconds_sampling=sampled - started, seconds_scoring=scored - sampled)
        run.log_metrics(metrics)
        _step_log(iteration, "reasoner", step, rcfg.steps, metrics)
    save_vlm(policy, processor, out_path)


def evaluate_solver(run, iteration, solver_path, out_path):
    """Stage 5: greedy accuracy (and sampled pass@1 / majority@k) of a solver on every benchmark."""
    ecfg = run.cfg.eval
    model, processor = run.load(solver_path, trainable=False)
    summaries, items_rows = {}, []
    for name, items in run.benchmarks.items():
        items = items[:ecfg.max_items] if ecfg.max_items else items
        results = evaluate(model, processor, items, run.cfg.model.min_pixels, run.cfg.model.max_pixels,
                           ecfg.max_new_tokens, ecfg.batch_size, ecfg.samples, seed_for(run.cfg.seed, "eval"))
        summaries[name] = summarize(results)
        items_rows += [{"benchmark": name, **r} for r in results]
        log.info("[iter %d eval] %s: accuracy %.1f%% (%d items)", iteration, name,
                 100 * summaries[name]["accuracy"], len(results))
    write_jsonl(out_path.replace(".json", "_items.jsonl"), items_rows)
    write_json(out_path, summaries)


def question_diversity(questions, limit=2000):
    """Distinct-question ratio and mean pairwise BLEU of (at most `limit` of) the generated questions."""
    if not questions:
        return {"distinct_ratio": None, "mean_pairwise_bleu": None}
    sample = questions[:limit]
    distance = bleu_distance_matrix(sample)
    n = len(sample)
    pairwise = 1 - distance[np.triu_indices(n, 1)].mean() if n > 1 else None
    return {"distinct_ratio": len(set(questions)) / len(questions),
            "mean_pairwise_bleu": float(pairwise) if pairwise is not None else None}


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
    evals = json.load(open(run.path(f"eval_v{iteration}.json")))
    row["eval"] = {name: {k: v for k, v in s.items() if k != "by_category"} | {
        "by_category": {c: round(x["accuracy"], 4) for c, x in s["by_category"].items()}} for name, s in evals.items()}
    return row


def check_run_dir(run):
    """Save the resolved config; refuse to resume a run directory made with a different config."""
    path = run.path("config.yaml")
    current = config_to_dict(run.cfg)
    if os.path.exists(path):
        with open(path) as f:
            previous = yaml.safe_load(f)
        for section in current:
            if section in ("iterations", "eval") or previous.get(section) == current[section]:
                continue
            raise ConfigError(f"run_dir {run.dir!r} holds a run made with a different {section!r} setting; "
                              "use another run_dir (--set run_dir=...) or delete that folder to start over")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(current, f, sort_keys=False)
    os.replace(tmp, path)


def run_loop(cfg):
    """The whole VisPlay run: evaluate the base, then T iterations of the five stages, resuming."""
    started = time.perf_counter()
    run = Run(cfg)
    check_run_dir(run)
    log.info("run %s: %d pool images, base %s, device %s", run.dir, len(run.pool), run.base, run.device)
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
        write_jsonl(run.path("summary.jsonl"), summaries)
    write_jsonl(run.path("summary.jsonl"), summaries)
    log.info("done in %.1f s", time.perf_counter() - started)
    print(format_summary(summaries))
    return summaries


def format_summary(summaries):
    """The run's table: per iteration, accuracy per benchmark and the question statistics."""
    lines = ["| iteration | " + " | ".join(f"{b} acc" for b in summaries[0]["eval"]) +
             " | kept | mean p kept | invalid | distinct | pairwise BLEU |",
             "|---" * (len(summaries[0]["eval"]) + 6) + "|"]
    for s in summaries:
        acc = " | ".join(f"{100 * e['accuracy']:.1f}" for e in s["eval"].values())
        fmt = (lambda v, pattern: pattern % v if v is not None else "-")
        lines.append(f"| {s['iteration']} | {acc} | {s.get('kept', '-')} | {fmt(s.get('kept_confidence_mean'), '%.2f')}"
                     f" | {fmt(s.get('invalid_rate'), '%.2f')} | {fmt(s.get('distinct_ratio'), '%.2f')}"
                     f" | {fmt(s.get('mean_pairwise_bleu'), '%.2f')} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (config.yaml is the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set questioner.lr=1e-5 (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
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
