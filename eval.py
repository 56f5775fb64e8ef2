"""Evaluate checkpoints on labeled benchmarks: greedy answers graded by the rules of `answers.py`.

    python eval.py --model RUN/embedded/base --model RUN/reasoner_v1 --model RUN/reasoner_v3 \\
        --bench mmmu=/data/mmmu/validation.jsonl --bench hallusion=/data/HallusionBench.json \\
        --out RUN/eval

prints one markdown table (rows: each benchmark and benchmark/category; columns: each checkpoint's
accuracy in %, then each later checkpoint's difference to the first in points) and, with --out,
writes OUT/<checkpoint>/<benchmark>.jsonl (one graded row per item) and OUT/summary.json.
Benchmark files are read by `benchmark_files.load_benchmark` (the layouts are listed there and in
docs/evaluation.md). The run loop evaluates every checkpoint with `evaluate_reasoner` (README,
step 5), which runs `evaluate` on each of the run's benchmarks.

Greedy decoding goes through the project's sampler (`sampler.rollout`), one prompt batch at a time;
the prompt is the reasoner's training prompt (`roles.reasoner_prompt`), options listed "A. text"
per line. An optional judge (`--judge-url`, an OpenAI-compatible endpoint) regrades free-form
answers that the rules call wrong; it is never needed and off by default.
"""

import argparse
import io
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from tqdm import tqdm

import distributed
from answers import OPTION_LETTERS, answer_correct, extract_answer, majority_vote, parse_choices
from benchmark_files import LAYOUTS, load_benchmark
from data import load_image, write_json, write_jsonl
from models.inputs import special_tokens
from models.load import check_model_dir, load_vlm
from roles import reasoner_prompt
from run import seed_for
from sampler import Limits, Sampling, decode, rollout

log = logging.getLogger("visplay")

# ----------------------------------------------------------------------------
# Answering and grading


@dataclass
class EvalSetting:
    """How `evaluate` answers a benchmark."""
    min_pixels: int               # images resized into [min_pixels, max_pixels] (`data.fit_pixels`)
    max_pixels: int
    max_new_tokens: int = 1024
    batch_size: int = 32          # items whose prompts are built and answered together
    samples: int = 0              # k > 0: also k sampled answers per item at temperature 1
                                  # (pass@1, majority@k, pass@k)
    seed: int = 0                 # the sampled answers' generator
    limits: Limits = field(default_factory=Limits)  # the sampler's memory bounds (its
                                                    # max_prompts is each batch's size)


def format_question(item):
    """The question shown to the model: options appended as "A. text" lines, unless listed."""
    if item.choices and parse_choices(item.question) is None:
        return item.question + "".join(f"\n{OPTION_LETTERS[i]}. {text}"
                                       for i, text in enumerate(item.choices))
    return item.question


def generate(model, processor, prompts, *, group_size, sampling, tokens, limits, generator=None):
    """Texts of `group_size` completions per prompt (prompt i's at i*G .. i*G+G-1): the boundary
    between the model and grading (tests replace it with fixed texts)."""
    sampled = rollout(model, prompts, group_size=group_size, sampling=sampling, tokens=tokens,
                      limits=limits, generator=generator)
    return decode(processor, sampled.completion_ids, sampled.completion_mask)


def grade_item(item, text, sampled_texts=None, judge=None):
    """One result row: the prediction, its extracted answer and whether it is correct.

    judge(question, reference, prediction) -> bool | None regrades a free-form answer the rules
    reject.
    """
    extracted = extract_answer(text, item.choices)
    row = {"id": item.id, "category": item.category, "answer_type": item.answer_type,
           "question": item.question, "answer": item.answer, "prediction": text,
           "extracted": extracted,
           "correct": answer_correct(extracted, item.answer, item.choices, item.answer_type)}
    if judge is not None and not row["correct"] and item.answer_type == "free_form" and extracted:
        row["judge"] = judge(item.question, item.answer, extracted)
        row["correct"] = bool(row["judge"])
    if sampled_texts is not None:
        votes = [extract_answer(t, item.choices) for t in sampled_texts]
        row["sample_correct"] = [answer_correct(v, item.answer, item.choices, item.answer_type)
                                 for v in votes]
        majority, _ = majority_vote(votes, item.choices)
        row["majority_correct"] = answer_correct(majority, item.answer, item.choices,
                                                 item.answer_type)
    return row


