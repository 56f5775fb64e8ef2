"""The two roles' prompts and the questioner's output parser.

ONE prompt path per role, built by the processor's chat template and used everywhere the role acts:
the questioner's prompt for its GRPO rollouts and for question generation; the reasoner's prompt for
the answers that score a question (confidence p), for silver labels, for its own GRPO rollouts and
for evaluation. (The released code used different prompts for training and generation of questions,
and for reward-time and labeling-time answers.)
"""

import re
from dataclasses import dataclass

from answers import answer_number
from sampler import Prompt

QUESTION_TYPES = ("multiple choice", "numerical", "regression")

QUESTIONER_INSTRUCTION = (
    "Look at the image and ask one question about it that has a single short answer. "
    "Give the type (multiple choice, numerical or regression), the question and its answer in the "
    "form <type>TYPE</type><question>QUESTION</question><answer>ANSWER</answer>. "
    "A multiple choice question is a yes/no question or lists options A to D and is answered with "
    "a letter.")

REASONER_INSTRUCTION = "Think step by step, then give the final answer in \\boxed{}."


def encode_prompt(processor, image, text):
    """Chat-format (image(s), user text) with the processor's template and encode it as a `Prompt`.

    `image` is one PIL image or a list of them; each becomes an image part of the message, in order,
    before the text (the `Prompt` then has one `image_grid_thw` row per image).
    """
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    chat = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(images=images, text=[chat], return_tensors="pt")
    return Prompt(inputs["input_ids"][0], inputs["pixel_values"], inputs.get("image_grid_thw"),
                  inputs.get("image_position_ids"))


def questioner_prompt(processor, image):
    """The questioner's prompt for an image (rollouts and generation alike)."""
    return encode_prompt(processor, image, QUESTIONER_INSTRUCTION)


def reasoner_text(question):
    """The reasoner's user text for a question."""
    return f"{question}\n{REASONER_INSTRUCTION}"


def reasoner_prompt(processor, image, question):
    """The reasoner's prompt for (image or list of images, question): scoring, labeling, training
    and evaluation alike."""
    return encode_prompt(processor, image, reasoner_text(question))


@dataclass
class GeneratedQuestion:
    """A parsed questioner output."""
    type: str                     # one of QUESTION_TYPES
    question: str
    answer: str                   # the questioner's own answer (for analysis; labels are votes)
    choices: list[str] | None     # option texts A, B, ... when the question lists them


_TAG = {name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL)
        for name in ("type", "question", "answer")}
_OPTION_MARK = re.compile(r"(?:^|(?<=\s))\(?([A-H])[.):]\s+")


def parse_choices(question):
    """Option texts of a question that lists options as 'A. x B. y', '(A) x (B) y' or 'A) x B) y'.

    Returns the texts in letter order (A, B, ...) when A and B at least are present, else None.
    """
    marks = list(_OPTION_MARK.finditer(question))
    run = []  # positions in `marks` of A, B, C, ... in order, starting at the first A
    for position, mark in enumerate(marks):
        if mark.group(1) == chr(ord("A") + len(run)):
            run.append(position)
        elif run:
            break
    if len(run) < 2:
        return None
    # An option's text runs to the next mark of any letter (or the end of the question).
    ends = [marks[p + 1].start() if p + 1 < len(marks) else len(question) for p in run]
    return [question[marks[p].end():end].strip().rstrip(",;").strip() for p, end in zip(run, ends)]


def parse_question(text):
    """Parse `<type>T</type><question>Q</question><answer>A</answer>`; None when it is invalid.

    Invalid: a tag missing or empty, a type outside QUESTION_TYPES, or a numerical / regression
    question whose own answer is not a number by the rules that grade answers
    (`answers.answer_number`: "3 cars", "45%" and "\\frac{1}{2}" are numbers). (The released
    code passed such outputs on to labeling, where an empty type shifted the alignment of
    results.)
    """
    fields = {}
    for name, pattern in _TAG.items():
        match = pattern.search(text)
        if match is None or not match.group(1).strip():
            return None
        fields[name] = " ".join(match.group(1).split())
    kind = fields["type"].lower().replace("-", " ").replace("_", " ")
    if kind not in QUESTION_TYPES:
        return None
    if kind != "multiple choice" and answer_number(fields["answer"]) is None:
        return None
    return GeneratedQuestion(kind, fields["question"], fields["answer"],
                             parse_choices(fields["question"]))
