"""VisPlay: a vision-language model improves itself from unlabeled images by playing two roles.

    python visplay.py --config config.yaml                 # the embedded default (CPU, offline)
    python visplay.py --config configs/qwen2.5-vl-3b.yaml \\
        --set model.path=/models/Qwen2.5-VL-3B-Instruct --set data.images=/data/images
    torchrun --nproc_per_node 8 visplay.py --config configs/qwen2.5-vl-7b.yaml ...   # FSDP2
    python visplay.py --config configs/vision-zero.yaml    # the second method: Vision-Zero's
                                                           # spy game (`method: vision-zero`)

One base model plays both roles: the Questioner Q writes a question about an image, the Reasoner S
answers it. Iteration i = 1..T, with Q_0 = S_0 = the base model (README, "The algorithm"):
  1. `train_questioner`   GRPO on Q_{i-1}: a question's reward is the frozen S_{i-1}'s uncertainty
                          about it minus a diversity penalty; an unparsable one gets -1.
  2. `generate_questions` Q_i writes k questions for every pool image.
  3. `label_questions`    S_{i-1} answers each n times: the majority answer is the silver label,
                          its share p the confidence; `keep_informative` keeps p_low <= p <= p_high.
  4. `train_reasoner`     GRPO on S_{i-1} over the kept questions: reward 0.9 * [matches the
                          silver label] + 0.1 * [boxed answer].
  5. `evaluate_reasoner`  greedy accuracy of S_i on the labeled benchmarks (eval.py).
Stages 1 and 4 run `train_stage`: per GRPO step, a rollout batch (`questioner_batch`,
`reasoner_batch`), then `grpo.train_step` (advantages, old and reference log-probs, the updates).

Deviations from the released code (the README gives the same list, with reasons):
- One prompt per role: the chat template's, for training, generation, scoring and labeling alike.
- Unparsable questions dropped: before labeling, instead of passed on to it.
- Failed extractions never win a vote: they are None, not the string "None".
- No lr-0 first update: the first optimizer update uses the configured learning rate.
- No extra generation: none per step beyond the rollout.
- Every pool image used: not only the first 1000 (`data.max_images` caps it).
- Resume inside a stage: from its last checkpoint or part file; a stage is done only when its
  result was written completely.
- Uncertainty scale as a knob: 1 (the paper's 1 - 2|p - 1/2|) or 0.5 (the released code's).
- One answer budget: the answers that score a question are sampled as labeling's are.
- DAPO's dynamic sampling, an option: `reasoner.dynamic_sampling` (0, off, as in the paper).
- A stopping guard: a yield under `guard.min_yield` ends the run before T (`guard.py`).

Every stage writes its result atomically into the run directory; rerunning the same command skips
the stages whose result exists and resumes an interrupted one (README, "Run directory").
Under torchrun every rank samples and scores its share of each batch; what needs the whole batch
(the diversity penalty, the loss normalisation, the metrics) is gathered.
"""

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.contrib.logging import logging_redirect_tqdm

import checkpoint
import distributed
import guard
from answers import extract_boxed, infer_answer_type, majority_vote
from config import ConfigError, load_config
from data import atomic_path, load_image, read_jsonl, write_jsonl
from distributed import gathered, my_part
from eval import evaluate_reasoner
from grpo import RolloutBatch, dynamic_sampling, train_step
from models.inputs import special_tokens
from rewards import diversity_penalty, questioner_reward, reasoner_reward
from roles import parse_question, questioner_prompt, reasoner_prompt
from run import Run, draw, free_memory, seed_for
from sampler import Sampling, decode, rollout
from summary import format_summary, iteration_summary
from tracking import progress, time_left

log = logging.getLogger("visplay")


# ----------------------------------------------------------------------------
# The reasoner's votes and the step's diversity penalty (the questioner's reward needs both)


@dataclass
class Query:
    """One question put to the reasoner: the image it is about, its text, its options."""
    image: object                 # a PIL image
    question: str
    choices: list[str] | None     # the option texts when the question lists them


