"""Tests of rewards.py. Expected values are worked out by hand (arithmetic in the
comments) or by the slow, obvious implementations written in this file."""

import itertools
import math
import random

import numpy as np
import pytest

from rewards import (
    average_linkage_clusters,
    bleu_distance_matrix,
    diversity_penalty,
    has_boxed_format,
    questioner_reward,
    reasoner_reward,
    uncertainty_reward,
)

# ----------------------------------------------------------------------------
# Slow reference implementations


def slow_bleu(hyp: list[str], ref: list[str]) -> float:
    """nltk sentence_bleu, 4-gram, method1 smoothing, one reference: plain dict counting."""
    log_sum = 0.0
    for n in (1, 2, 3, 4):
        hyp_counts, ref_counts = {}, {}
        for i in range(len(hyp) - n + 1):
            hyp_counts[" ".join(hyp[i:i + n])] = hyp_counts.get(" ".join(hyp[i:i + n]), 0) + 1
        for i in range(len(ref) - n + 1):
            ref_counts[" ".join(ref[i:i + n])] = ref_counts.get(" ".join(ref[i:i + n]), 0) + 1
        clipped = 0
        for gram in hyp_counts:
            clipped += min(hyp_counts[gram], ref_counts.get(gram, 0))
        total = max(1, len(hyp) - n + 1)
        if n == 1 and clipped == 0:
            return 0.0
        precision = clipped / total if clipped > 0 else 0.1 / total
        log_sum += 0.25 * math.log(precision)
    c, r = len(hyp), len(ref)
    if c > r:
        bp = 1.0
    elif c == 0:
        bp = 0.0
    else:
        bp = math.exp(1 - r / c)
    return bp * math.exp(log_sum)


def sentence_bleu(hypothesis: list[str], reference: list[str]) -> float:
    """BLEU of one pair as the project computes it: 1 - the distance `bleu_distance_matrix` gives
    a pair whose earlier question is the hypothesis."""
    return 1 - bleu_distance_matrix([" ".join(hypothesis), " ".join(reference)])[0, 1]


def slow_average_linkage(d: np.ndarray, threshold: float) -> set[frozenset[int]]:
    """Repeatedly merge the closest pair of clusters (mean pairwise distance) while < threshold."""
    clusters = [[i] for i in range(len(d))]
    while len(clusters) > 1:
        best, pair = math.inf, None
        for a, b in itertools.combinations(range(len(clusters)), 2):
            mean = d[np.ix_(clusters[a], clusters[b])].mean()
            if mean < best:
                best, pair = mean, (a, b)
        if not best < threshold:
            break
        a, b = pair
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return {frozenset(c) for c in clusters}


def partition(labels: np.ndarray) -> set[frozenset[int]]:
    return {frozenset(np.flatnonzero(labels == k).tolist()) for k in np.unique(labels)}


# ----------------------------------------------------------------------------
# BLEU


def test_bleu_identical_sentences_is_one():
    s = "how many red circles are there".split()
    # every precision is k/k = 1 and c == r so bp = exp(0) = 1
    assert sentence_bleu(s, s) == pytest.approx(1.0, abs=1e-12)


def test_bleu_disjoint_sentences_is_zero():
    # no unigram in common: BLEU is 0 however the smoothing would treat the rest
    assert sentence_bleu("a b c d e".split(), "v w x y z".split()) == 0.0


def test_bleu_partial_overlap():
    hyp = "how many red circles are in the image".split()
    ref = "how many red circles are in the picture".split()
    # 8 tokens each, only the last differs: p1 = 7/8, p2 = 6/7, p3 = 5/6, p4 = 4/5;
    # product = 4/8 = 1/2; c == r so bp = 1; BLEU = (1/2) ** (1/4) = 0.8408964...
    assert sentence_bleu(hyp, ref) == pytest.approx(0.5 ** 0.25, abs=1e-12)


