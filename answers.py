"""Answers: extraction, equivalence, majority voting and benchmark grading.

Pure functions of strings, shared by training and evaluation, so a rule added here changes both:

  extract_boxed        the last complete `\\boxed{}`: what training rewards and votes read
  normalize_answer     one canonical string for the spellings of one answer
  answers_equivalent   numbers by value, option letters and texts, yes/no synonyms
  majority_vote        the silver answer (largest cluster of equivalent answers) and its share
  extract_answer       benchmark grading: also accepts an unboxed answer ("The answer is B.")
  answer_correct       benchmark grading: the rules of each answer type (ANSWER_TYPES)
  parse_choices        the option texts a question lists ("A. x B. y"), for questions and benchmarks
"""

import itertools
import re
from fractions import Fraction
from typing import NamedTuple

# Option letters, A first: benchmark options, the toy world's A-D questions.
OPTION_LETTERS = "ABCDEFGH"

# ----------------------------------------------------------------------------
# Options listed in a question

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


# ----------------------------------------------------------------------------
# Answer extraction and equivalence

_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` in `text`, or None.

    Braces nest (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); escaped braces `\\{`
    do not count. A box that never closes is skipped, so an earlier complete
    box can still be the answer.

    Linear in the length of the text, however many boxes never close (a model
    caught in a repetition loop writes thousands): one right-to-left pass finds,
    for every position after the first box, where the first brace that closes a
    group opened before it stands (`closing`), so each box's end is one lookup.
    """
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return None
    first, n = boxes[0].end(), len(text)
    # closing[j - first]: the index just past the first "}" that, read from j on, closes a group
    # opened before j (an escaped character skipped, a nested group skipped whole); None: none
    closing = [None] * (n - first + 2)
    for j in range(n - 1, first - 1, -1):
        char = text[j]
        if char == "}":
            end = j + 1
        elif char == "{":  # a nested group: skip it, then look on after it
            inner = closing[j + 1 - first]
            end = None if inner is None else closing[inner - first]
        elif char == "\\":  # the escaped character is not a brace
            end = closing[j + 2 - first]
        else:
            end = closing[j + 1 - first]
        closing[j - first] = end
    for box in reversed(boxes):  # the last box that closes
        end = closing[box.end() - first]
        if end is not None:
            return text[box.end():end - 1]
    return None


class _Canonical(NamedTuple):
    text: str                 # what normalize_answer returns
    number: Fraction | None   # exact value when the answer is a number
    is_percent: bool          # the number was written with a % sign


_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DELETE = re.compile(r"\\left|\\right|\\displaystyle|\\[!,;: ]|\\\(|\\\)|\\\[|\\\]|\\\$|\$|\*\*")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_LABEL = r"(?:(?:the\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*)?"
_LETTER_IN_PARENS = re.compile(_LABEL + r"\(([a-z])\)(?:\s.*)?")  # "(b)", "option (b) red"
# "b", "b.", "b: red", "option b"
_BARE_LETTER = re.compile(_LABEL + r"([a-z])(?:[.:)](?:\s+.*)?)?")
_OPTION_PREFIX = re.compile(r"\(?([a-z])[.:)]\s+")  # "a) red" in an option text
# a bounded exponent: "1e99999" stays text
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d{1,3})?")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_SLASH = re.compile(r"([+-]?[\d.]+)\s*/\s*([\d.]+)")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")
# 1\frac{1}{2}: a whole number, then a fraction
_MIXED = re.compile(r"([+-]?)(\d+)\s*(\\[dt]?frac\s*(?:\{[^{}]*\}|\d)\s*(?:\{[^{}]*\}|\d))")
# "3 \times 10^{3}", "2.5\cdot10^{-2}", "10^6" (a bounded exponent)
_SCIENTIFIC = re.compile(r"(?:([+-]?(?:\d+\.?\d*|\.\d+))\s*(?:\\times|\\cdot|×|\*)\s*)?"
                         r"10\s*\^\s*\{?\s*([+-]?\d{1,3})\s*\}?")
# "x = 5", "x_1 = 2.5": an equation that gives the value of one unknown
_GIVEN_VALUE = re.compile(r"[a-z](?:_\{?\w+\}?)?\s*=\s*(.+)")
_NUMBER_WORDS = {word: value for value, word in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70,
         "eighty": 80, "ninety": 90}
# "12 cm", "3 red apples", "5 m^2"
_SPACED_UNIT = re.compile(r"(.*?\S)\s+[a-z]+(?:\s+[a-z]+)?(?:\^\{?\d\}?)?")
_ATTACHED_UNIT = re.compile(
    r"(.*?\d)(?:mm|cm|km|m|kg|mg|g|ml|l|s|ms|min|h|ft|in|px)(?:\^\{?\d\}?|\d)?")
_YES, _NO = {"yes", "true", "correct", "y"}, {"no", "false", "incorrect", "n"}


def _parse_number(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, `a/b`, `\\frac{a}{b}`, a mixed number
    (`1\\frac{1}{2}`) or scientific notation (`3 \\times 10^{3}`); None otherwise."""
    s = s.strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        return Fraction(s[:-1] if s.endswith(".") else s)
    if (mixed := _MIXED.fullmatch(s)) is not None:
        sign, whole, fraction = mixed.groups()
        value = _parse_number(fraction)
        if value is not None:
            value += int(whole)
            return -value if sign == "-" else value
    if (scientific := _SCIENTIFIC.fullmatch(s)) is not None:
        mantissa, exponent = scientific.groups()
        mantissa = Fraction(1) if mantissa is None else _parse_number(mantissa)
        if mantissa is not None:
            return mantissa * Fraction(10) ** int(exponent)
    slash, frac = _SLASH.fullmatch(s), _FRAC.fullmatch(s)
    if slash is None and frac is None:
        return None
    sign, top, bottom = ("", *slash.groups()) if slash else frac.groups()
    numerator, denominator = _parse_number(top.strip("{}")), _parse_number(bottom.strip("{}"))
    if numerator is None or not denominator:  # not a number, or division by zero
        return None
    return -numerator / denominator if sign == "-" else numerator / denominator


def _value(s: str) -> Fraction | None:
    """`_parse_number`, or the value of a number word ("three", "twenty-one": 0 to 99)."""
    number = _parse_number(s)
    if number is not None:
        return number
    s = s.strip()
    if s in _NUMBER_WORDS:
        return Fraction(_NUMBER_WORDS[s])
    tens, _, ones = s.replace("-", " ").partition(" ")
    if tens in _TENS and (not ones or _NUMBER_WORDS.get(ones, 10) < 10):
        return Fraction(_TENS[tens] + (_NUMBER_WORDS[ones] if ones else 0))
    return None


def _format_number(value: Fraction) -> str:
    """"3" for integers, else the shortest float repr ("0.5", "0.3333333333333333")."""
    return str(value.numerator) if value.denominator == 1 else repr(float(value))


def _canonical(answer: str, choices: list[str] | None) -> _Canonical:
    s = extract_boxed(answer)
    s = answer if s is None else s
    while (unwrapped := _WRAPPER.sub(r"\1", s)) != s:  # innermost first, so nesting unwraps too
        s = unwrapped
    s = _DELETE.sub("", s).replace("−", "-").lower()
    s = " ".join(s.split())
    if choices:
        for pattern in (_LETTER_IN_PARENS, _BARE_LETTER):
            letter = pattern.fullmatch(s)
            if letter and ord(letter.group(1)) - ord("a") < len(choices):
                return _Canonical(letter.group(1), None, False)
    s = s.lstrip("*\"'` :").rstrip("*\"'` .,;:!?")
    while len(s) >= 2 and s[0] + s[-1] in ("()", "[]", "{}") and _encloses(s):
        s = s[1:-1].strip()
    if re.fullmatch(r"\(?[a-z]\)", s):  # "b)" and "(b)" left unbalanced by the strip above
        s = s.strip("()")
    s = _DEGREE.sub("", s).replace("\\%", "%").strip()
    if (given := _GIVEN_VALUE.fullmatch(s)) and _value(given.group(1).rstrip("%")) is not None:
        s = given.group(1).strip()  # "x = 5": the value
    is_percent = s.endswith("%")
    s = s.rstrip("%").strip()
    number = _value(s)
    if number is None:  # "12 cm", "3 apples", "12cm": drop the unit if a number is left
        for unit in (_SPACED_UNIT, _ATTACHED_UNIT):
            if (m := unit.fullmatch(s)) and (number := _parse_number(m.group(1))) is not None:
                break
    if number is not None:
        canonical = _Canonical(_format_number(number), number, is_percent)
    else:
        canonical = _Canonical("yes" if s in _YES else "no" if s in _NO else s, None, is_percent)
    for index, option in enumerate(choices or []):  # the text of an option stands for its letter
        option = option.strip()
        prefix = _OPTION_PREFIX.match(option.lower())
        if prefix and prefix.group(1) == chr(ord("a") + index):  # options written "A. red"
            option = option[prefix.end():]
        if _canonical_equal(canonical, _canonical(option, None), False):
            return _Canonical(chr(ord("a") + index), None, False)
    return canonical


