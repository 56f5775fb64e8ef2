"""Evaluate checkpoints on labeled benchmarks: greedy answers graded by the rules of `rewards.py`.

    python eval.py --model RUN/embedded/base --model RUN/solver_v1 --model RUN/solver_v3 \\
        --bench mmmu=/data/mmmu/validation.jsonl --bench hallusion=/data/HallusionBench.json --out RUN/eval

prints one markdown table (rows: each benchmark and benchmark/category; columns: each checkpoint's
accuracy in %, then each later checkpoint's difference to the first in points) and, with --out,
writes OUT/<checkpoint>/<benchmark>.jsonl (one graded row per item) and OUT/summary.json.

Benchmark files. The container is chosen by extension: `.json` (a list of row objects, or an object
whose values are row objects, keyed by id; JSON lines also work), `.tsv` (VLMEvalKit: a header row,
base64 images), anything else JSONL (one object per line); parquet must be converted (README). The
project's own row schema:

    {"id": "...", "image": "rel/path.png" | ["a.png", "b.png"] | "<base64>", "question": "...",
     "answer": "...", "choices": ["option A text", ...], "category": "...", "answer_type": "..."}

`choices`, `category` and `answer_type` (one of rewards.ANSWER_TYPES) are optional. Common alternative
keys of the public benchmarks are read too (the *_KEYS tuples below; the README maps each benchmark).
Layout "yesno" (HallusionBench) reads the answers "1" / "0" as yes / no. Rows that cannot be
evaluated (missing or unreadable image, empty question, no answer, an answer that is no option) are
counted by reason, logged with their file and line, and skipped; a file with no usable row is an error.

Greedy decoding goes through the project's sampler (`grpo.rollout`), one prompt batch at a time; the
prompt is the reasoner's training prompt (`roles.reasoner_prompt`), options listed "A. text" per line.
An optional judge (`--judge-url`, an OpenAI-compatible endpoint) regrades free-form answers that the
rules call wrong; it is never needed and off by default.
"""

import argparse
import ast
import base64
import binascii
import csv
import io
import json
import logging
import os
import re
import sys
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
from PIL import Image
from tqdm import tqdm

from data import iter_jsonl, load_image, write_json, write_jsonl
from grpo import Sampling, decode, rollout, special_tokens
from rewards import ANSWER_TYPES, answer_correct, extract_answer, infer_answer_type, majority_vote, normalize_answer
from roles import parse_choices, reasoner_prompt

log = logging.getLogger("visplay")

ID_KEYS = ("id", "index", "question_id", "pid", "sample_index")
IMAGE_KEYS = ("image", "images", "image_path", "img", "imagename", "filename")
NUMBERED_IMAGE_KEYS = tuple(f"image_{k}" for k in range(1, 8))  # MMMU: image_1 .. image_7
QUESTION_KEYS = ("question", "query", "prompt")
ANSWER_KEYS = ("answer", "label", "gt_answer")
CHOICE_KEYS = ("choices", "options")
CATEGORY_KEYS = ("category", "subject", "subfield", "task", "problem_version", "capability")
LAYOUTS = ("auto", "native", "yesno")
LETTERS = "ABCDEFGH"
_IMAGE_PLACEHOLDER = re.compile(r"<image\s*\d+>")  # MMMU's "<image 1>": the images come before the text


@dataclass
class Item:
    id: str
    images: list                  # absolute paths (str) or encoded image files (bytes, from base64), in order
    question: str
    answer: str                   # "x<OR>y": either is right
    choices: list[str] | None = None  # option texts, A first
    category: str = "all"
    answer_type: str = "free_form"  # one of rewards.ANSWER_TYPES


class BadRow(ValueError):
    """A benchmark row that cannot be evaluated; the message is the reason it is counted under."""


# ----------------------------------------------------------------------------
# Reading benchmark files