@dataclass
class Vote:
    """The reasoner's sampled answers to one question, and their majority vote."""
    answers: list                 # the last boxed answer of each sample (None: no box)
    silver_answer: str | None     # the majority answer (None: no sample had a valid answer)
    confidence: float             # p: the majority's share of the samples


def answer_votes(reasoner, processor, queries, *, samples, sampling, limits, generator):
    """The reasoner answers each `Query` `samples` times; majority vote over the boxed answers
    (`answers.majority_vote`). Returns a `Vote` per query."""
    if not queries:
        return []
    tokens = special_tokens(processor, reasoner)
    prompts = [reasoner_prompt(processor, query.image, query.question) for query in queries]
    sampled = rollout(reasoner, prompts, group_size=samples, sampling=sampling, tokens=tokens,
                      limits=limits, generator=generator)
    texts = decode(processor, sampled.completion_ids, sampled.completion_mask)
    answers = [extract_boxed(text) for text in texts]
    votes = []
    for i, query in enumerate(queries):
        mine = answers[i * samples:(i + 1) * samples]
        silver_answer, confidence = majority_vote(mine, query.choices)
        votes.append(Vote(mine, silver_answer, confidence))
    return votes


def step_diversity_penalty(local_questions, threshold):
    """Diversity penalty of this rank's questions, clustered with the questions of EVERY rank."""
    per_rank = distributed.all_gather_list([list(local_questions)])
    offset = sum(len(questions) for questions in per_rank[:distributed.rank()])
    everyone = [q for questions in per_rank for q in questions]
    return diversity_penalty(everyone, threshold)[offset:offset + len(local_questions)]


# ----------------------------------------------------------------------------
# The GRPO stages (steps 1 and 4)


def policy_rollout(run, iteration, role, step, *, policy, processor, tokens, prompts, more=0):
    """G completions per prompt from a role's policy with its stage's sampling settings, and
    their texts: the rollout of one GRPO step (more: a dynamic-sampling round's, drawn apart)."""
    settings = getattr(run.cfg, role)
    sampling = Sampling(settings.temperature, settings.top_p, settings.top_k,
                        settings.max_new_tokens)
    stream = (iteration, role, step, more) if more else (iteration, role, step)
    with gathered(policy):
        sampled = rollout(policy, prompts, group_size=settings.group_size, sampling=sampling,
                          tokens=tokens, limits=run.limits(settings.rollout_batch_size),
                          generator=run.generator(*stream))
    return sampled, decode(processor, sampled.completion_ids, sampled.completion_mask)


def questioner_batch(run, iteration, *, reasoner, policy, processor, tokens, step):
    """Step 1's rollout batch: the questioner writes G questions per pool image; the frozen
    reasoner answers each valid one m times (`answer_votes`); a question's reward is the
    reasoner's uncertainty about it minus the diversity penalty (`rewards.questioner_reward`)."""
    settings = run.cfg.questioner
    started = time.perf_counter()
    indices = draw(seed_for(run.cfg.seed, iteration, "questioner-images", step), len(run.pool),
                   settings.prompts_per_step)
    images = run.pool.load_many(my_part(indices, blocks=settings.updates_per_step))
    prompts = [questioner_prompt(processor, image) for image in images]
    sampled, texts = policy_rollout(run, iteration, "questioner", step, policy=policy,
                                    processor=processor, tokens=tokens, prompts=prompts)
    questions = [parse_question(text) for text in texts]
    seconds_sampling = time.perf_counter() - started

    started = time.perf_counter()
    valid = [i for i, question in enumerate(questions) if question is not None]
    prompt_of = sampled.prompt_index.tolist()
    labeling = run.cfg.labeling  # the votes that score a question are sampled as labeling's
    answer_sampling = Sampling(labeling.temperature, labeling.top_p, 0, labeling.max_new_tokens)
    queries = [Query(images[prompt_of[i]], questions[i].question, questions[i].choices)
               for i in valid]
    with run.in_use(reasoner):
        votes = answer_votes(reasoner, processor, queries,
                             samples=settings.answer_samples, sampling=answer_sampling,
                             limits=run.limits(settings.rollout_batch_size),
                             generator=run.generator(iteration, "questioner-answers", step))
    confidence = {i: vote.confidence for i, vote in zip(valid, votes)}
    penalty = step_diversity_penalty([question.question if question else ""
                                      for question in questions], settings.diversity_threshold)
    rewards = torch.tensor([
        questioner_reward(question is not None, confidence.get(i), float(penalty[i]),
                          uncertainty_scale=settings.uncertainty_scale,
                          diversity_weight=settings.diversity_weight,
                          invalid_reward=settings.invalid_reward)
        for i, question in enumerate(questions)])
    unboxed = sum(answer is None for vote in votes for answer in vote.answers)
    valid_count, count, confidence_sum, penalty_sum, unboxed = distributed.all_reduce_sum(
        [len(valid), len(questions), sum(confidence.values()), float(penalty.sum()), unboxed])
    metrics = {"invalid_rate": 1 - valid_count / count,
               "confidence_mean": confidence_sum / max(valid_count, 1),
               # answers cut off by the token budget have no box: their share, to watch the budget
               "unboxed_rate": unboxed / max(valid_count * settings.answer_samples, 1),
               "diversity_penalty_mean": penalty_sum / count,
               "seconds_sampling": seconds_sampling,
               "seconds_scoring": time.perf_counter() - started}
    return RolloutBatch(prompts, sampled, rewards, metrics=metrics)