def test_bleu_brevity_penalty():
    hyp = "the cat sat on the mat".split()  # c = 6
    ref = "the cat sat on the red mat today".split()  # r = 8
    # p1 = 6/6 (the x2, cat, sat, on, mat all in ref; "the" clipped at 2 = its ref count)
    # p2 = 4/5 (the cat, cat sat, sat on, on the match; "the mat" does not)
    # p3 = 3/4 (the cat sat, cat sat on, sat on the; not "on the mat")
    # p4 = 2/3 (the cat sat on, cat sat on the; not "sat on the mat")
    # product = 1 * 4/5 * 3/4 * 2/3 = 0.4; bp = exp(1 - 8/6) = exp(-1/3)
    assert sentence_bleu(hyp, ref) == pytest.approx(0.4 ** 0.25 * math.exp(-1 / 3), abs=1e-12)
    # The other way round the longer sentence is the hypothesis: c = 8 > r = 6, bp = 1.
    # p1 = 6/8 ("red", "today" unmatched), p2 = 4/7, p3 = 3/6, p4 = 2/5
    # product = 6/8 * 4/7 * 3/6 * 2/5 = 144/1680 = 3/35
    assert sentence_bleu(ref, hyp) == pytest.approx((3 / 35) ** 0.25, abs=1e-12)


def test_bleu_clipping_and_smoothing():
    # "the" x4 in hyp, once in ref: p1 = min(4, 1)/4 = 1/4; no bigram matches:
    # p2 = 0.1/3, p3 = 0.1/2, p4 = 0.1/1; c = 4 > r = 2 so bp = 1
    expected = (0.25 * (0.1 / 3) * (0.1 / 2) * 0.1) ** 0.25  # = 0.0803...
    assert (sentence_bleu("the the the the".split(), "the cat".split())
            == pytest.approx(expected, abs=1e-12))


def test_bleu_short_sentences():
    # "a b" vs "a b": p1 = 2/2, p2 = 1/1; no 3- or 4-grams: p3 = p4 = 0.1/1; bp = 1
    # exp(0.25 * (log .1 + log .1)) = 0.1 ** 0.5 = 0.316227766...
    assert sentence_bleu(["a", "b"], ["a", "b"]) == pytest.approx(0.1 ** 0.5, abs=1e-12)
    # one token: p1 = 1, p2 = p3 = p4 = 0.1 -> 0.1 ** 0.75 = 0.177827941...
    assert sentence_bleu(["a"], ["a"]) == pytest.approx(0.1 ** 0.75, abs=1e-12)


def test_bleu_empty():
    assert sentence_bleu([], ["a", "b"]) == 0.0
    assert sentence_bleu(["a", "b"], []) == 0.0


def test_bleu_distance_matrix_uses_earlier_question_as_hypothesis():
    short, long = "the cat sat on the mat", "the cat sat on the red mat today"
    d = bleu_distance_matrix([short, long])
    expected = 1 - 0.4 ** 0.25 * math.exp(-1 / 3)  # short is the hypothesis (see above)
    assert d[0, 1] == pytest.approx(expected, abs=1e-12) and d[1, 0] == d[0, 1]
    d = bleu_distance_matrix([long, short])
    assert d[0, 1] == pytest.approx(1 - (3 / 35) ** 0.25, abs=1e-12) and d[1, 0] == d[0, 1]


def test_bleu_distance_matrix_edge_sizes():
    assert bleu_distance_matrix([]).shape == (0, 0)
    assert bleu_distance_matrix(["a b c"]).tolist() == [[0.0]]
    # empty strings: distance 1 to everything, including another empty string
    d = bleu_distance_matrix(["", "a b c", ""])
    assert d.tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize("n_sentences, vocab_size, seed", [(40, 5, 0), (40, 12, 1), (300, 6, 2)])
def test_bleu_distance_matrix_matches_slow_double_loop(n_sentences, vocab_size, seed):
    # Small vocabularies: n-grams are shared by many sentences and repeat inside
    # one, so clipping counts > 1 and both the dense (common n-gram) and sparse
    # (rare n-gram) paths of the vectorised code are used.
    rng = random.Random(seed)
    vocab = [f"w{k}" for k in range(vocab_size)]
    sentences = [" ".join(rng.choices(vocab, k=rng.randint(0, 14))) for _ in range(n_sentences)]
    sentences[3] = sentences[7]  # an exact duplicate
    got = bleu_distance_matrix(sentences)
    expected = np.zeros((n_sentences, n_sentences))
    for i in range(n_sentences):
        for j in range(i + 1, n_sentences):
            expected[i, j] = expected[j, i] = 1 - slow_bleu(sentences[i].split(),
                                                            sentences[j].split())
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)