def read_rows(path):
    """(location, row) of every row of a benchmark file; the container is chosen by extension."""
    if path.endswith(".parquet"):
        raise ValueError(f"{path}: parquet is not read here (it would need pyarrow); convert it to JSONL "
                         "first, as the README section 'Benchmark files' shows")
    if path.endswith(".json"):
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError:  # JSON lines under a .json name
                return [(f"{path}:{line}", row) for line, row in iter_jsonl(path)]
        if isinstance(data, dict):  # {"v1_0": {...}, ...} (MM-Vet): the key is the id
            return [(f"{path}[{key!r}]", {"id": key, **row} if isinstance(row, dict) else row)
                    for key, row in data.items()]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of row objects (or an object of them), "
                             f"got {type(data).__name__}")
        return [(f"{path}[{i}]", row) for i, row in enumerate(data)]
    if path.endswith(".tsv"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long cells
        with open(path, newline="") as f:
            rows = [(f"{path}:{line}", row) for line, row in enumerate(csv.DictReader(f, delimiter="\t"), 2)]
        # VLMEvalKit stores an image once: a later row's short "image" cell is the index of that row.
        stored = {row.get("index"): row["image"] for _, row in rows if len(row.get("image") or "") > 64}
        for _, row in rows:
            if len(row.get("image") or "") <= 64 and row.get("image") in stored:
                row["image"] = stored[row["image"]]
        return rows
    return [(f"{path}:{line}", row) for line, row in iter_jsonl(path)]


def detect_layout(rows):
    """"yesno" when the first 20 rows have a `gt_answer` and every one is "0" or "1" (HallusionBench);
    otherwise "native". A set of "yes"/"no" answers needs no layout: its items are yes_no anyway."""
    sample = [row for _, row in rows[:20] if isinstance(row, dict)]
    if sample and all(str(row.get("gt_answer")) in ("0", "1") for row in sample):
        return "yesno"
    return "native"


def _first(row, keys):
    """The value of the first key of `keys` that the row has, non-empty; None if none has."""
    for key in keys:
        if row.get(key) not in (None, "", []):
            return row[key]
    return None


def _as_list(value):
    """A list value, also from its Python or JSON text ("['a', 'b']": MMMU's options); else None."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return None
    return list(value) if isinstance(value, (list, tuple)) else None


def image_source(value, base):
    """One image of a row as an absolute path (str) or the bytes of an encoded image file.

    value: a path relative to the benchmark file's folder `base` (also looked for under base/images),
    an absolute path, base64 with or without a `data:image/...;base64,` prefix, or a {"bytes", "path"}
    object (a Hugging Face image exported to JSON). The image is opened once here, so an unreadable
    one is a bad row. Raises BadRow("missing image" | "unreadable image").
    """
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, bytes):
        data = value
    elif not isinstance(value, str) or not value.strip():
        raise BadRow("missing image")
    elif value.startswith("data:"):
        data = _base64(value.partition(",")[2])
    else:
        for path in (os.path.join(base, value), os.path.join(base, "images", value)):
            if os.path.isfile(path):
                _check_image(path)
                return os.path.abspath(path)
        data = _base64(value) if len(value) >= 64 else None
    if data is None:
        raise BadRow("missing image")
    _check_image(io.BytesIO(data))
    return data


def _base64(text):
    try:
        return base64.b64decode("".join(text.split()), validate=True)  # line breaks allowed
    except (binascii.Error, ValueError):
        return None


def _check_image(source):
    try:
        with Image.open(source) as image:
            image.verify()
    except (OSError, ValueError, SyntaxError):
        raise BadRow("unreadable image") from None


def item_from_row(row, base, number, yes_no=False):
    """Map one row of any supported layout onto an `Item` (rules: module docstring and README).

    number: the row's position, its id when it has none. yes_no: answers "1"/"0" mean yes/no.
    Raises BadRow with the reason when the row cannot be evaluated.
    """
    if not isinstance(row, dict):
        raise BadRow("not an object")
    question = _IMAGE_PLACEHOLDER.sub("", str(_first(row, QUESTION_KEYS) or "")).strip()
    if not question:
        raise BadRow("empty question")
    if isinstance(row.get("hint"), str) and row["hint"].strip():  # VLMEvalKit's context for the question
        question = f"{row['hint'].strip()}\n{question}"
    answer = _first(row, ANSWER_KEYS)
    answer = "<OR>".join(map(str, answer)) if isinstance(answer, list) else "" if answer is None else str(answer)
    answer = answer.strip()
    if not answer:
        raise BadRow("no answer")
    choices = _as_list(_first(row, CHOICE_KEYS))
    if not choices:  # options as columns A, B, ... (VLMEvalKit), up to the first empty one
        choices = []
        for letter in LETTERS:
            if row.get(letter) in (None, ""):
                break
            choices.append(row[letter])
    choices = [_IMAGE_PLACEHOLDER.sub("", str(c)).strip() for c in choices] or None
    if choices is None and re.fullmatch(r"\(?[A-H]\)?\.?", answer):  # options inside the question text,
        choices = [c.split("\n")[0].strip() for c in parse_choices(question) or []] or None  # one line each
    if yes_no:
        answer = {"1": "yes", "0": "no"}.get(answer.lower(), answer.lower())
        if answer not in ("yes", "no"):
            raise BadRow("answer not yes/no")
    answer_type = row.get("answer_type")
    if choices:
        answer_type = "multiple_choice"
    elif yes_no:
        answer_type = "yes_no"
    elif answer_type not in ANSWER_TYPES:
        answer_type = infer_answer_type(answer, choices)
    if choices and normalize_answer(answer, choices) not in LETTERS.lower()[:len(choices)]:
        raise BadRow("answer not an option")
    images = _first(row, IMAGE_KEYS)
    if images is None:
        images = [row[k] for k in NUMBERED_IMAGE_KEYS if row.get(k)]
    images = _as_list(images) or [images]
    category = _first(row, CATEGORY_KEYS)
    category = ",".join(map(str, category)) if isinstance(category, list) else str(category or "all")
    identifier = _first(row, ID_KEYS)
    return Item(str(number if identifier is None else identifier), [image_source(v, base) for v in images],
                question, answer, choices, category, answer_type)


def load_benchmark(path, layout="auto", report=None):
    """Items of a benchmark file (see the module docstring for the formats).

    layout: "auto" (see `detect_layout`), "native" or "yesno". report: an optional dict that receives
    {"path", "layout", "rows", "items", "bad": {reason: count}}. Bad rows are logged (the first 5 of
    each reason with file and line) and skipped; raises ValueError when no row is usable.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"benchmark {path}: unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file {path!r} does not exist")
    rows = read_rows(path)
    layout = detect_layout(rows) if layout == "auto" else layout
    base = os.path.dirname(os.path.abspath(path))
    items, bad = [], Counter()
    for number, (where, row) in enumerate(rows):
        try:
            items.append(item_from_row(row, base, number, yes_no=layout == "yesno"))
        except BadRow as error:
            bad[str(error)] += 1
            if bad[str(error)] <= 5:
                log.warning("%s: skipped: %s", where, error)
    counts = ", ".join(f"{reason} {count}" for reason, count in sorted(bad.items()))
    if report is not None:
        report.update(path=path, layout=layout, rows=len(rows), items=len(items), bad=dict(sorted(bad.items())))
    if not items:
        raise ValueError(f"benchmark {path} ({layout} layout): none of its {len(rows)} rows is usable "
                         f"({counts or 'no rows'}); a row needs an image, a question and an answer")
    log.info("%s: %d items (%s layout)%s", path, len(items), layout, f", skipped {counts}" if bad else "")
    return items