@torch.no_grad()
def evaluate(model, processor, items, setting, *, judge=None, report=None, progress=True):
    """Greedy answer per item (and, with setting.samples = k > 0, k sampled answers at temperature
    1), graded. setting: an `EvalSetting`.

    Returns one `grade_item` row per item. Prompts are built and answered setting.batch_size at a
    time, so only one batch of images is in memory. An item whose image fails to load is logged,
    skipped and counted in `report` (a Counter, optional) under "unreadable image". judge: see
    `grade_item`. progress: a tqdm bar over the items (drawn only on a terminal).
    """
    model.eval()
    tokens = special_tokens(processor, model)
    batch_size, samples = setting.batch_size, setting.samples
    greedy = Sampling(0.0, 1.0, 0, setting.max_new_tokens)
    at_temperature_one = Sampling(1.0, 1.0, 0, setting.max_new_tokens)
    generator = None
    if samples:
        generator = torch.Generator(next(model.parameters()).device).manual_seed(setting.seed)
    results = []
    bar = tqdm(total=len(items), desc="eval", unit="item", disable=None if progress else True)
    for start in range(0, len(items), batch_size):
        kept, prompts = [], []
        for item in items[start:start + batch_size]:
            try:
                images = [load_image(io.BytesIO(s) if isinstance(s, bytes) else s,
                                     setting.min_pixels, setting.max_pixels)
                          for s in item.images]
            except ValueError as error:
                log.warning("benchmark item %s skipped: %s", item.id, error)
                if report is not None:
                    report["unreadable image"] += 1
                continue
            prompts.append(reasoner_prompt(processor, images, format_question(item)))
            kept.append(item)
        if prompts:
            limits = replace(setting.limits, max_prompts=len(prompts))
            texts = generate(model, processor, prompts, group_size=1, sampling=greedy,
                             tokens=tokens, limits=limits)
            votes = None
            if samples:
                votes = generate(model, processor, prompts, group_size=samples,
                                 sampling=at_temperature_one, tokens=tokens, limits=limits,
                                 generator=generator)
            results += [grade_item(item, texts[i],
                                   votes[i * samples:(i + 1) * samples] if samples else None, judge)
                        for i, item in enumerate(kept)]
        bar.update(min(batch_size, len(items) - start))
    bar.close()
    return results


