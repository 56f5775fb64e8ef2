"""Evaluate a checkpoint on labeled benchmarks: greedy answers graded by the rules of `rewards.py`.

Benchmark file: JSONL, one item per line:
  {"id": "...", "image": "path/relative/to/the/file.png", "question": "...", "answer": "...",
   "choices": ["option A text", ...] (optional), "category": "..." (optional)}

    python eval.py --model RUN/solver_v1 --bench toy=RUN/embedded/benchmark.jsonl
"""

import argparse
import json
import logging
import os
from dataclasses import dataclass

import torch

from data import iter_jsonl, load_image
from grpo import Sampling, decode, rollout, special_tokens
from rewards import answers_equivalent, extract_boxed, majority_vote
from roles import reasoner_prompt

log = logging.getLogger("visplay")


@dataclass
class Item:
    id: str
    image: str                    # absolute path
    question: str
    answer: str
    choices: list[str] | None = None
    category: str = "all"


def load_benchmark(path):
    """Items of a benchmark JSONL. Rows without image/question/answer are counted and skipped."""
    base = os.path.dirname(os.path.abspath(path))
    items, bad = [], 0
    for number, row in iter_jsonl(path):
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("image", "question", "answer")):
            bad += 1
            log.warning("%s:%d: skipped (needs non-empty image, question and answer)", path, number)
            continue
        items.append(Item(str(row.get("id", number)), os.path.join(base, row["image"]), row["question"],
                          row["answer"], row.get("choices"), str(row.get("category", "all"))))
    if not items:
        raise ValueError(f"benchmark {path} has no usable items ({bad} bad rows)")
    return items


@torch.no_grad()
def evaluate(model, processor, items, min_pixels, max_pixels, max_new_tokens=1024, batch_size=32,
             samples=0, seed=0):
    """Greedy answer per item (and, with samples=k > 0, k sampled answers at temperature 1).

    Returns one dict per item: prediction text, extracted answer, correct, and with samples the
    per-sample correctness and whether the majority answer is correct.
    """
    model.eval()
    tokens = special_tokens(processor, model)
    results, prompts, kept = [], [], []
    for item in items:
        try:
            image = load_image(item.image, min_pixels, max_pixels)
        except ValueError as error:
            log.warning("benchmark item %s skipped: %s", item.id, error)
            continue
        prompts.append(reasoner_prompt(processor, image, item.question))
        kept.append(item)
    greedy = rollout(model, prompts, 1, Sampling(0.0, 1.0, 0, max_new_tokens), tokens, batch_size)
    texts = decode(processor, greedy.completion_ids, greedy.completion_mask)
    if samples:
        generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
        sampled = rollout(model, prompts, samples, Sampling(1.0, 1.0, 0, max_new_tokens), tokens, batch_size,
                          generator)
        sampled_texts = decode(processor, sampled.completion_ids, sampled.completion_mask)
    for i, (item, text) in enumerate(zip(kept, texts)):
        answer = extract_boxed(text)
        result = {"id": item.id, "category": item.category, "prediction": text, "extracted": answer,
                  "answer": item.answer, "correct": answers_equivalent(answer, item.answer, item.choices)}
        if samples:
            votes = [extract_boxed(t) for t in sampled_texts[i * samples:(i + 1) * samples]]
            result["sample_correct"] = [answers_equivalent(v, item.answer, item.choices) for v in votes]
            majority, _ = majority_vote(votes, item.choices)
            result["majority_correct"] = answers_equivalent(majority, item.answer, item.choices)
        results.append(result)
    return results


def summarize(results):
    """Accuracy overall and per category (and pass@1 / majority@k when sampled answers exist)."""
    def score(rows):
        out = {"n": len(rows), "accuracy": sum(r["correct"] for r in rows) / max(len(rows), 1)}
        if rows and "sample_correct" in rows[0]:
            out["pass@1"] = sum(sum(r["sample_correct"]) / len(r["sample_correct"]) for r in rows) / len(rows)
            out["majority@k"] = sum(r["majority_correct"] for r in rows) / len(rows)
        return out

    summary = score(results)
    categories = sorted({r["category"] for r in results})
    summary["by_category"] = {c: score([r for r in results if r["category"] == c]) for c in categories}
    return summary


def format_table(summaries):
    """Markdown table: one row per benchmark (and category), one column per checkpoint.

    summaries: {checkpoint name: {benchmark name: summarize(...) output}}.
    """
    names = list(summaries)
    lines = ["| benchmark | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    benches = list(next(iter(summaries.values())))
    for bench in benches:
        rows = [(bench, lambda s: s)] + [
            (f"{bench}/{c}", lambda s, c=c: s["by_category"].get(c, {"accuracy": float("nan")}))
            for c in summaries[names[0]][bench]["by_category"] if c != "all"]
        for label, pick in rows:
            cells = [f"{100 * pick(summaries[n][bench])['accuracy']:.1f}" for n in names]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    from vlm import load_vlm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="checkpoint folder (repeat to compare)")
    parser.add_argument("--bench", action="append", required=True, help="name=path.jsonl (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-pixels", type=int, default=512 * 512)
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write per-item results and summaries to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    benches = {}
    for spec in args.bench:
        name, _, path = spec.partition("=")
        benches[name] = load_benchmark(path)
    summaries, per_item = {}, {}
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    for path in args.model:
        model, processor = load_vlm(path, dtype=dtype, device=args.device)
        summaries[path], per_item[path] = {}, {}
        for name, items in benches.items():
            results = evaluate(model, processor, items, args.min_pixels, args.max_pixels, args.max_new_tokens,
                               args.batch_size)
            summaries[path][name], per_item[path][name] = summarize(results), results
        del model
    print(format_table(summaries))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summaries": summaries, "items": per_item}, f, indent=1)


if __name__ == "__main__":
    main()
