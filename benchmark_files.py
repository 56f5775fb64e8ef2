"""Benchmark files in the layouts the public benchmarks ship in, read into `Item`s.

The container is chosen by extension: `.json` (a list of row objects, or an object whose values are
row objects, keyed by id; JSON lines also work), `.tsv` (VLMEvalKit: a header row, base64 images),
anything else JSONL (one object per line); parquet must be converted (docs/evaluation.md). The
project's own row schema:

    {"id": "...", "image": "rel/path.png" | ["a.png", "b.png"] | "<base64>", "question": "...",
     "answer": "...", "choices": ["option A text", ...], "category": "...", "answer_type": "..."}

`choices`, `category` and `answer_type` (one of answers.ANSWER_TYPES) are optional. Common
alternative keys of the public benchmarks are read too (the *_KEYS tuples below;
docs/evaluation.md maps each benchmark). Layout "yesno" (HallusionBench) reads the answers "1" /
"0" as yes / no. Rows that cannot be evaluated (missing or unreadable image, empty question, no
answer, an answer that is no option) are counted by reason, logged with their file and line, and
skipped; a file with no usable row is an error.
"""

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
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from answers import ANSWER_TYPES, OPTION_LETTERS, infer_answer_type, normalize_answer, parse_choices
from data import iter_jsonl

log = logging.getLogger("visplay")

ID_KEYS = ("id", "index", "question_id", "pid", "sample_index")
IMAGE_KEYS = ("image", "images", "image_path", "img", "imagename", "filename")
NUMBERED_IMAGE_KEYS = tuple(f"image_{k}" for k in range(1, 8))  # MMMU: image_1 .. image_7
QUESTION_KEYS = ("question", "query", "prompt")
ANSWER_KEYS = ("answer", "label", "gt_answer")
CHOICE_KEYS = ("choices", "options")
CATEGORY_KEYS = ("category", "subject", "subfield", "task", "problem_version", "capability")
LAYOUTS = ("auto", "native", "yesno")
_IMAGE_PLACEHOLDER = re.compile(r"<image\s*\d+>")  # MMMU's "<image 1>": the images come first


@dataclass
class Item:
    id: str
    images: list                  # absolute paths (str) or encoded image files (bytes), in order
    question: str
    answer: str                   # "x<OR>y": either is right
    choices: list[str] | None = None  # option texts, A first
    category: str = "all"
    answer_type: str = "free_form"  # one of answers.ANSWER_TYPES


class BadRow(ValueError):
    """A benchmark row that cannot be evaluated; the message is the reason it is counted under."""


# ----------------------------------------------------------------------------
# Reading benchmark files


def read_rows(path):
    """(location, row) of every row of a benchmark file; the container is chosen by extension."""
    if path.endswith(".parquet"):
        raise ValueError(f"{path}: parquet is not read here (it would need pyarrow); convert it "
                         "to JSONL first, as docs/evaluation.md, 'Benchmark files', shows")
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
            reader = csv.DictReader(f, delimiter="\t")
            rows = [(f"{path}:{line}", row) for line, row in enumerate(reader, 2)]
        # VLMEvalKit stores an image once: a later row's short "image" cell is that row's index.
        stored = {row.get("index"): row["image"] for _, row in rows
                  if len(row.get("image") or "") > 64}
        for _, row in rows:
            if len(row.get("image") or "") <= 64 and row.get("image") in stored:
                row["image"] = stored[row["image"]]
        return rows
    return [(f"{path}:{line}", row) for line, row in iter_jsonl(path)]