# ----------------------------------------------------------------------------
# Answering and grading


def format_question(item):
    """The question shown to the model: options appended as "A. text" lines, unless already listed."""
    if item.choices and parse_choices(item.question) is None:
        return item.question + "".join(f"\n{LETTERS[i]}. {text}" for i, text in enumerate(item.choices))
    return item.question


def generate(model, processor, prompts, group_size, sampling, tokens, generator=None):
    """Texts of `group_size` completions per prompt (prompt i's at i*G .. i*G+G-1): the model boundary."""
    out = rollout(model, prompts, group_size, sampling, tokens, len(prompts), generator)
    return decode(processor, out.completion_ids, out.completion_mask)


def grade_item(item, text, sampled_texts=None, judge=None):
    """One result row: the prediction, its extracted answer and whether it is correct.

    judge(question, reference, prediction) -> bool | None regrades a free-form answer the rules reject.
    """
    extracted = extract_answer(text, item.choices)
    row = {"id": item.id, "category": item.category, "answer_type": item.answer_type, "question": item.question,
           "answer": item.answer, "prediction": text, "extracted": extracted,
           "correct": answer_correct(extracted, item.answer, item.choices, item.answer_type)}
    if judge is not None and not row["correct"] and item.answer_type == "free_form" and extracted:
        row["judge"] = judge(item.question, item.answer, extracted)
        row["correct"] = bool(row["judge"])
    if sampled_texts is not None:
        votes = [extract_answer(t, item.choices) for t in sampled_texts]
        row["sample_correct"] = [answer_correct(v, item.answer, item.choices, item.answer_type) for v in votes]
        majority, _ = majority_vote(votes, item.choices)
        row["majority_correct"] = answer_correct(majority, item.answer, item.choices, item.answer_type)
    return row