def test_bleu_distance_matrix_in_small_chunks(monkeypatch):
    # Force many dense column blocks and many sparse pair chunks; the result must not change.
    import rewards
    monkeypatch.setattr(rewards, "_DENSE_COLUMNS", 3)
    monkeypatch.setattr(rewards, "_PAIRS_PER_CHUNK", 7)
    rng = random.Random(5)
    sentences = [" ".join(rng.choices("abcdef", k=rng.randint(1, 12))) for _ in range(120)]
    expected = np.zeros((120, 120))
    for i in range(120):
        for j in range(i + 1, 120):
            expected[i, j] = expected[j, i] = 1 - slow_bleu(sentences[i].split(),
                                                            sentences[j].split())
    np.testing.assert_allclose(bleu_distance_matrix(sentences), expected, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------
# Average-linkage clustering

# Six points A..F; dyadic distances so every average is exact in floating point.
#        A      B      C      D      E      F
HAND = np.array([
    [0.0, 0.125, 0.375, 1.0, 1.0, 1.0],    # A
    [0.125, 0.0, 0.875, 1.0, 1.0, 1.0],    # B
    [0.375, 0.875, 0.0, 1.0, 1.0, 1.0],    # C
    [1.0, 1.0, 1.0, 0.0, 0.25, 0.375],     # D
    [1.0, 1.0, 1.0, 0.25, 0.0, 0.5],       # E
    [1.0, 1.0, 1.0, 0.375, 0.5, 0.0],      # F
])


def test_average_linkage_by_hand():
    # threshold 0.5, merges in order of distance:
    #   A+B at 0.125; D+E at 0.25;
    #   F to {D,E} = (0.375 + 0.5)/2 = 0.4375 < 0.5 -> {D,E,F}
    #   C to {A,B} = (0.375 + 0.875)/2 = 0.625 >= 0.5 -> stop; everything else is 1.0.
    # Single linkage would have put C with {A,B} (d(C,A) = 0.375 < 0.5); average does not.
    assert average_linkage_clusters(HAND, 0.5).tolist() == [0, 0, 1, 2, 2, 2]
    # threshold 0.4375: F to {D,E} is exactly 0.4375, not strictly below -> F alone
    assert average_linkage_clusters(HAND, 0.4375).tolist() == [0, 0, 1, 2, 2, 3]
    # threshold 0.7: C joins {A,B} at 0.625; {A,B,C} to {D,E,F} averages 1.0 -> stop
    assert average_linkage_clusters(HAND, 0.7).tolist() == [0, 0, 0, 1, 1, 1]
    # threshold above every distance: one cluster; at or below the smallest: all singletons
    assert average_linkage_clusters(HAND, 1.01).tolist() == [0] * 6
    assert average_linkage_clusters(HAND, 0.125).tolist() == [0, 1, 2, 3, 4, 5]


def test_average_linkage_labels_in_order_of_first_appearance():
    # same points shuffled: F, A, D, C, B, E -> clusters {D,E,F}, {A,B}, {C}
    order = [5, 0, 3, 2, 1, 4]
    assert average_linkage_clusters(HAND[np.ix_(order, order)], 0.5).tolist() == [0, 1, 0, 2, 1, 0]


def test_average_linkage_edge_sizes_and_errors():
    assert average_linkage_clusters(np.zeros((0, 0)), 0.5).tolist() == []
    assert average_linkage_clusters(np.zeros((1, 1)), 0.5).tolist() == [0]
    with pytest.raises(ValueError, match="square"):
        average_linkage_clusters(np.zeros((2, 3)), 0.5)
    with pytest.raises(ValueError, match="symmetric"):
        average_linkage_clusters(np.array([[0.0, 0.1], [0.2, 0.0]]), 0.5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
def test_average_linkage_matches_slow_implementation(seed, threshold):
    rng = np.random.default_rng(seed)
    if seed % 2:  # uniform random distances
        d = rng.random((30, 30))
        d = (d + d.T) / 2
    else:  # points in the plane, so real clusters exist
        centers = rng.random((4, 2))
        points = centers[rng.integers(0, 4, 30)] + 0.15 * rng.standard_normal((30, 2))
        d = np.sqrt(((points[:, None] - points[None]) ** 2).sum(-1))
    np.fill_diagonal(d, 0.0)
    assert partition(average_linkage_clusters(d, threshold)) == slow_average_linkage(d, threshold)


# ----------------------------------------------------------------------------
# Diversity penalty and Questioner reward


def test_diversity_penalty_by_hand():
    questions = [
        "how many red circles are in the image",
        "how many red circles are in the image",
        "how many red circles are in the picture",
        "what colour is the large cube",
    ]
    # d(0,1) = 0; d(0,2) = d(1,2) = 1 - 0.5 ** 0.25 = 0.159 (test_bleu_partial_overlap);
    # question 3 shares only "the" with the others: p1 = 1/6, p2..p4 = 0.1/5, 0.1/4, 0.1/3,
    # bp = exp(1 - 8/6) -> BLEU ~ 0.005, distance ~ 0.995.
    # Merges: 0+1 at 0; 2 joins at 0.159; 3 stays alone (~0.995 >= 0.5).
    np.testing.assert_allclose(diversity_penalty(questions, 0.5), [0.75, 0.75, 0.75, 0.25])


def test_diversity_penalty_edge_cases():
    assert diversity_penalty([]).shape == (0,)
    np.testing.assert_allclose(diversity_penalty(["one question"]), [1.0])
    # empty strings (invalid questions) are singletons
    np.testing.assert_allclose(diversity_penalty(["", "", "a b c d", "a b c d"]),
                               [0.25, 0.25, 0.5, 0.5])


def test_uncertainty_reward():
    # 1 - 2|p - 1/2|: p=0 -> 1 - 1 = 0; p=0.3 -> 1 - 0.4 = 0.6; p=0.5 -> 1; p=1 -> 0
    for p, expected in [(0.0, 0.0), (0.3, 0.6), (0.5, 1.0), (1.0, 0.0)]:
        assert uncertainty_reward(p) == pytest.approx(expected, abs=1e-12)
    for p in [0.0, 0.125, 0.3, 0.5, 0.7, 0.875, 1.0]:
        assert uncertainty_reward(p, scale=0.5) == pytest.approx(min(p, 1 - p), abs=1e-12)
    for bad in [1.2, -0.1, float("nan")]:
        with pytest.raises(ValueError):
            uncertainty_reward(bad)


def test_questioner_reward():
    # valid: 1 - 2|0.5 - 0.5| - 1 * 0.25 = 0.75
    assert questioner_reward(True, 0.5, 0.25) == pytest.approx(0.75)
    # invalid: -1 - 1 * 0.25
    assert questioner_reward(False, None, 0.25) == pytest.approx(-1.25)
    # released-code variant: 0.5 * (1 - 2|0.25 - 0.5|) - 2 * 0.1 = 0.25 - 0.2
    assert questioner_reward(True, 0.25, 0.1, uncertainty_scale=0.5,
                             diversity_weight=2.0) == pytest.approx(0.05)
    with pytest.raises(ValueError):
        questioner_reward(True, None, 0.0)


# ----------------------------------------------------------------------------
# Reasoner reward

CHOICES = ["red", "blue", "green", "1/2"]


def test_has_boxed_format():
    assert has_boxed_format(r"thinking... \boxed{B}")
    assert not has_boxed_format("B")
    assert not has_boxed_format(r"\boxed{B")
    assert not has_boxed_format(r"\boxed{ }")


def test_reasoner_reward():
    assert reasoner_reward(r"... so \boxed{1/2}", "0.5") == pytest.approx(1.0)  # 0.9 + 0.1
    assert reasoner_reward(r"... so \boxed{3}", "0.5") == pytest.approx(0.1)  # 0 + 0.1
    assert reasoner_reward("... so 0.5", "0.5") == 0.0  # right, but not boxed
    assert reasoner_reward(r"\boxed{blue}", "B", CHOICES) == pytest.approx(1.0)
    assert reasoner_reward(r"\boxed{7}", "7", accuracy_weight=1.0, format_weight=0.0) == 1.0