def reasoner_batch(run, iteration, *, kept, order, policy, processor, tokens, step):
    """Step 4's rollout batch: the reasoner answers G times each kept question of the step; reward
    0.9 * [boxed answer equals the silver answer] + 0.1 * [boxed] (`rewards.reasoner_reward`).
    With `reasoner.dynamic_sampling` n > 0 (DAPO's; off in the paper), groups whose rewards are
    all equal are dropped and up to n more rounds of questions drawn (`grpo.dynamic_sampling`)."""
    settings, model_settings = run.cfg.reasoner, run.cfg.model
    per_step = settings.prompts_per_step

    def answered(questions, more=0):
        started = time.perf_counter()
        rows = my_part([kept[i] for i in questions], blocks=settings.updates_per_step)
        prompts = [reasoner_prompt(processor, load_image(row["image"], model_settings.min_pixels,
                                                         model_settings.max_pixels),
                                   row["question"])
                   for row in rows]
        sampled, texts = policy_rollout(run, iteration, "reasoner", step, policy=policy,
                                        processor=processor, tokens=tokens, prompts=prompts,
                                        more=more)
        seconds_sampling = time.perf_counter() - started

        started = time.perf_counter()
        rewards = torch.tensor([
            reasoner_reward(text, rows[p]["silver_answer"], rows[p]["choices"],
                            accuracy_weight=settings.accuracy_weight,
                            format_weight=settings.format_weight)
            for text, p in zip(texts, sampled.prompt_index.tolist())])
        metrics = {"seconds_sampling": seconds_sampling,
                   "seconds_scoring": time.perf_counter() - started}
        return RolloutBatch(prompts, sampled, rewards, metrics=metrics)

    def refill(more):  # dynamic sampling's round `more`: further questions, drawn apart
        return answered(draw(seed_for(run.cfg.seed, iteration, "reasoner-questions", step, more),
                             len(kept), per_step), more)

    batch = answered(order[step * per_step:(step + 1) * per_step])
    if not settings.dynamic_sampling:
        return batch
    return dynamic_sampling(batch, refill, rounds=settings.dynamic_sampling,
                            updates_per_step=settings.updates_per_step, pad_id=tokens.pad_id)