def _encloses(s: str) -> bool:
    """True if s[0] and s[-1] are one bracket pair: "(1, 2)" yes, "(1)+(2)" no."""
    depths = itertools.accumulate((ch in "([{") - (ch in ")]}") for ch in s[:-1])
    return all(depth > 0 for depth in depths)


def normalize_answer(answer: str, choices: list[str] | None = None) -> str:
    """Canonical string form of an answer, so that spellings of one answer agree.

    Unwraps `\\boxed`, `\\text{}`-like wrappers, `$`, `\\( \\)`, `\\left`, `**`;
    lowercases; strips surrounding punctuation ("(B)", "B." -> "b"), degrees,
    the % sign, and a unit after a number ("12 cm" -> "12"). Numbers become
    their value: "1,000" -> "1000", "\\frac{1}{2}" and "1/2" -> "0.5". Yes/no
    synonyms become "yes"/"no". With `choices` (option texts; index 0 is letter
    A), a letter ("(B)", "option B", "B: red") or an option's own text maps to
    that letter, lowercase ("b").
    """
    return _canonical(answer, choices).text


def answer_number(answer: str) -> Fraction | None:
    """The value of an answer that is a number by `normalize_answer`'s rules ("45%" -> 45,
    "3 cars" -> 3, "\\frac{1}{2}" -> 1/2, "1,000" -> 1000), else None."""
    return _canonical(answer, None).number


