"""Tests of roles.py: the questioner output parser and the two roles' prompts.

Token counts for the prompts are worked out by hand: a 84x56 (w x h) image stays 84x56 under the
tiny processor's [784, 12544] pixel range, so its patch grid is (t, h, w) = (1, 56/14, 84/14) =
(1, 4, 6): 24 patches of 3 * 2 * 14 * 14 = 1176 values, merged 2x2 into 24 / 4 = 6 image tokens."""

import pytest
import torch
from PIL import Image

from roles import (
    QUESTIONER_INSTRUCTION,
    REASONER_INSTRUCTION,
    GeneratedQuestion,
    parse_question,
    questioner_prompt,
    reasoner_prompt,
)
from models.inputs import Prompt
from models.load import load_vlm
from toyworld.world import render_shapes

# ----------------------------------------------------------------------------
# parse_question


def q(kind, question, answer):
    return f"<type>{kind}</type><question>{question}</question><answer>{answer}</answer>"


@pytest.mark.parametrize("text, expected", [
    (q("numerical", "How many red circles are there?", "3"),
     GeneratedQuestion("numerical", "How many red circles are there?", "3", None)),
    (q("regression", "What fraction of the cells are empty?", "0.25"),
     GeneratedQuestion("regression", "What fraction of the cells are empty?", "0.25", None)),
    (q("multiple choice", "Is there a blue square?", "yes"),
     GeneratedQuestion("multiple choice", "Is there a blue square?", "yes", None)),
    (q("multiple choice", "Which colour is the circle? A. red B. blue C. green D. yellow", "A"),
     GeneratedQuestion("multiple choice",
                       "Which colour is the circle? A. red B. blue C. green D. yellow", "A",
                       ["red", "blue", "green", "yellow"])),
    # types: case-insensitive, hyphen / underscore for the space
    (q("Multiple-Choice", "Is it red?", "no"),
     GeneratedQuestion("multiple choice", "Is it red?", "no", None)),
    (q("MULTIPLE_CHOICE", "Is it red?", "no"),
     GeneratedQuestion("multiple choice", "Is it red?", "no", None)),
    (q("Numerical", "How many?", "-2"), GeneratedQuestion("numerical", "How many?", "-2", None)),
    (q(" REGRESSION ", "Ratio?", "3/4"), GeneratedQuestion("regression", "Ratio?", "3/4", None)),
    # numbers: thousands separators, decimals, exponent
    (q("numerical", "Pixels?", "1,000"), GeneratedQuestion("numerical", "Pixels?", "1,000", None)),
    (q("regression", "Area?", ".5"), GeneratedQuestion("regression", "Area?", ".5", None)),
    (q("regression", "Area?", "2e3"), GeneratedQuestion("regression", "Area?", "2e3", None)),
    # what grading reads as a number: units, percent, LaTeX fractions
    (q("numerical", "How many?", "3 cars"),
     GeneratedQuestion("numerical", "How many?", "3 cars", None)),
    (q("regression", "Share?", "45%"), GeneratedQuestion("regression", "Share?", "45%", None)),
    (q("regression", "Ratio?", "\\frac{1}{2}"),
     GeneratedQuestion("regression", "Ratio?", "\\frac{1}{2}", None)),
    (q("numerical", "How many?", "three"),  # a number word
     GeneratedQuestion("numerical", "How many?", "three", None)),
    # text around the tags and newlines between them are fine
    ("Sure! " + q("numerical", "How many?", "4").replace("</type>", "</type>\n") + " done",
     GeneratedQuestion("numerical", "How many?", "4", None)),
])
def test_parse_question_valid(text, expected):
    assert parse_question(text) == expected


def test_parse_question_normalises_whitespace():
    text = q("multiple \n choice", "  How many\n  red   circles\tare there? ", "  B ")
    assert parse_question(text) == GeneratedQuestion("multiple choice",
                                                     "How many red circles are there?", "B", None)


def test_parse_question_uses_first_occurrence_of_each_tag():
    text = (q("numerical", "First question?", "1") + q("regression", "Second question?", "2.5")
            + "<answer>7</answer>")
    assert parse_question(text) == GeneratedQuestion("numerical", "First question?", "1", None)