def train_stage(run, role, iteration, *, start_path, out_path, make_batch):
    """One role's GRPO stage: from the weights at start_path to a save_pretrained folder at
    out_path, `steps` GRPO steps, resumable.

    make_batch(policy=, processor=, tokens=, step=) -> `grpo.RolloutBatch` samples and rewards
    this rank's share of step `step` (`questioner_batch` or `reasoner_batch`, their other
    arguments bound). `Run.open_stage` loads the policy, its frozen reference and optimizer and
    resumes from the newest complete checkpoint (RUN/checkpoints/<out folder name>/, written
    every `save_every` steps).
    """
    settings = getattr(run.cfg, role)
    stage = run.open_stage(settings, start_path=start_path, out_path=out_path,
                           label=f"iter {iteration} {role}")
    policy, tokens = stage.learner.policy, stage.learner.tokens
    run.restart_metrics(iteration, role, from_step=stage.start)
    bar = progress(settings.steps, stage.start, f"iter {iteration} {role}",
                   show=distributed.is_main())
    for step in range(stage.start, settings.steps):
        with run.autocast():  # bf16 compute of the fp32 policy: weights cast once per rollout
            batch = make_batch(policy=policy, processor=stage.processor, tokens=tokens, step=step)
        if run.device.type == "cuda":  # the rollout's KV cache blocks, back for training's shapes
            torch.cuda.empty_cache()
        metrics = train_step(stage.learner, batch, settings)
        metrics.update(batch.metrics, iteration=iteration, stage=role, step=step)
        run.log_metrics(metrics)
        log.info("[iter %d %s %d/%d] reward %.3f±%.3f  kl %.4f  entropy %.2f  len %.1f  grad %.3f"
                 "  time sample %.1fs score %.1fs train %.1fs", iteration, role, step + 1,
                 settings.steps, metrics["reward_mean"], metrics["reward_std"], metrics["kl"],
                 metrics["entropy"], metrics["response_length_mean"], metrics["grad_norm"],
                 metrics["seconds_sampling"], metrics["seconds_scoring"],
                 metrics["seconds_training"])
        stage.save(step + 1)
        bar.update(1)
    bar.close()
    stage.finish()


def train_questioner(run, iteration, *, questioner_path, reasoner_path, out_path):
    """Step 1: GRPO on the questioner against the frozen reasoner of the previous iteration."""
    reasoner, _ = run.load_model(reasoner_path, trainable=False, park=True)
    train_stage(run, "questioner", iteration, start_path=questioner_path, out_path=out_path,
                make_batch=partial(questioner_batch, run, iteration, reasoner=reasoner))


def train_reasoner(run, iteration, *, reasoner_path, kept_path, out_path):
    """Step 4: GRPO on the reasoner over the kept questions and their silver labels."""
    kept = read_jsonl(kept_path)
    if not kept:
        log.warning("[iter %d reasoner] no question passed the informative filter: "
                    "S_%d = S_%d unchanged", iteration, iteration, iteration - 1)
        if distributed.is_main():
            with atomic_path(out_path) as tmp:
                shutil.copytree(reasoner_path, tmp)
        distributed.barrier()
        return
    settings = run.cfg.reasoner
    order = draw(seed_for(run.cfg.seed, iteration, "reasoner-questions"), len(kept),
                 settings.steps * settings.prompts_per_step)
    train_stage(run, "reasoner", iteration, start_path=reasoner_path, out_path=out_path,
                make_batch=partial(reasoner_batch, run, iteration, kept=kept, order=order))


# ----------------------------------------------------------------------------
# Questions and silver labels (steps 2 and 3; step 5 is `eval.evaluate_reasoner`)