def judge_equivalent(question, reference, prediction, *, url, model, api_key=None, timeout=30):
    """Ask an OpenAI-compatible chat endpoint whether `prediction` answers `question` as
    `reference` does.

    url: the server ("http://host:8000", ".../v1") or its full ".../chat/completions" address.
    Returns True / False from the reply's first word (yes / no), None when there is no clear
    verdict or the request fails (logged). Standard library only.
    """
    url = url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    content = (f"Question: {question}\nReference answer: {reference}\n"
               f"Candidate answer: {prediction}\n"
               "Does the candidate answer mean the same as the reference answer? "
               "Reply with yes or no only.")
    body = json.dumps({"model": model, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, body, headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.load(response)["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as error:
        log.warning("judge request to %s failed: %s", url, error)
        return None
    verdict = re.match(r"\W*(yes|no)\b", reply.lower())
    return None if verdict is None else verdict.group(1) == "yes"

# ----------------------------------------------------------------------------
# Summaries and the comparison table


def summarize(results):
    """Accuracy overall and per category (and pass@1 / majority@k / pass@k when sampled answers
    exist: the mean share of right samples, the vote's accuracy, any sample right)."""
    def score(rows):
        out = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1)}
        if rows and "sample_correct" in rows[0]:
            per_item = [sum(r["sample_correct"]) / len(r["sample_correct"]) for r in rows]
            out["pass@1"] = sum(per_item) / len(rows)
            out["majority@k"] = sum(r["majority_correct"] for r in rows) / len(rows)
            out["pass@k"] = sum(any(r["sample_correct"]) for r in rows) / len(rows)
        return out

    summary = score(results)
    categories = sorted({r["category"] for r in results})
    summary["by_category"] = {c: score([r for r in results if r["category"] == c])
                              for c in categories}
    return summary


def format_table(summaries, skipped=None):
    """Markdown table comparing checkpoints.

    summaries: {checkpoint: {benchmark: summarize(...) output}}; skipped: {benchmark: rows skipped}.
    Rows: each benchmark, its categories (when it has more than the default "all"), and the mean
    over benchmarks when there are several. Columns: n (items graded, first checkpoint), skipped,
    each checkpoint's accuracy in %, then "Δ name" = name's accuracy minus the first's, in points.
    """
    names = list(summaries)
    first = summaries[names[0]]
    header = ["benchmark", "n", "skipped"] + names + [f"Δ {name}" for name in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, n, skip, pick):
        values = [pick(summaries[name]) for name in names]
        cells = ["-" if v is None else f"{100 * v:.1f}" for v in values]
        deltas = ["-" if v is None or values[0] is None else f"{100 * (v - values[0]):+.1f}"
                  for v in values[1:]]
        lines.append("| " + " | ".join([label, str(n), skip] + cells + deltas) + " |")

    for bench in first:
        row(bench, first[bench]["n"], str((skipped or {}).get(bench, 0)),
            lambda s, b=bench: s[b]["accuracy"] if b in s else None)
        categories = first[bench]["by_category"]
        if list(categories) != ["all"]:
            for category, score in categories.items():
                row(f"{bench}/{category}", score["n"], "",
                    lambda s, b=bench, c=category: s[b]["by_category"][c]["accuracy"]
                    if b in s and c in s[b]["by_category"] else None)
    def average(summary):
        if not all(b in summary for b in first):
            return None
        return sum(summary[b]["accuracy"] for b in first) / len(first)

    if len(first) > 1:
        row("average", sum(s["n"] for s in first.values()), str(sum((skipped or {}).values())),
            average)
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# The loop's evaluation step


def evaluate_reasoner(run, iteration, *, reasoner_path, out_path):
    """Step 5: greedy accuracy (and sampled pass@1 / majority@k) of a reasoner on every
    benchmark -> eval_v{i}.json, and one graded row per item -> eval_v{i}_items.jsonl.

    run: the `run.Run` (its config's eval and model settings, its benchmarks and what reading
    them skipped). Each rank answers its share of every benchmark; rank 0 writes the graded rows
    of all. Each benchmark's summary also counts the rows skipped, by reason ("skipped").
    """
    settings, model_settings = run.cfg.eval, run.cfg.model
    model, processor = run.load_model(reasoner_path, trainable=False)
    setting = EvalSetting(model_settings.min_pixels, model_settings.max_pixels,
                          settings.max_new_tokens, settings.batch_size, settings.samples,
                          seed=seed_for(run.cfg.seed, "eval", distributed.rank()),
                          limits=run.limits(settings.batch_size))
    summaries, items_rows = {}, []
    for name, items in run.benchmarks.items():
        items = items[:settings.max_items] if settings.max_items else items
        unreadable = Counter()
        with distributed.gathered(model):
            mine = evaluate(model, processor, distributed.my_part(items), setting,
                            report=unreadable, progress=distributed.is_main())
        results = distributed.all_gather_list(mine)
        summaries[name] = summarize(results)
        # the rows skipped, by reason: when the file was read, and images that failed here
        skipped = dict(run.benchmark_reports.get(name, {}).get("bad", {}))
        failed = int(distributed.all_reduce_sum(float(unreadable["unreadable image"])))
        if failed:
            skipped["unreadable at evaluation"] = failed
        summaries[name]["skipped"] = skipped
        items_rows += [{"benchmark": name, **r} for r in results]
        log.info("[iter %d eval] %s: accuracy %.1f%% (%d items)", iteration, name,
                 100 * summaries[name]["accuracy"], len(results))
    if distributed.is_main():
        write_jsonl(out_path.replace(".json", "_items.jsonl"), items_rows)
        write_json(out_path, summaries)
    distributed.barrier()


# ----------------------------------------------------------------------------
# The command line


def checkpoint_names(paths):
    """Short unique names of checkpoint folders: the folder name, or parent_folder when names
    repeat."""
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    if len(set(names)) < len(names):
        names = [os.path.normpath(p).strip(os.sep).replace(os.sep, "_") for p in paths]
    return names


def _pairs(specs, flag):
    pairs = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} {spec!r}: expected NAME=VALUE")
        pairs[name] = value
    return pairs