def _numbers_close(a: Fraction, b: Fraction) -> bool:
    # Integers exactly (100000 vs 100001 is within 1e-4); others to a relative 1e-4.
    if a.denominator == 1 and b.denominator == 1:
        return a == b
    return abs(a - b) <= max(Fraction(1, 10**4) * max(abs(a), abs(b)), Fraction(1, 10**9))


def _canonical_equal(a: _Canonical, b: _Canonical, percent_as_decimal: bool) -> bool:
    if a.number is not None and b.number is not None:
        values_a = {a.number} | ({a.number / 100} if percent_as_decimal and a.is_percent else set())
        values_b = {b.number} | ({b.number / 100} if percent_as_decimal and b.is_percent else set())
        return any(_numbers_close(x, y) for x in values_a for y in values_b)
    return a.text != "" and a.text == b.text


def answers_equivalent(predicted: str | None, reference: str | None,
                       choices: list[str] | None = None, percent_as_decimal: bool = False) -> bool:
    """True if two answers say the same thing, after `normalize_answer`.

    Numbers compare by value ("0.5" == "1/2" == "\\frac{1}{2}"): integers exactly,
    others within a relative 1e-4 (absolute 1e-9 near zero). "50%" equals "50",
    and equals "0.5" only with `percent_as_decimal`. Anything else must match as
    normalised strings. None or blank never equals anything, itself included.
    """
    if predicted is None or reference is None or not predicted.strip() or not reference.strip():
        return False
    return _canonical_equal(_canonical(predicted, choices), _canonical(reference, choices),
                            percent_as_decimal)


def majority_vote(answers: list[str | None], choices: list[str] | None = None) -> tuple[str | None,
                                                                                        float]:
    """Silver answer and confidence from the Reasoner's sampled answers.

    Answers are clustered greedily: each joins the first cluster whose first
    member (its representative) it is equivalent to, else starts a new one. The
    largest cluster wins, ties going to the one that started first; returns its
    representative as given and confidence = cluster size / len(answers).

    Invalid answers (None, or blank after normalisation) count in the
    denominator but never join or form a cluster, so they can never win; all
    invalid or no answers -> (None, 0.0). The released code stored a failed
    extraction as the string "None", which could win the vote; here extraction
    returns Python None instead. The literal string "None" is an ordinary answer.
    """
    representatives: list[tuple[str, _Canonical]] = []
    sizes: list[int] = []
    for answer in answers:
        if answer is None or not answer.strip():
            continue
        canonical = _canonical(answer, choices)
        if canonical.text == "":
            continue
        for k, (_, rep) in enumerate(representatives):
            if _canonical_equal(canonical, rep, False):
                sizes[k] += 1
                break
        else:
            representatives.append((answer, canonical))
            sizes.append(1)
    if not sizes:
        return None, 0.0
    best = max(range(len(sizes)), key=lambda k: (sizes[k], -k))  # earliest cluster wins ties
    return representatives[best][0], sizes[best] / len(answers)


# ----------------------------------------------------------------------------
# Benchmark grading (evaluation only)