@torch.no_grad()
def evaluate(model, processor, items, min_pixels, max_pixels, max_new_tokens=1024, batch_size=32,
             samples=0, seed=0, judge=None, report=None, progress=True):
    """Greedy answer per item (and, with samples=k > 0, k sampled answers at temperature 1), graded.

    Returns one `grade_item` row per item. Prompts are built and answered `batch_size` at a time, so
    only one batch of images is in memory. An item whose image fails to load is logged, skipped and
    counted in `report` (a Counter, optional) under "unreadable image". judge: see `grade_item`.
    progress: a tqdm bar over the items (drawn only on a terminal).
    """
    model.eval()
    tokens = special_tokens(processor, model)
    greedy, sampled = Sampling(0.0, 1.0, 0, max_new_tokens), Sampling(1.0, 1.0, 0, max_new_tokens)
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed) if samples else None
    results = []
    bar = tqdm(total=len(items), desc="eval", unit="item", disable=None if progress else True)
    for start in range(0, len(items), batch_size):
        kept, prompts = [], []
        for item in items[start:start + batch_size]:
            try:
                images = [load_image(io.BytesIO(s) if isinstance(s, bytes) else s, min_pixels, max_pixels)
                          for s in item.images]
            except ValueError as error:
                log.warning("benchmark item %s skipped: %s", item.id, error)
                if report is not None:
                    report["unreadable image"] += 1
                continue
            prompts.append(reasoner_prompt(processor, images, format_question(item)))
            kept.append(item)
        if prompts:
            texts = generate(model, processor, prompts, 1, greedy, tokens)
            votes = generate(model, processor, prompts, samples, sampled, tokens, generator) if samples else None
            results += [grade_item(item, texts[i], votes[i * samples:(i + 1) * samples] if samples else None, judge)
                        for i, item in enumerate(kept)]
        bar.update(min(batch_size, len(items) - start))
    bar.close()
    return results


