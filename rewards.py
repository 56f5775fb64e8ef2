"""Rewards of VisPlay's two roles, and the answer matching they rely on.

The Questioner writes a question about an image; the Reasoner answers it several
times. Everything here is a pure function of strings and numbers:

  answers:     extract_boxed, normalize_answer, answers_equivalent, majority_vote
               (the majority answer is the "silver answer", its share the "confidence")
  benchmarks:  extract_answer, infer_answer_type, answer_correct, grade
               (evaluation only: a lenient extraction when there is no box, and rules per answer type)
  Questioner:  uncertainty_reward      peaks when the Reasoner is split 50/50
               sentence_bleu, bleu_distance_matrix, average_linkage_clusters,
               diversity_penalty       penalises questions that look like the others
               questioner_reward       uncertainty - weight * penalty
  Reasoner:    has_boxed_format, reasoner_reward   0.9 * correct + 0.1 * boxed

The same answer matching grades benchmarks, so a rule added here changes both. Training rewards
and votes read only the last `\\boxed{}`; benchmark grading also accepts an unboxed answer.
"""

import itertools
import math
import re
from collections import Counter
from fractions import Fraction
from typing import NamedTuple

import numpy as np

# ----------------------------------------------------------------------------
# Answer extraction and equivalence

_BOXED = re.compile(r"\\boxed\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` in `text`, or None.

    Braces nest (`\\boxed{\\frac{1}{2}}` -> `\\frac{1}{2}`); escaped braces `\\{`
    do not count. A box that never closes is skipped, so an earlier complete
    box can still be the answer.
    """
    answer = None
    for match in _BOXED.finditer(text):
        depth, i = 1, match.end()
        while i < len(text) and depth:
            if text[i] == "\\":  # skip the escaped character, e.g. \{ or \}
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            answer = text[match.end():i - 1]
    return answer


class _Canonical(NamedTuple):
    text: str                 # what normalize_answer returns
    number: Fraction | None   # exact value when the answer is a number
    is_percent: bool          # the number was written with a % sign


_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_DELETE = re.compile(r"\\left|\\right|\\displaystyle|\\[!,;: ]|\\\(|\\\)|\\\[|\\\]|\\\$|\$|\*\*")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree")
_LABEL = r"(?:(?:the\s+)?(?:answer|option|choice)(?:\s+is)?\s*:?\s*)?"
_LETTER_IN_PARENS = re.compile(_LABEL + r"\(([a-z])\)(?:\s.*)?")    # "(b)", "option (b) red"
_BARE_LETTER = re.compile(_LABEL + r"([a-z])(?:[.:)](?:\s+.*)?)?")   # "b", "b.", "b: red", "option b"
_OPTION_PREFIX = re.compile(r"\(?([a-z])[.:)]\s+")                   # "a) red" in an option text
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d{1,3})?")  # bounded exponent: 1e99999 stays text
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_SLASH = re.compile(r"([+-]?[\d.]+)\s*/\s*([\d.]+)")
_FRAC = re.compile(r"([+-]?)\\[dt]?frac\s*(\{[^{}]*\}|\d)\s*(\{[^{}]*\}|\d)")
_SPACED_UNIT = re.compile(r"(.*?\S)\s+[a-z]+(?:\s+[a-z]+)?(?:\^\{?\d\}?)?")  # "12 cm", "3 red apples", "5 m^2"
_ATTACHED_UNIT = re.compile(r"(.*?\d)(?:mm|cm|km|m|kg|mg|g|ml|l|s|ms|min|h|ft|in|px)(?:\^\{?\d\}?|\d)?")
_YES, _NO = {"yes", "true", "correct", "y"}, {"no", "false", "incorrect", "n"}


def _parse_number(s: str) -> Fraction | None:
    """Exact value of an integer, decimal, `a/b` or `\\frac{a}{b}`; None otherwise."""
    s = s.strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    if _DECIMAL.fullmatch(s):
        return Fraction(s[:-1] if s.endswith(".") else s)
    slash, frac = _SLASH.fullmatch(s), _FRAC.fullmatch(s)
    if slash is None and frac is None:
        return None
    sign, top, bottom = ("", *slash.groups()) if slash else frac.groups()
    numerator, denominator = _parse_number(top.strip("{}")), _parse_number(bottom.strip("{}"))
    if numerator is None or not denominator:  # not a number, or division by zero
        return None
    return -numerator / denominator if sign == "-" else numerator / denominator


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
    is_percent = s.endswith("%")
    s = s.rstrip("%").strip()
    number = _parse_number(s)
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
    return _canonical_equal(_canonical(predicted, choices), _canonical(reference, choices), percent_as_decimal)


def majority_vote(answers: list[str | None], choices: list[str] | None = None) -> tuple[str | None, float]:
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
_ANSWER_PHRASE = re.compile(r"\banswer\s*(?:is\s*:?|:)\s*", re.IGNORECASE)  # "the answer is", "Answer:"
_ENDING_LETTER = re.compile(r"(?:^|[\s:*])\(?([A-Z])\)?[.:*]*$")  # a line ending in "B", "(B).", "**B**"
_LEADING_YES_NO = re.compile(r"[^\w]*(yes|no)\b")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def extract_answer(text: str | None, choices: list[str] | None = None) -> str | None:
    """The answer a response gives, for grading a benchmark; None when there is nothing to read.

    In order, the first rule that applies:
    1. the last complete `\\boxed{...}` (what training rewards require);
    2. the text after the last "answer is" / "answer:" (to the end of its line, cut at ". ");
    3. with `choices`: an option letter that ends the last line ("... so (B).", "**B**");
    4. the last non-empty line.
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
            return re.split(r"\.\s", line[phrases[-1].end():])[0].strip(" *").rstrip(".")
    if not lines:
        return None
    letter = _ENDING_LETTER.search(lines[-1])
    if choices and letter and ord(letter.group(1)) - ord("A") < len(choices):
        return letter.group(1)
    return lines[-1]


def infer_answer_type(reference: str, choices: list[str] | None = None) -> str:
    """Answer type of a benchmark item whose file does not give one: one of ANSWER_TYPES.

    choices -> "multiple_choice"; "yes" / "no" -> "yes_no"; a number (units, %, LaTeX allowed) ->
    "integer" or "float" by value; anything else -> "free_form". "percentage" is never inferred: a
    benchmark says so per item, because it makes "0.5" and "50%" the same answer.
    """
    if choices:
        return "multiple_choice"
    if reference.strip().lower().rstrip(".") in ("yes", "no"):
        return "yes_no"
    number = _canonical(reference, None).number
    if number is not None:
        return "integer" if number.denominator == 1 else "float"
    return "free_form"


def normalize_text(answer: str) -> str:
    """Free-form normal form: `normalize_answer`, then punctuation deleted and the articles a / an / the
    dropped, as SQuAD's answer normalisation does.

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
    - percentage: a number written with % is also read as a fraction ("50%" == "0.5"; "50" != "0.5");
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
        if answer_type == "free_form" and normalize_text(answer) and normalize_text(answer) == normalize_text(option):
            return True
    return False


def grade(response: str | None, reference: str, choices: list[str] | None = None,
          answer_type: str | None = None) -> bool:
    """True if a model's response answers a benchmark item correctly: `extract_answer`, then
    `answer_correct`."""
    return answer_correct(extract_answer(response, choices), reference, choices, answer_type)


# ----------------------------------------------------------------------------
# Questioner: uncertainty


def uncertainty_reward(confidence: float, scale: float = 1.0) -> float:
    """scale * (1 - 2 |p - 1/2|): highest when the Reasoner's votes split evenly.

    p = 0.5 -> scale; p = 0 or 1 -> 0. The paper uses scale = 1; the released
    code's min(p, 1 - p) is exactly scale = 0.5.
    """
    if not 0.0 <= confidence <= 1.0:
        raise ValueError(f"confidence must be a vote share in [0, 1], got {confidence}")
    return scale * (1.0 - 2.0 * abs(confidence - 0.5))


# ----------------------------------------------------------------------------
# Questioner: diversity (BLEU distance + average-linkage clustering)

_BLEU_ORDERS = 4
_SMOOTHING_EPSILON = 0.1  # nltk SmoothingFunction().method1
_DENSE_COLUMNS = 4096  # n-grams per dense indicator block: [N, 4096] float32
_PAIRS_PER_CHUNK = 1 << 22  # sentence pairs enumerated at once for rare n-grams


def sentence_bleu(hypothesis: list[str], reference: list[str]) -> float:
    """BLEU-4 of one tokenised hypothesis against one reference.

    Same value as nltk's `sentence_bleu([reference], hypothesis,
    smoothing_function=SmoothingFunction().method1)`: clipped n-gram precisions
    for n = 1..4 over max(1, #hypothesis n-grams); 0 if no unigram matches; a
    zero precision becomes 0.1 / its denominator; geometric mean times the
    brevity penalty exp(1 - r/c) when the hypothesis is not longer (c <= r).
    """
    log_precision = 0.0
    for n in range(1, _BLEU_ORDERS + 1):
        hyp = Counter(tuple(hypothesis[i:i + n]) for i in range(len(hypothesis) - n + 1))
        ref = Counter(tuple(reference[i:i + n]) for i in range(len(reference) - n + 1))
        matches = sum(min(count, ref.get(gram, 0)) for gram, count in hyp.items())
        denominator = max(1, len(hypothesis) - n + 1)
        if n == 1 and matches == 0:
            return 0.0
        log_precision += math.log((matches or _SMOOTHING_EPSILON) / denominator) / _BLEU_ORDERS
    c, r = len(hypothesis), len(reference)
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_precision)


def bleu_distance_matrix(questions: list[str]) -> np.ndarray:
    """Pairwise distances 1 - BLEU between whitespace-tokenised questions.

    Returns float64 [N, N], symmetric, zero diagonal. As in the released code
    each pair is scored once, with the earlier question as hypothesis:
    d[i, j] = d[j, i] = 1 - sentence_bleu(questions[i].split(), questions[j].split())
    for i < j. Vectorised over all pairs (N in the thousands per GRPO step).
    """
    n_questions = len(questions)
    tokens = [q.split() for q in questions]
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    vocab: dict[str, int] = {}
    flat = np.array([vocab.setdefault(tok, len(vocab)) for t in tokens for tok in t], dtype=np.int64)
    sentence_of = np.repeat(np.arange(n_questions), lengths)
    tokens_left = np.repeat(lengths, lengths) - (np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths))

    # log_score[i, j] accumulates log BLEU of hypothesis i against reference j.
    log_score = np.zeros((n_questions, n_questions))
    start, gram = np.arange(len(flat)), flat  # n-gram starting at each position, as an id
    for n in range(1, _BLEU_ORDERS + 1):
        if n > 1:  # extend each (n-1)-gram by the next token, then renumber
            keep = tokens_left[start] >= n
            start, gram = start[keep], gram[keep]
            gram = np.unique(gram * max(len(vocab), 1) + flat[start + n - 1], return_inverse=True)[1]
        matches = _clipped_match_matrix(sentence_of[start], gram, n_questions)
        denominator = np.maximum(1, lengths - n + 1).astype(np.float64)
        for a, b in _row_blocks(n_questions):  # rows a:b, columns a: covers the upper triangle
            block = matches[a:b, a:].astype(np.float64)
            if n == 1:  # no unigram in common: BLEU is 0, whatever the smoothing does
                log_score[a:b, a:][block == 0] = -np.inf
            block[block == 0] = _SMOOTHING_EPSILON
            log_score[a:b, a:] += np.log(block / denominator[a:b, None]) / _BLEU_ORDERS
        del matches

    c = np.maximum(lengths, 1).astype(np.float64)  # c = 0 rows are already -inf
    r = lengths.astype(np.float64)
    distance = log_score  # turned into 1 - BLEU in place, to keep one [N, N] float64 alive
    for a, b in _row_blocks(n_questions):
        block = distance[a:b, a:]
        block += np.minimum(0.0, 1.0 - r[None, a:] / c[a:b, None])  # log brevity penalty
        np.exp(block, out=block)
        np.subtract(1.0, block, out=block)
        square = distance[a:b, a:b]
        square[np.tril_indices(b - a)] = 0.0  # diagonal and below were scratch
        square += square.T.copy()
        distance[a:b, :a] = distance[:a, a:b].T  # mirror the upper triangle
    return distance


def _row_blocks(n: int, block: int = 512) -> list[tuple[int, int]]:
    return [(a, min(a + block, n)) for a in range(0, n, block)]


def _clipped_match_matrix(sentence: np.ndarray, gram: np.ndarray, n_sentences: int) -> np.ndarray:
    """M[i, j] = sum_g min(count_i(g), count_j(g)): clipped n-gram matches, i < j.

    sentence, gram: [T] int, one row per n-gram occurrence. Returns float32
    [N, N] (exact: counts are small integers) whose upper triangle is right;
    the rest is partial and must be ignored. An n-gram shared by many sentences
    is added with a dense indicator matmul (cost N^2 per n-gram, via BLAS); a rare
    one by enumerating its pairs of sentences (cost ~ df^2 / 2 per n-gram).
    """
    n_grams = int(gram.max()) + 1 if len(gram) else 0
    keys, counts = np.unique(sentence * n_grams + gram, return_counts=True)
    rows, cols = keys // max(n_grams, 1), keys % max(n_grams, 1)
    doc_freq = np.bincount(cols, minlength=n_grams)[cols]
    matches = np.zeros((n_sentences, n_sentences), dtype=np.float32)

    # min(a, b) = sum_{t >= 1} [a >= t][b >= t], so M = sum_t B_t @ B_t.T with 0/1 matrices.
    dense = doc_freq >= max(32, n_sentences // 16)
    dense_rows, dense_cols, dense_counts = rows[dense], cols[dense], counts[dense]
    for t in range(1, int(dense_counts.max(initial=0)) + 1):
        used = dense_counts >= t
        t_rows = dense_rows[used]
        t_cols = np.unique(dense_cols[used], return_inverse=True)[1]  # renumber 0..K_t-1
        for a in range(0, int(t_cols.max(initial=-1)) + 1, _DENSE_COLUMNS):
            in_block = (t_cols >= a) & (t_cols < a + _DENSE_COLUMNS)
            indicator = np.zeros((n_sentences, min(_DENSE_COLUMNS, int(t_cols.max()) + 1 - a)), dtype=np.float32)
            indicator[t_rows[in_block], t_cols[in_block] - a] = 1.0
            matches += indicator @ indicator.T

    # Rare n-grams: entries sorted by (gram, sentence); pair each with the later ones of its gram.
    sparse = ~dense & (doc_freq >= 2)  # a gram in one sentence only matches nothing
    order = np.lexsort((rows[sparse], cols[sparse]))
    rows, cols, counts, doc_freq = (x[sparse][order] for x in (rows, cols, counts, doc_freq))
    position = np.arange(len(cols)) - np.searchsorted(cols, cols)  # rank within its gram
    partners = doc_freq - 1 - position
    budget = _PAIRS_PER_CHUNK
    chunk_ends = np.searchsorted(np.cumsum(partners), np.arange(budget, partners.sum() + budget, budget), "right")
    flat_matches = matches.reshape(-1)
    begin = 0
    for end in np.unique(np.append(chunk_ends, len(cols))):
        if end <= begin:
            continue
        p = partners[begin:end]
        left = np.repeat(np.arange(begin, end), p)
        right = left + 1 + np.arange(len(left)) - np.repeat(np.cumsum(p) - p, p)
        np.add.at(flat_matches, rows[left] * n_sentences + rows[right],
                  np.minimum(counts[left], counts[right]).astype(np.float32))
        begin = end
    return matches


def average_linkage_clusters(distance: np.ndarray, threshold: float) -> np.ndarray:
    """Agglomerative clustering, average linkage, cut where merges reach `threshold`.

    distance: [N, N] symmetric, precomputed. Clusters merge while the closest
    pair's average distance is strictly below `threshold` (sklearn's
    AgglomerativeClustering(distance_threshold=threshold, metric="precomputed",
    linkage="average")). Returns [N] int labels, numbered from 0 in order of first
    appearance. O(N^2): nearest-neighbour chain with Lance-Williams updates, exact
    because average linkage is reducible (a merge never brings a cluster closer).
    """
    distance = np.asarray(distance, dtype=np.float64)
    if distance.ndim != 2 or distance.shape[0] != distance.shape[1]:
        raise ValueError(f"distance must be a square [N, N] matrix, got shape {distance.shape}")
    if np.isnan(distance).any():
        raise ValueError("distance contains NaN")
    if not np.array_equal(distance, distance.T):
        raise ValueError("distance must be exactly symmetric; symmetrise it first, e.g. (d + d.T) / 2")
    n = len(distance)
    d = distance.copy()
    np.fill_diagonal(d, np.inf)  # inactive clusters get inf rows/columns too, so argmin skips them
    size = np.ones(n)
    label = np.arange(n)
    active = n
    chain: list[int] = []
    while active > 1:
        if not chain:
            chain.append(int(np.flatnonzero(size)[0]))  # start from any active cluster
        x = chain[-1]
        y = int(np.argmin(d[x]))
        if len(chain) > 1 and d[x, chain[-2]] <= d[x, y]:
            y = chain[-2]  # prefer the previous link on ties, so the chain cannot cycle
        if not d[x, y] < threshold:
            # x's nearest cluster is too far, and distances along the chain only
            # shrink, so no cluster on the chain can merge any more: retire them all.
            for z in chain:
                d[z, :] = d[:, z] = np.inf
                size[z] = 0
            active -= len(chain)
            chain.clear()
            continue
        if len(chain) == 1 or y != chain[-2]:
            chain.append(y)
            continue
        chain.pop()
        chain.pop()
        # Merge x into y. Lance-Williams for average linkage: size-weighted mean of rows.
        merged = (size[x] * d[x] + size[y] * d[y]) / (size[x] + size[y])
        d[y, :] = d[:, y] = merged
        d[y, y] = np.inf
        d[x, :] = d[:, x] = np.inf
        size[y] += size[x]
        size[x] = 0
        label[label == x] = y
        active -= 1
    _, first_index, inverse = np.unique(label, return_index=True, return_inverse=True)
    rank = np.empty(len(first_index), dtype=np.int64)
    rank[np.argsort(first_index)] = np.arange(len(first_index))
    return rank[inverse]


def diversity_penalty(questions: list[str], threshold: float = 0.5) -> np.ndarray:
    """Share of the step's questions in each question's BLEU cluster, [N] float.

    Questions are clustered by average linkage on 1 - BLEU; question i gets
    |cluster(i)| / N. Empty strings (invalid questions) are at distance 1 from
    everything, so they stay singletons.
    """
    if not questions:
        return np.zeros(0)
    labels = average_linkage_clusters(bleu_distance_matrix(questions), threshold)
    return np.bincount(labels)[labels] / len(questions)


def questioner_reward(valid: bool, confidence: float | None, penalty: float, uncertainty_scale: float = 1.0,
                      diversity_weight: float = 1.0, invalid_reward: float = -1.0) -> float:
    """Reward of one generated question: uncertainty (or `invalid_reward`) - weight * penalty.

    valid: the question parsed and the Reasoner's votes gave a `confidence`.
    """
    if not valid:
        return invalid_reward - diversity_weight * penalty
    if confidence is None:
        raise ValueError("a valid question needs the confidence of its majority vote, got None")
    return uncertainty_reward(confidence, uncertainty_scale) - diversity_weight * penalty


# ----------------------------------------------------------------------------
# Reasoner


def has_boxed_format(response: str) -> bool:
    """True if the response has a complete, non-empty `\\boxed{...}` answer."""
    answer = extract_boxed(response)
    return answer is not None and answer.strip() != ""


def reasoner_reward(response: str, silver_answer: str, choices: list[str] | None = None,
                    accuracy_weight: float = 0.9, format_weight: float = 0.1) -> float:
    """accuracy_weight * [boxed answer equals the silver answer] + format_weight * [boxed]."""
    correct = answers_equivalent(extract_boxed(response), silver_answer, choices)
    return accuracy_weight * float(correct) + format_weight * float(has_boxed_format(response))