ANSWER_TYPES = ("multiple_choice", "yes_no", "integer", "float", "percentage", "free_form")
# "the answer is", "Answer:"
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)
# a line ending in "B", "(B).", "**B**"
_ENDING_LETTER = re.compile(r"(?:^|[\s:*])\(?([A-Z])\)?[.:*]*$")
_LEADING_YES_NO = re.compile(r"[^\w]*(yes|no)\b")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def extract_answer(text: str | None, choices: list[str] | None = None) -> str | None:
    """The answer a response gives, for grading a benchmark; None when there is nothing to read.

    In order, the first rule that applies:
    1. the last complete `\\boxed{...}` (what training rewards require);
    2. the text after the last "answer is" / "answer:" (to the end of its line, cut at ". ");
    3. with `choices`: an option letter that ends the last line ("... so (B).", "**B**");
    4. the last non-empty line.
    With `choices`, the text rules 2 and 4 give is read for an option named by its letter and its
    text together ("B, the red circle": B; `_named_option`).
    Rules 2-4 are for evaluation only: an unboxed response earns no reward in training.
    """
    if text is None:
        return None
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        phrases = list(_ANSWER_PHRASE.finditer(line))
        if phrases and line[phrases[-1].end():].strip():
            answer = re.split(r"\.\s", line[phrases[-1].end():])[0].strip(" *").rstrip(".")
            return (choices and _named_option(answer, choices)) or answer
    if not lines:
        return None
    letter = _ENDING_LETTER.search(lines[-1])
    if choices and letter and ord(letter.group(1)) - ord("A") < len(choices):
        return letter.group(1)
    return (choices and _named_option(lines[-1], choices)) or lines[-1]


def _named_option(sentence: str, choices: list[str]) -> str | None:
    """The option letter a sentence names together with that option's text ("It is B, the red
    circle.", "B) red", "red (B)"), when it names exactly one option so; else None (a hedge
    naming two options is no answer). The letter must be a capital standing alone."""
    named = set()
    for index, option in enumerate(choices):
        letter = OPTION_LETTERS[index]
        option = option.strip()
        prefix = _OPTION_PREFIX.match(option.lower())
        if prefix and prefix.group(1) == letter.lower():  # options written "B. red"
            option = option[prefix.end():]
        body = r"\s+".join(map(re.escape, option.split()))
        if not body:
            continue
        alone = rf"(?<![A-Za-z0-9])\(?{letter}\)?(?![A-Za-z0-9])"
        if re.search(rf"{alone}[\s.:,)\]-]*(?i:the\s+)?(?i:{body})(?![a-z0-9])", sentence) or \
                re.search(rf"(?<![a-z0-9])(?i:{body})\s*\(\s*{letter}\s*\)", sentence):
            named.add(letter)
    return named.pop() if len(named) == 1 else None


def infer_answer_type(reference: str, choices: list[str] | None = None) -> str:
    """Answer type of a benchmark item whose file does not give one: one of ANSWER_TYPES.

    choices -> "multiple_choice"; "yes" / "no" -> "yes_no"; a number written with % ("25%") ->
    "percentage" (so "0.25" is read as 25% too); another number (units, LaTeX allowed) -> "integer"
    or "float" by value; anything else -> "free_form". A reference without % ("0.5") is never read
    as a percentage unless its file says so: "50%" is then not "0.5".
    """
    if choices:
        return "multiple_choice"
    if reference.strip().lower().rstrip(".") in ("yes", "no"):
        return "yes_no"
    canonical = _canonical(reference, None)
    if canonical.number is not None:
        if canonical.is_percent:
            return "percentage"
        return "integer" if canonical.number.denominator == 1 else "float"
    return "free_form"


def normalize_text(answer: str) -> str:
    """Free-form normal form: `normalize_answer`, then punctuation deleted and the articles
    a / an / the dropped, as SQuAD's answer normalisation does.

    "The Eiffel Tower." -> "eiffel tower"; "U.S.A." -> "usa"; "red-car" -> "redcar".
    """
    s = re.sub(r"[^\w\s]", "", normalize_answer(answer))
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_correct(answer: str | None, reference: str, choices: list[str] | None = None,
                   answer_type: str | None = None) -> bool:
    """Grade an extracted answer against a benchmark's reference by the rules of its answer type.

    All types: `answers_equivalent` (case, punctuation, LaTeX, units, numbers by value, option text
    or letter when `choices` are given). A reference "x<OR>y" accepts either (MM-Vet). By type:
    - yes_no: a leading "yes" / "no" word is the answer ("Yes, it is." -> yes; "not yes" is not);
    - integer: the answer must be an integer ("3.0" yes, "3.0001" no, though within 1e-4);
    - percentage: a number written with % is also read as a fraction ("50%" == "0.5";
      "50" != "0.5");
    - free_form: also equal after `normalize_text` (articles and punctuation dropped).
    `answer_type` None: inferred from the reference (`infer_answer_type`).
    """
    if answer is None or reference is None:
        return False
    answer_type = answer_type or infer_answer_type(reference, choices)
    if answer_type == "yes_no" and (lead := _LEADING_YES_NO.match(answer.lower())):
        answer = lead.group(1)
    if answer_type == "integer":
        number = _canonical(answer, None).number
        if number is not None and number.denominator != 1:
            return False
    for option in reference.split("<OR>"):
        if answers_equivalent(answer, option, choices, answer_type == "percentage"):
            return True
        if answer_type == "free_form" and normalize_text(answer):
            if normalize_text(answer) == normalize_text(option):
                return True
    return False