def detect_layout(rows):
    """"yesno" when the first 20 rows have a `gt_answer` and every one is "0" or "1"
    (HallusionBench); otherwise "native". A set of "yes"/"no" answers needs no layout: its items
    are yes_no anyway."""
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

    value: a path relative to the benchmark file's folder `base` (also looked for under
    base/images), an absolute path, base64 with or without a `data:image/...;base64,` prefix, or a
    {"bytes", "path"} object (a Hugging Face image exported to JSON). The image is opened once
    here, so an unreadable one is a bad row. Raises BadRow("missing image" | "unreadable image").
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
    """Map one row of any supported layout onto an `Item` (rules: module docstring and
    docs/evaluation.md).

    number: the row's position, its id when it has none. yes_no: answers "1"/"0" mean yes/no.
    Raises BadRow with the reason when the row cannot be evaluated.
    """
    if not isinstance(row, dict):
        raise BadRow("not an object")
    if not any(key in row for key in QUESTION_KEYS):
        raise BadRow("no question field")
    question = _IMAGE_PLACEHOLDER.sub("", str(_first(row, QUESTION_KEYS) or "")).strip()
    if not question:
        raise BadRow("empty question")
    if isinstance(row.get("hint"), str) and row["hint"].strip():  # VLMEvalKit's context
        question = f"{row['hint'].strip()}\n{question}"
    answer = _first(row, ANSWER_KEYS)
    if isinstance(answer, list):
        answer = "<OR>".join(map(str, answer))
    answer = "" if answer is None else str(answer).strip()
    if not answer:
        raise BadRow("no answer")
    choices = _as_list(_first(row, CHOICE_KEYS))
    if not choices:  # options as columns A, B, ... (VLMEvalKit), up to the first empty one
        choices = []
        for letter in OPTION_LETTERS:
            if row.get(letter) in (None, ""):
                break
            choices.append(row[letter])
    choices = [_IMAGE_PLACEHOLDER.sub("", str(c)).strip() for c in choices] or None
    if choices is None and re.fullmatch(r"\(?[A-H]\)?\.?", answer):
        # options inside the question text, one line each
        choices = [c.split("\n")[0].strip() for c in parse_choices(question) or []] or None
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
    if choices and normalize_answer(answer, choices) not in OPTION_LETTERS.lower()[:len(choices)]:
        raise BadRow("answer not an option")
    images = _first(row, IMAGE_KEYS)
    if images is None:
        images = [row[k] for k in NUMBERED_IMAGE_KEYS if row.get(k)]
    images = _as_list(images) or [images]
    category = _first(row, CATEGORY_KEYS)
    if isinstance(category, list):
        category = ",".join(map(str, category))
    else:
        category = str(category or "all")
    identifier = _first(row, ID_KEYS)
    return Item(str(number if identifier is None else identifier),
                [image_source(v, base) for v in images],
                question, answer, choices, category, answer_type)


def load_benchmark(path, layout="auto", report=None):
    """Items of a benchmark file (see the module docstring for the formats).

    layout: "auto" (see `detect_layout`), "native" or "yesno". report: an optional dict that
    receives {"path", "layout", "rows", "items", "bad": {reason: count}}. Bad rows are logged (the
    first 5 of each reason with file and line) and skipped; raises ValueError when no row is
    usable.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"benchmark {path}: unknown layout {layout!r}; "
                         f"use one of {', '.join(LAYOUTS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"benchmark file {path!r} does not exist")
    rows = read_rows(path)
    layout = detect_layout(rows) if layout == "auto" else layout
    base = os.path.dirname(os.path.abspath(path))
    items, bad, skipped = [], Counter(), []
    for number, (where, row) in enumerate(rows):
        try:
            items.append(item_from_row(row, base, number, yes_no=layout == "yesno"))
        except BadRow as error:
            bad[str(error)] += 1
            if bad[str(error)] <= 5:
                skipped.append(f"{where}: skipped: {error}")
    counts = ", ".join(f"{reason} {count}" for reason, count in sorted(bad.items()))
    if report is not None:
        report.update(path=path, layout=layout, rows=len(rows), items=len(items),
                      bad=dict(sorted(bad.items())))
    if not items:
        found = sorted({key for _, row in rows[:100] if isinstance(row, dict) for key in row})
        raise ValueError(
            f"benchmark {path} ({layout} layout): none of its {len(rows)} rows is usable "
            f"({counts or 'no rows'}); a row needs a question ({', '.join(QUESTION_KEYS)}), an "
            f"answer ({', '.join(ANSWER_KEYS)}) and an image ({', '.join(IMAGE_KEYS)}, or "
            f"image_1 ...); the rows have the keys {', '.join(found) or 'none'}")
    for line in skipped:  # (a file with no usable row says it all in its one error line)
        log.warning(line)
    log.info("%s: %d items (%s layout)%s", path, len(items), layout,
             f", skipped {counts}" if bad else "")
    return items