@pytest.mark.parametrize("text", [
    "",
    "How many red circles? 3",
    "<type>numerical</type><question>How many?</question>",                       # no answer
    "<question>How many?</question><answer>3</answer>",                           # no type
    "<type>numerical</type><answer>3</answer>",                                   # no question
    "<type>numerical</type><question>How many?</question><answer>3",             # unclosed answer
    q("", "How many?", "3"),                                                      # empty type
    q("numerical", "  \n ", "3"),                                                 # blank question
    q("numerical", "How many?", ""),                                              # empty answer
    q("open ended", "What is it?", "a circle"),                                   # unknown type
    q("multiple", "Which?", "A"),
    q("numerical", "How many?", "several"),                                       # not a number
    q("numerical", "How many?", "three circles"),  # a number word keeps its unit: not read
    q("regression", "What fraction?", "about half"),
    q("numerical", "How many?", "1.2.3"),
])
def test_parse_question_invalid(text):
    assert parse_question(text) is None


# ----------------------------------------------------------------------------
# prompts


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_vlm(tiny_model_dir)[1]


def _image(width=84, height=56):
    assert width % 28 == 0 and height % 28 == 0
    return render_shapes([("circle", "red", 0, 0, 0.8), ("square", "blue", 1, 2, 0.6)],
                         rows=height // 28, cols=width // 28)


def _check_prompt(processor, prompt, grid, texts):
    tok = processor.tokenizer
    assert isinstance(prompt, Prompt)
    t, h, w = grid
    assert prompt.image_grid_thw.tolist() == [[t, h, w]]
    assert prompt.pixel_values.shape == (t * h * w, 3 * 2 * 14 * 14)
    ids = prompt.input_ids.tolist()
    assert prompt.input_ids.dim() == 1
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert ids.count(image_id) == t * h * w // 4
    assert ids.count(tok.convert_tokens_to_ids("<|vision_start|>")) == 1
    assert ids.count(tok.convert_tokens_to_ids("<|vision_end|>")) == 1
    # the placeholders are contiguous, between vision_start and vision_end
    start = ids.index(tok.convert_tokens_to_ids("<|vision_start|>"))
    assert ids[start + 1:start + 1 + t * h * w // 4] == [image_id] * (t * h * w // 4)
    assert ids[start + 1 + t * h * w // 4] == tok.convert_tokens_to_ids("<|vision_end|>")
    decoded = tok.decode(ids, skip_special_tokens=False)
    assert decoded.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert decoded.endswith("<|im_end|>\n<|im_start|>assistant\n")
    for text in texts:
        assert text in decoded
    return decoded


def test_questioner_prompt(processor):
    prompt = questioner_prompt(processor, _image())
    decoded = _check_prompt(processor, prompt, (1, 4, 6), [QUESTIONER_INSTRUCTION])
    # image first, then the instruction, in one user turn
    assert decoded.index("<|vision_end|>") < decoded.index(QUESTIONER_INSTRUCTION)
    assert decoded.count("<|im_start|>") == 2


def test_reasoner_prompt(processor):
    question = "How many red circles are there?"
    prompt = reasoner_prompt(processor, _image(), question)
    decoded = _check_prompt(processor, prompt, (1, 4, 6),
                            [question, "\\boxed{}", REASONER_INSTRUCTION])
    assert decoded.index(question) < decoded.index(REASONER_INSTRUCTION)
    assert QUESTIONER_INSTRUCTION not in decoded


def test_prompt_for_112_square_image_has_16_image_tokens(processor):
    # 112x112 -> grid (1, 8, 8) = 64 patches -> 16 merged tokens (config.yaml's comment)
    prompt = reasoner_prompt(processor, _image(112, 112), "Is there a red circle?")
    _check_prompt(processor, prompt, (1, 8, 8), ["Is there a red circle?"])


def test_reasoner_prompt_is_deterministic(processor):
    image = _image()
    question = "Which colour is the square? A. red B. blue"
    first = reasoner_prompt(processor, image, question)
    second = reasoner_prompt(processor, image.copy(), question)
    assert torch.equal(first.input_ids, second.input_ids)
    assert torch.equal(first.pixel_values, second.pixel_values)
    assert torch.equal(first.image_grid_thw, second.image_grid_thw)


def test_prompt_pixels_depend_on_image(processor):
    a = reasoner_prompt(processor, _image(), "How many?")
    b = reasoner_prompt(processor, Image.new("RGB", (84, 56), (0, 0, 0)), "How many?")
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.pixel_values, b.pixel_values)