def generate_questions(run, iteration, *, questioner_path, out_path):
    """Step 2: the trained questioner writes k questions per pool image -> questions_v{i}.jsonl."""
    settings = run.cfg.generation
    model, processor = run.load_model(questioner_path, trainable=False)
    tokens = special_tokens(processor, model)
    sampling = Sampling(settings.temperature, settings.top_p, 0, settings.max_new_tokens)

    def work(chunk):
        first = chunk * settings.batch_size
        loaded = [(i, run.pool.load(i))
                  for i in range(first, min(first + settings.batch_size, len(run.pool)))]
        indices = [i for i, image in loaded if image is not None]
        if not indices:
            return []
        prompts = [questioner_prompt(processor, image) for _, image in loaded if image is not None]
        sampled = rollout(model, prompts, group_size=settings.questions_per_image,
                          sampling=sampling, tokens=tokens,
                          limits=run.limits(settings.batch_size),
                          generator=run.generator(iteration, "generate", chunk))
        rows = []
        texts = decode(processor, sampled.completion_ids, sampled.completion_mask)
        for row, text in enumerate(texts):
            index = indices[sampled.prompt_index[row]]
            parsed = parse_question(text)
            rows.append({"image": run.pool.paths[index], "image_index": index, "raw": text,
                         "valid": parsed is not None, "type": parsed.type if parsed else None,
                         "question": parsed.question if parsed else None,
                         "questioner_answer": parsed.answer if parsed else None,
                         "choices": parsed.choices if parsed else None})
        return rows

    with gathered(model):
        rows = checkpoint.in_parts(out_path, -(-len(run.pool) // settings.batch_size), work)
    if distributed.is_main():
        write_jsonl(out_path, rows)
        invalid = sum(not r["valid"] for r in rows)
        log.info("[iter %d generate] %d questions for %d images, %.1f%% invalid", iteration,
                 len(rows), len(run.pool), 100 * invalid / max(len(rows), 1))
    checkpoint.done_parts(out_path)


def keep_informative(labeled, p_low, p_high, p_low_yes_no=None):
    """The informative filter: the labeled questions with a silver answer whose confidence p lies
    in [p_low, p_high]. Too-confident questions teach nothing; too-scattered ones carry noisy
    labels. A yes/no silver answer needs p >= p_low_yes_no instead (when given): a wrong yes/no
    label has no lucky hits, its reward is exactly as good as the label."""
    def low(row):  # the answer type is read only when a floor is set
        if p_low_yes_no is not None and infer_answer_type(str(row["silver_answer"])) == "yes_no":
            return p_low_yes_no
        return p_low

    return [row for row in labeled
            if row["silver_answer"] is not None and low(row) <= row["confidence"] <= p_high]


def label_questions(run, iteration, *, reasoner_path, questions_path, labeled_path, kept_path):
    """Step 3: silver labels by majority vote of the frozen reasoner, then `keep_informative`."""
    settings, model_settings = run.cfg.labeling, run.cfg.model
    rows = [r for r in read_jsonl(questions_path) if r["valid"]]
    model, processor = run.load_model(reasoner_path, trainable=False)
    sampling = Sampling(settings.temperature, settings.top_p, 0, settings.max_new_tokens)

    def work(chunk):
        queries, readable = [], []
        for r in rows[chunk * settings.batch_size:(chunk + 1) * settings.batch_size]:
            try:
                image = load_image(r["image"], model_settings.min_pixels, model_settings.max_pixels)
            except ValueError as error:
                log.warning("labeling skipped a question: %s", error)
                continue
            queries.append(Query(image, r["question"], r["choices"]))
            readable.append(r)
        votes = answer_votes(model, processor, queries,
                             samples=settings.answers_per_question, sampling=sampling,
                             limits=run.limits(settings.batch_size),
                             generator=run.generator(iteration, "label", chunk))
        return [{**r, "answers": vote.answers, "silver_answer": vote.silver_answer,
                 "confidence": vote.confidence} for r, vote in zip(readable, votes)]

    with gathered(model):
        labeled = checkpoint.in_parts(labeled_path, -(-len(rows) // settings.batch_size), work)
    if distributed.is_main():
        kept = keep_informative(labeled, settings.p_low, settings.p_high, settings.p_low_yes_no)
        write_jsonl(labeled_path, labeled)
        write_jsonl(kept_path, kept)  # last: its existence marks the stage done
        note = "" if settings.p_low_yes_no is None else f"; yes/no p >= {settings.p_low_yes_no:.2f}"
        log.info("[iter %d label] %d labeled, %d kept (p in [%.2f, %.2f]%s)", iteration,
                 len(labeled), len(kept), settings.p_low, settings.p_high, note)
    checkpoint.done_parts(labeled_path)


# ----------------------------------------------------------------------------
# The loop and the command line


STEP_NAMES = ["questioner stage", "question generation", "silver labels", "reasoner stage",
              "evaluation"]


def run_loop(cfg):
    """The whole VisPlay run: evaluate the base, then T iterations of the five steps, resuming.
    A finished output that is not what the run wrote is made again, with all that follows it
    (`checkpoint.check_outputs`)."""
    started = time.perf_counter()
    run = Run(cfg)
    run.check_config()
    log.info("run %s: %d pool images, base %s, device %s, %d process(es)", run.dir, len(run.pool),
             run.base, run.device, distributed.world_size())
    checkpoint.check_outputs(run.dir, [name for i in range(cfg.iterations + 1)
                                       for outputs in checkpoint.step_outputs(i)
                                       for name in outputs])
    if not os.path.exists(run.path("eval_v0.json")):
        evaluate_reasoner(run, 0, reasoner_path=run.base, out_path=run.path("eval_v0.json"))
        checkpoint.record_outputs(run.dir, checkpoint.step_outputs(0)[0])
        free_memory()
    else:
        log.info("[iter 0] eval_v0.json exists: the base's evaluation is reused")
    summaries = [iteration_summary(run.dir, 0, run.truth)]
    durations = {}  # {step name: [seconds, ...]} of the steps this process ran: the time left
    for i in range(1, cfg.iterations + 1):
        questioner_before = run.base if i == 1 else run.path(f"questioner_v{i - 1}")
        reasoner_before = run.base if i == 1 else run.path(f"reasoner_v{i - 1}")
        steps = [  # the five steps, each given the file or folder that marks it done
            lambda out: train_questioner(
                run, i, questioner_path=questioner_before, reasoner_path=reasoner_before,
                out_path=out),
            lambda out: generate_questions(
                run, i, questioner_path=run.path(f"questioner_v{i}"), out_path=out),
            lambda out: label_questions(
                run, i, reasoner_path=reasoner_before,
                questions_path=run.path(f"questions_v{i}.jsonl"),
                labeled_path=run.path(f"labeled_v{i}.jsonl"), kept_path=out),
            lambda out: train_reasoner(
                run, i, reasoner_path=reasoner_before, kept_path=run.path(f"kept_v{i}.jsonl"),
                out_path=out),
            lambda out: evaluate_reasoner(
                run, i, reasoner_path=run.path(f"reasoner_v{i}"), out_path=out),
        ]
        stop = None
        for k, (outputs, step) in enumerate(zip(checkpoint.step_outputs(i), steps)):
            if k == 3 and (stop := guard.after_labels(run.dir, i, cfg.guard.min_yield)):
                break  # too few questions left to train on
            out = run.path(outputs[-1])
            if os.path.exists(out):
                log.info("[iter %d] %s exists: stage skipped", i, outputs[-1])
                continue
            remaining = STEP_NAMES[k:] + STEP_NAMES * (cfg.iterations - i)
            log.info("[iteration %d of %d, stage %d of 5: %s] %s", i, cfg.iterations, k + 1,
                     STEP_NAMES[k], time_left(durations, remaining))
            began = time.perf_counter()
            step(out)
            durations.setdefault(STEP_NAMES[k], []).append(time.perf_counter() - began)
            checkpoint.record_outputs(run.dir, outputs)
            free_memory()  # the stage's models, before the next stage loads its own
        checkpoint.clean_leftovers(run.dir, i)
        if stop is None:
            summaries.append(iteration_summary(run.dir, i, run.truth))
            stop = guard.eval_drop(summaries, cfg.guard.max_eval_drop)
        if distributed.is_main():
            write_jsonl(run.path("summary.jsonl"), summaries)
        run.log_summaries(summaries)
        if stop:
            log.warning(stop)
            break
    run.close_logging()
    if distributed.is_main():
        log.info("done in %.1f s", time.perf_counter() - started)
        print(format_summary(summaries) + (f"\n\n{stop}" if stop else ""))
    return summaries


def main(argv=None):
    """Command line: load the config, run the loop. A user error (the config, a path it names)
    ends with one line `error: ...` and exit status 2."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (config.yaml is the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set questioner.lr=1e-5 (repeatable)")
    args = parser.parse_args(argv)
    quiet = int(os.environ.get("RANK", "0")) != 0  # under torchrun only rank 0 reports progress
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        cfg = load_config(args.config, args.set)
        torch.manual_seed(cfg.seed)
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            if cfg.method == "vision-zero":  # the spy game (vision_zero/train.py)
                from vision_zero.train import run_game
                run_game(cfg)
            else:
                run_loop(cfg)
        distributed.close()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