def main(argv=None):
    """Command line: evaluate each --model on each --bench, print the table, write --out."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True,
                        help="checkpoint folder (repeat to compare)")
    parser.add_argument("--bench", action="append", required=True,
                        help="NAME=PATH of a benchmark file (repeat)")
    parser.add_argument("--layout", action="append",
                        help=f"NAME=LAYOUT, LAYOUT one of {', '.join(LAYOUTS)}")
    parser.add_argument("--out", help="folder for per-item results and summary.json")
    parser.add_argument("--max-items", type=int,
                        help="evaluate only the first N items of each benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-pixels", type=int, default=512 * 512)
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--judge-url",
                        help="OpenAI-compatible server that regrades free-form answers "
                             "(off by default)")
    parser.add_argument("--judge-model",
                        help="model name sent to the judge; its key is read from $JUDGE_API_KEY")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths, layouts = _pairs(args.bench, "--bench"), _pairs(args.layout, "--layout")
    if unknown := set(layouts) - set(paths):
        raise SystemExit(f"--layout names {sorted(unknown)} match no --bench "
                         f"(benchmarks: {sorted(paths)})")
    if args.judge_url and not args.judge_model:
        raise SystemExit("--judge-url needs --judge-model")
    judge = None
    if args.judge_url:
        judge = partial(judge_equivalent, url=args.judge_url, model=args.judge_model,
                        api_key=os.environ.get("JUDGE_API_KEY"))
    benches, reports = {}, {}
    try:  # every path is checked before the first model is loaded
        for path in args.model:
            check_model_dir(path)
        for name, path in paths.items():
            reports[name] = {}
            items = load_benchmark(path, layouts.get(name, "auto"), reports[name])
            benches[name] = items[:args.max_items]
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    setting = EvalSetting(args.min_pixels, args.max_pixels, args.max_new_tokens, args.batch_size)
    summaries = {}
    skipped = {name: sum(report["bad"].values()) for name, report in reports.items()}
    for name, path in zip(checkpoint_names(args.model), args.model):
        model, processor = load_vlm(path, dtype=dtype, device=args.device)
        summaries[name] = {}
        for bench, items in benches.items():
            unreadable = Counter()
            results = evaluate(model, processor, items, setting, judge=judge, report=unreadable)
            summaries[name][bench] = summarize(results)
            reports[bench]["unreadable at evaluation"] = unreadable["unreadable image"]
            skipped[bench] = sum(reports[bench]["bad"].values()) + unreadable["unreadable image"]
            if args.out:
                os.makedirs(os.path.join(args.out, name), exist_ok=True)
                write_jsonl(os.path.join(args.out, name, f"{bench}.jsonl"), results)
        del model
    table = format_table(summaries, skipped)
    print(table)
    if args.out:
        write_json(os.path.join(args.out, "summary.json"),
                   {"checkpoints": dict(zip(summaries, args.model)), "benchmarks": reports,
                    "results": summaries, "table": table})
    return summaries


if __name__ == "__main__":
    main()
