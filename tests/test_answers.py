"""Tests of answers.py: extraction, equivalence, majority vote, benchmark grading, the options a
question lists. Each rule is checked on the example it exists for and on the cases it must
reject."""

import random
import re
import time

import pytest

from answers import (
    answer_correct,
    answers_equivalent,
    extract_answer,
    extract_boxed,
    infer_answer_type,
    majority_vote,
    normalize_answer,
    normalize_text,
    parse_choices,
)
from rewards import reasoner_reward


def grade(response, reference, choices=None, answer_type=None):
    """A benchmark response graded as `eval.grade_item` grades it: extract, then the
    type's rules."""
    return answer_correct(extract_answer(response, choices), reference, choices, answer_type)


# ----------------------------------------------------------------------------
# Boxed extraction


def test_extract_boxed():
    assert extract_boxed(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{2}") == "2"  # the last wins
    assert extract_boxed("the answer is 7") is None
    assert extract_boxed(r"\boxed{3} and \boxed{4") == "3"  # unterminated box skipped
    assert extract_boxed(r"\boxed{4") is None
    assert extract_boxed(r"\boxed {x}") == "x"
    assert extract_boxed(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"  # escaped braces do not nest
    assert extract_boxed(r"\boxed{}") == ""


def _extract_boxed_by_rescanning(text):
    """The obvious way: scan on from every box until its braces balance (quadratic when many
    boxes never close)."""
    answer = None
    for match in re.finditer(r"\\boxed\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            if text[i] == "\\":
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            answer = text[match.end():i - 1]
    return answer


def test_extract_boxed_equals_rescanning_every_box():
    """Random texts of boxes, braces, backslashes (escaped boxes and braces included), nested and
    unclosed boxes: the same answer as scanning on from every box."""
    pieces = ["\\boxed{", "\\boxed {", "{", "}", "\\", "\\{", "\\}", "a", "1", " "]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert extract_boxed(text) == _extract_boxed_by_rescanning(text), text


def test_extract_boxed_is_linear_in_unclosed_boxes():
    """A model stuck in a loop: 100k characters, 10,000 boxes that never close among them.
    Rescanning every box takes minutes here; one pass takes a few hundredths of a second (the
    bound is a hundred times that, for a loaded machine)."""
    looping = "\\boxed{x " * 10000
    texts = {"so \\boxed{3} " + looping + "\\boxed{7}": "7",   # the last complete box
             "so \\boxed{3} " + looping: "3"}                    # only the first one closes
    started = time.perf_counter()
    for text, expected in texts.items():
        text += "y" * (100_000 - len(text))
        assert len(text) == 100_000 and extract_boxed(text) == expected
    assert time.perf_counter() - started < 5.0


# ----------------------------------------------------------------------------
# Normalisation and equivalence


@pytest.mark.parametrize("raw, expected", [
    ("(B)", "b"), ("B.", "b"), ("**B**", "b"), (r"\textbf{B}", "b"),
    ("1,000", "1000"), (r"\frac{1}{2}", "0.5"), (r"\dfrac{1}{2}", "0.5"), (r"\tfrac12", "0.5"),
    ("1/2", "0.5"), (r"-\frac{3}{4}", "-0.75"), ("0.50", "0.5"), ("3.", "3"),
    (r"50\%", "50"), ("50%", "50"), ("12 cm", "12"), ("12cm", "12"), ("3 apples", "3"),
    (r"45^\circ", "45"), (r"45^{\circ}", "45"), ("45°", "45"), (r"$\left( 3 \right)$", "3"),
    (r"\text{yes}", "yes"), ("True", "yes"), ("correct", "yes"), ("Y", "yes"),
    ("False", "no"), ("incorrect", "no"), ("n", "no"),
    (r"\boxed{\frac{1}{2}}", "0.5"), ("  Red  ", "red"),
    ("2x", "2x"),  # a letter glued to a number is algebra, not a unit
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


CHOICES = ["red", "blue", "green", "1/2"]


@pytest.mark.parametrize("raw, expected", [
    ("B", "b"), ("(b)", "b"), ("B.", "b"), ("B)", "b"), ("option B", "b"), ("B: blue", "b"),
    ("Blue", "b"), (r"\boxed{B}", "b"), (r"\boxed{blue}", "b"), ("the answer is (C)", "c"),
    ("0.5", "d"),  # option texts compare by value too
    ("E", "e"),  # not one of the four letters: stays a plain string
])
def test_normalize_answer_with_choices(raw, expected):
    assert normalize_answer(raw, CHOICES) == expected


def test_normalize_answer_option_texts_with_their_own_labels():
    assert normalize_answer("blue", ["A. red", "B. blue"]) == "b"


@pytest.mark.parametrize("a, b", [
    ("0.5", "1/2"), ("0.5", r"\frac{1}{2}"), (r"\dfrac{3}{4}", "0.75"), ("1,000", "1000"),
    (r"45^\circ", "45"), ("12 cm", "12"), ("True", "yes"), ("(B)", "b"), ("50%", "50"),
    ("1/3", "0.33333"),  # |1/3 - 0.33333| = 3.3e-6 <= 1e-4 * 1/3
    ("3.0", "3"), ("None", "none"),
])
def test_equivalent(a, b):
    assert answers_equivalent(a, b) and answers_equivalent(b, a)


@pytest.mark.parametrize("a, b", [
    ("12", "1.2"), ("B", "AB"), ("yes", "not yes"), ("3", "3.5"), ("", ""), ("  ", "  "),
    (None, None), (None, "3"), ("3", None), ("100000", "100001"),  # integers compare exactly
    ("1/3", "0.333"),  # off by 1e-3 relative
    ("$$", "$$"),  # nothing left after normalisation
])
def test_not_equivalent(a, b):
    assert not answers_equivalent(a, b)


def test_percent_as_decimal_only_when_asked():
    assert not answers_equivalent("50%", "0.5")
    assert answers_equivalent("50%", "0.5", percent_as_decimal=True)
    assert answers_equivalent("0.5", r"50\%", percent_as_decimal=True)
    assert answers_equivalent("50%", "50", percent_as_decimal=True)


def test_equivalent_with_choices():
    assert answers_equivalent("blue", "B", CHOICES)
    assert answers_equivalent(r"\boxed{(B)}", "b", CHOICES)
    assert not answers_equivalent("A", "B", CHOICES)
    assert not answers_equivalent("red", "B", CHOICES)


# ----------------------------------------------------------------------------
# Majority vote


def test_majority_vote_equivalent_spellings():
    # {"0.5", "1/2", "\frac{1}{2}"} is one cluster of 3 of 5, beating {"2", "2"}
    answers = ["2", "0.5", "1/2", "2", r"\frac{1}{2}"]
    assert majority_vote(answers) == ("0.5", 3 / 5)


def test_majority_vote_invalid_answers_never_win():
    # 4 invalid answers outnumber the single "7" but only count in the denominator: 1/6
    assert majority_vote([None, None, "7", None, "", "   "]) == ("7", 1 / 6)
    assert majority_vote([None, "", None]) == (None, 0.0)
    assert majority_vote([]) == (None, 0.0)
    # the literal string "None" is an ordinary answer
    assert majority_vote(["None", "None", "3"]) == ("None", 2 / 3)


def test_majority_vote_ties_go_to_first_appearance():
    assert majority_vote(["4", "5", "5", "4"]) == ("4", 0.5)
    assert majority_vote(["5", "4", "4", "5", None]) == ("5", 0.4)


def test_majority_vote_with_choices():
    # "B", "(b)" and "blue" (the text of option B) are one cluster of 3 of 4
    assert majority_vote(["B", "A", "(b)", "blue"], CHOICES) == ("B", 0.75)
    # without choices "blue" is just a word: clusters {B, (b)}, {A}, {blue}
    assert majority_vote(["B", "A", "(b)", "blue"]) == ("B", 0.5)


# ----------------------------------------------------------------------------
# Benchmark grading: lenient extraction (evaluation only) and rules per answer type

MC = ["red", "blue", "green"]


@pytest.mark.parametrize("text, choices, expected", [
    (r"The answer is 3. So \boxed{4}", None, "4"),  # 1. the box wins over everything
    ("The answer is 3. Because there are three.", None, "3"),  # 2. cut at ". "
    ("The answer is 3.5", None, "3.5"),  # a decimal point is not a sentence end
    (r"Answer: $\frac{1}{2}$", None, r"$\frac{1}{2}$"),
    ("**Answer:** B", MC, "B"),
    ("the answer is A; no wait, the answer is B", MC, "B"),  # the last phrase
    ("the answer is", None, "the answer is"),  # nothing after it: falls through to the last line
    ("Looking closely, it is (C).", MC, "C"),  # 3. a letter ending the last line
    ("so **B**", MC, "B"),
    # no choices: rule 3 is off
    ("Looking closely, it is (C).", None, "Looking closely, it is (C)."),
    ("so it is E", MC, "so it is E"),  # E is not one of 3 options
    # a capital A that does not end the line
    ("A cat sits on the mat.", MC, "A cat sits on the mat."),
    ("Let me count.\n\n42\n", None, "42"),  # 4. the last non-empty line
    ("", None, None), ("  \n ", None, None), (None, None, None),
])
def test_extract_answer(text, choices, expected):
    assert extract_answer(text, choices) == expected


def test_training_still_requires_the_box():
    # evaluation reads "0.5" out of this response; the reasoner's reward does not
    assert grade("The answer is 0.5", "0.5")
    assert reasoner_reward("The answer is 0.5", "0.5") == 0.0


@pytest.mark.parametrize("reference, choices, expected", [
    ("B", MC, "multiple_choice"), ("yes", None, "yes_no"), ("No.", None, "yes_no"),
    ("12", None, "integer"), ("1,234", None, "integer"), ("12 cm", None, "integer"),
    ("3.0", None, "integer"),
    ("2.5", None, "float"), (r"\frac{1}{2}", None, "float"),
    ("50%", None, "percentage"), (r"12.5\%", None, "percentage"),  # written with %
    ("Eiffel Tower", None, "free_form"), ("true", None, "free_form"),
])
def test_infer_answer_type(reference, choices, expected):
    assert infer_answer_type(reference, choices) == expected


@pytest.mark.parametrize("raw, expected", [
    ("The Eiffel Tower.", "eiffel tower"), ("eiffel tower", "eiffel tower"),
    ("a red car", "red car"),
    ("U.S.A.", "usa"), ("red-car", "redcar"), (r"\text{An apple}", "apple"), ("the", ""),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


@pytest.mark.parametrize("response, reference", [
    # multiple choice: a boxed letter, a bare letter, "(B)", "B.", lowercase, the option's text
    (r"\boxed{B}", "B"), ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("blue", "B"),
    ("Blue.", "B"),
    ("The answer is (B).", "B"), ("I pick B", "B"), ("B. blue", "B"), (r"\boxed{blue}", "B"),
    ("B", "blue"),  # a reference written as the option's text
])
def test_grade_multiple_choice(response, reference):
    assert grade(response, reference, MC, "multiple_choice")


@pytest.mark.parametrize("response, reference", [
    ("AB", "B"), (r"\boxed{AB}", "B"), ("A", "B"), ("red", "B"), ("(A)", "B"),
    ("\\boxed{A}\nso B", "B"),  # the box wins over the last line
    ("D", "B"),  # no option D
])
def test_grade_multiple_choice_rejects(response, reference):
    assert not grade(response, reference, MC, "multiple_choice")


@pytest.mark.parametrize("response, reference, answer_type", [
    ("12", "12", "integer"), ("3.0", "3", "integer"),
    (r"\frac{1}{2}", "0.5", "float"), (r"\dfrac{3}{4}", "0.75", "float"), ("1/2", "0.5", "float"),
    ("2.50001", "2.5", "float"),  # relative 4e-6 <= 1e-4
    (r"90^\circ", "90", "integer"), ("90°", "90", "integer"),
    (r"50\%", "50", "integer"), ("50%", "50", "integer"),
    ("1,234", "1234", "integer"), ("1234", "1,234", "integer"),
    ("12 cm", "12", "integer"), ("12cm", "12", "integer"), ("12", "12 cm", "integer"),
    ("The answer is 7.", "7", "integer"),
])
def test_grade_numbers(response, reference, answer_type):
    assert grade(response, reference, answer_type=answer_type)
    assert grade(response, reference)  # the inferred type grades these alike


@pytest.mark.parametrize("response, reference", [("50%", "0.5"), (r"50\%", "0.5")])
def test_grade_percentage_items_only(response, reference):
    assert grade(response, reference, answer_type="percentage")
    assert not grade(response, reference)  # inferred float: 50 is not 0.5


@pytest.mark.parametrize("response, reference", [("0.25", "25%"), ("25%", "25%"), ("25", "25%"),
                                                 (r"\boxed{0.25}", r"25\%")])
def test_grade_a_reference_written_with_percent(response, reference):
    # 25% is a quarter: declared or inferred (a reference with % is a percentage)
    assert grade(response, reference, answer_type="percentage")
    assert grade(response, reference)
    assert not grade("0.3", reference) and not grade("2.5", reference)


def test_grade_percentage_needs_a_percent_sign():
    # only a number written with % is also read as a fraction of 100
    assert not grade("50", "0.5", answer_type="percentage")
    assert grade("50", "50%", answer_type="percentage")


@pytest.mark.parametrize("response, reference, answer_type", [
    ("12", "1.2", "float"), ("1.2", "12", "integer"), ("13", "12", "integer"),
    ("2.6", "2.5", "float"),
    ("3.0001", "3", "integer"),  # within 1e-4 relative, but an integer answer must be an integer
    # percent vs decimal: only for "percentage" items
    ("50%", "0.5", "float"), ("0.5", "50%", "integer"),
    ("1.234", "1234", "integer"),
])
def test_grade_numbers_rejects(response, reference, answer_type):
    assert not grade(response, reference, answer_type=answer_type)


def test_grade_integer_rule_only_for_integer_items():
    assert grade("3.0001", "3", answer_type="float")
    assert not grade("3.0001", "3")  # "3" is inferred integer


@pytest.mark.parametrize("response, reference, expected", [
    ("yes", "yes", True), ("Yes", "yes", True), (r"\boxed{Yes}", "yes", True),
    ("True", "yes", True),
    ("correct", "yes", True), ("false", "no", True), ("No.", "no", True),
    # a leading yes / no
    ("Yes, there is a red square.", "yes", True), ("No, it is blue.", "no", True),
    ("not yes", "yes", False), ("no", "yes", False), ("not", "no", False), ("nope", "no", False),
    ("Yes, there is a red square.", "no", False),
])
def test_grade_yes_no(response, reference, expected):
    assert grade(response, reference, answer_type="yes_no") is expected


@pytest.mark.parametrize("response, reference, expected", [
    ("The Eiffel Tower", "eiffel tower.", True),
    (r"\boxed{the eiffel tower}", "Eiffel Tower", True),
    ("a red car", "red car", True), ("Red car!", "red car", True),
    ("Eiffel", "Eiffel Tower", False), ("eiffel towers", "eiffel tower", False),
    # punctuation is deleted, not made a space
    ("U.S.A.", "USA", True), ("red-car", "red car", False),
    ("The", "a", False),  # nothing left after dropping the articles
])
def test_grade_free_form(response, reference, expected):
    assert grade(response, reference, answer_type="free_form") is expected


def test_grade_alternatives():
    # "x<OR>y" accepts either (MM-Vet); each alternative is graded by the item's rules
    assert grade("1/2", "0.5<OR>half", answer_type="free_form")
    assert grade("Half.", "0.5<OR>half", answer_type="free_form")
    assert not grade("2", "0.5<OR>half", answer_type="free_form")


def test_answer_correct_missing_answer():
    assert not answer_correct(None, "yes", answer_type="yes_no")
    assert not answer_correct("", "", answer_type="free_form")
    assert not grade(None, "3")


# ----------------------------------------------------------------------------
# parse_choices


@pytest.mark.parametrize("question, expected", [
    ("Which colour? A. red B. blue C. green", ["red", "blue", "green"]),
    ("Which colour? (A) red (B) blue", ["red", "blue"]),
    ("Which colour? A) red B) blue C) green D) yellow", ["red", "blue", "green", "yellow"]),
    ("Which shape is largest? A. the red circle B. the big blue square C. a small triangle",
     ["the red circle", "the big blue square", "a small triangle"]),
    ("A: yes B: no", ["yes", "no"]),
    ("Pick one:\nA. two circles,\nB. three squares;\n", ["two circles", "three squares"]),
    # a capital A as an ordinary word is not a mark (no '.', ')' or ':' after it)
    ("A red circle is where? A. left B. right", ["left", "right"]),
])
def test_parse_choices(question, expected):
    assert parse_choices(question) == expected


@pytest.mark.parametrize("question", [
    "How many red circles are there?",
    "Which colour? A. red",                  # only one option
    "Which colour? B. red C. blue D. green",  # starts at B
    "Which colour? A.red B.blue",            # no space after the marks
    "Which colour? xA. red yB. blue",        # marks glued to words
])
def test_parse_choices_none(question):
    assert parse_choices(question) is None


def test_parse_choices_run_stops_at_skipped_letter():
    choices = parse_choices("Which colour? A. red B. blue D. green")
    assert choices is not None and len(choices) == 2
    assert choices[0] == "red"


def test_parse_choices_last_option_text_ends_at_next_mark():
    assert parse_choices("Which colour? A. red B. blue D. green") == ["red", "blue"]


# ----------------------------------------------------------------------------
# Answers a careful grader accepts, in the forms models write them


@pytest.mark.parametrize("response, reference", [
    ("I think it is B, the blue one.", "B"),       # the letter, then the option's text
    ("It is B, blue.", "B"), ("The answer is B, blue", "B"), ("My answer: (B) blue", "B"),
    ("Looking again, blue (B)", "B"),               # the text, then the letter in brackets
    ("So the answer is C) green", "C"),
])
def test_grade_an_option_named_by_letter_and_text(response, reference):
    assert grade(response, reference, MC, "multiple_choice")
    assert grade(response, reference, MC)  # inferred: choices make it multiple choice


@pytest.mark.parametrize("response", [
    "A, red or B, blue",            # a hedge names two options
    "It is B, the red one.",        # letter and text disagree: no option named both ways
    "I think it is blue or green",  # two texts, no letter
    r"\boxed{B} or \boxed{A}",       # the last box wins: A
])
def test_grade_an_option_named_two_ways_stays_wrong(response):
    assert not grade(response, "B", MC, "multiple_choice")
    assert not grade(response, "B", MC)


@pytest.mark.parametrize("response, reference, answer_type", [
    (r"\boxed{1\frac{1}{2}}", "1.5", "float"),          # a mixed number: 1 + 1/2
    (r"1 \dfrac{3}{4}", "7/4", "float"), (r"\boxed{-2\frac{1}{4}}", "-2.25", "float"),
    (r"\boxed{x = 5}", "5", "integer"),                 # an equation giving the value
    (r"\boxed{y_1 = 2.5}", "2.5", "float"), (r"$x = \frac{1}{2}$", "0.5", "float"),
    (r"\boxed{3 \times 10^{3}}", "3000", "integer"),    # scientific notation
    (r"2.5\cdot 10^{-2}", "0.025", "float"), ("10^6", "1000000", "integer"),
    (r"\boxed{three}", "3", "integer"),                 # number words
    ("Twenty-one", "21", "integer"), ("forty two", "42", "integer"),
    (r"\boxed{3}", "three", "integer"), ("zero", "0", "integer"),
])
def test_grade_numbers_as_models_write_them(response, reference, answer_type):
    assert grade(response, reference, answer_type=answer_type)
    assert grade(response, reference)  # the inferred type grades these alike


@pytest.mark.parametrize("response, reference", [
    (r"\boxed{x = y + 1}", "1"),        # an equation, not a value
    (r"\boxed{1\frac{1}{2}}", "1"), (r"1\frac{1}{2}", "0.5"),
    (r"\boxed{3 \times 10^{2}}", "3000"), ("2^3", "8"),  # a power of another base: not read
    ("three or four", "3"), ("3 or 4", "3"),           # hedges stay wrong
    ("three apples", "3"),  # a word number keeps its unit: "three or four" must stay a hedge
    ("", "3"), ("none", "0"), ("twenty-ten", "30"),
])
def test_grade_numbers_as_models_write_them_rejects(response, reference):
    assert not grade(response, reference)
    assert not grade(response, reference, answer_type="integer")


def test_number_words_and_values_vote_together():
    """Training votes read the same spellings: three, 3, x = 3 and 3 \times 10^{0} are one
    answer."""
    assert majority_vote(["three", "3", "x = 3", r"3 \times 10^{0}", "4"]) == ("three", 0.8)
