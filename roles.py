"""The two roles' prompts and the questioner's output parser.

ONE prompt path per role, built by the processor's chat template and used everywhere the role acts:
the questioner's prompt for its GRPO rollouts and for question generation; the reasoner's prompt for
the answers that score a question (confidence p), for silver labels, for its own GRPO rollouts and
for evaluation. (The released code used different prompts for training and generation of questions,
and for reward-time and labeling-time answers.)
"""

import re
from dataclasses import dataclass

from answers import answer_number, parse_choices
from models.inputs import encode_prompt

QUESTION_TYPES = ("multiple choice", "numerical", "regression")

QUESTIONER_INSTRUCTION = (
    "Look at the image and ask one question about it that has a single short answer. "
    "Give the type (multiple choice, numerical or regression), the question and its answer in the "
    "form <type>TYPE</type><question>QUESTION</question><answer>ANSWER</answer>. "
    "A multiple choice question is a yes/no question or lists options A to D and is answered with "
    "a letter.")

REASONER_INSTRUCTION = "Think step by step, then give the final answer in \\boxed{}."


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