def judge_equivalent(question, reference, prediction, url, model, api_key=None, timeout=30):
    """Ask an OpenAI-compatible chat endpoint whether `prediction` answers `question` as `reference` does.

    url: the server ("http://host:8000", ".../v1") or its full ".../chat/completions" address.
    Returns True / False from the reply's first word (yes / no), None when there is no clear verdict
    or the request fails (logged). Standard library only.
    """
    url = url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions" if url.endswith("/v1") else "/v1/chat/completions"
    content = (f"Question: {question}\nReference answer: {reference}\nCandidate answer: {prediction}\n"
               "Does the candidate answer mean the same as the reference answer? Reply with yes or no only.")
    body = json.dumps({"model": model, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=timeout) as response:
            reply = json.load(response)["choices"][0]["message"]["content"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as error:
        log.warning("judge request to %s failed: %s", url, error)
        return None
    verdict = re.match(r"\W*(yes|no)\b", reply.lower())
    return None if verdict is None else verdict.group(1) == "yes"


# ----------------------------------------------------------------------------
# Summaries and the comparison table


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


def format_table(summaries, skipped=None):
    """Markdown table comparing checkpoints.

    summaries: {checkpoint: {benchmark: summarize(...) output}}; skipped: {benchmark: rows skipped}.
    Rows: each benchmark, its categories (when it has more than the default "all"), and the mean over
    benchmarks when there are several. Columns: n (items graded, first checkpoint), skipped, each
    checkpoint's accuracy in %, then "Δ name" = name's accuracy minus the first's, in points.
    """
    names = list(summaries)
    first = summaries[names[0]]
    header = ["benchmark", "n", "skipped"] + names + [f"Δ {name}" for name in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label, n, skip, pick):
        values = [pick(summaries[name]) for name in names]
        cells = ["-" if v is None else f"{100 * v:.1f}" for v in values]
        deltas = ["-" if v is None or values[0] is None else f"{100 * (v - values[0]):+.1f}" for v in values[1:]]
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
    if len(first) > 1:
        row("average", sum(s["n"] for s in first.values()), str(sum((skipped or {}).values())),
            lambda s: sum(s[b]["accuracy"] for b in first) / len(first) if all(b in s for b in first) else None)
    return "\n".join(lines)


def checkpoint_names(paths):
    """Short unique names of checkpoint folders: the folder name, or parent_folder when names repeat."""
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
    from vlm import load_vlm

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="checkpoint folder (repeat to compare)")
    parser.add_argument("--bench", action="append", required=True, help="NAME=PATH of a benchmark file (repeat)")
    parser.add_argument("--layout", action="append", help=f"NAME=LAYOUT, LAYOUT one of {', '.join(LAYOUTS)}")
    parser.add_argument("--out", help="folder for per-item results and summary.json")
    parser.add_argument("--max-items", type=int, help="evaluate only the first N items of each benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--min-pixels", type=int, default=512 * 512)
    parser.add_argument("--max-pixels", type=int, default=2048 * 2048)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--judge-url", help="OpenAI-compatible server that regrades free-form answers (off by default)")
    parser.add_argument("--judge-model", help="model name sent to the judge; its key is read from $JUDGE_API_KEY")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    paths, layouts = _pairs(args.bench, "--bench"), _pairs(args.layout, "--layout")
    if unknown := set(layouts) - set(paths):
        raise SystemExit(f"--layout names {sorted(unknown)} match no --bench (benchmarks: {sorted(paths)})")
    if args.judge_url and not args.judge_model:
        raise SystemExit("--judge-url needs --judge-model")
    judge = partial(judge_equivalent, url=args.judge_url, model=args.judge_model,
                    api_key=os.environ.get("JUDGE_API_KEY")) if args.judge_url else None
    benches, reports = {}, {}
    for name, path in paths.items():
        reports[name] = {}
        benches[name] = load_benchmark(path, layouts.get(name, "auto"), reports[name])[:args.max_items]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    summaries, skipped = {}, {name: sum(report["bad"].values()) for name, report in reports.items()}
    for name, path in zip(checkpoint_names(args.model), args.model):
        model, processor = load_vlm(path, dtype=dtype, device=args.device)
        summaries[name] = {}
        for bench, items in benches.items():
            unreadable = Counter()
            results = evaluate(model, processor, items, args.min_pixels, args.max_pixels, args.max_new_tokens,
                               args.batch_size, judge=judge, report=unreadable)
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
                   {"checkpoints": dict(zip(summaries, args.model)), "benchmarks": reports, "results": summaries,
                    "table": table})
    return summaries


if __name__ == "__main__":
    main()
