"""Rewards of VisPlay's two roles. Pure functions of strings and numbers.

  Questioner (README, step 1):
    uncertainty_reward       peaks when the Reasoner's votes split 50/50
    bleu_distance_matrix,
    average_linkage_clusters,
    diversity_penalty        penalises questions that look like the other questions of the step
    questioner_reward        uncertainty - weight * penalty; an unparsable question gets -1
  Reasoner (README, step 4):
    reasoner_reward          0.9 * [boxed answer equals the silver answer] + 0.1 * [boxed]

Answer matching (extraction, equivalence, voting) lives in `answers.py`.
"""

import numpy as np

from answers import answers_equivalent, extract_boxed

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
    flat = np.array([vocab.setdefault(tok, len(vocab)) for t in tokens for tok in t],
                    dtype=np.int64)
    sentence_of = np.repeat(np.arange(n_questions), lengths)
    position_in_sentence = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    tokens_left = np.repeat(lengths, lengths) - position_in_sentence

    # log_score[i, j] accumulates log BLEU of hypothesis i against reference j.
    log_score = np.zeros((n_questions, n_questions))
    start, gram = np.arange(len(flat)), flat  # n-gram starting at each position, as an id
    for n in range(1, _BLEU_ORDERS + 1):
        if n > 1:  # extend each (n-1)-gram by the next token, then renumber
            keep = tokens_left[start] >= n
            start, gram = start[keep], gram[keep]
            gram = np.unique(gram * max(len(vocab), 1) + flat[start + n - 1],
                             return_inverse=True)[1]
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
            width = min(_DENSE_COLUMNS, int(t_cols.max()) + 1 - a)
            indicator = np.zeros((n_sentences, width), dtype=np.float32)
            indicator[t_rows[in_block], t_cols[in_block] - a] = 1.0
            matches += indicator @ indicator.T

    # Rare n-grams: entries sorted by (gram, sentence); pair each with the later ones of its gram.
    sparse = ~dense & (doc_freq >= 2)  # a gram in one sentence only matches nothing
    order = np.lexsort((rows[sparse], cols[sparse]))
    rows, cols, counts, doc_freq = (x[sparse][order] for x in (rows, cols, counts, doc_freq))
    position = np.arange(len(cols)) - np.searchsorted(cols, cols)  # rank within its gram
    partners = doc_freq - 1 - position
    budget = _PAIRS_PER_CHUNK
    chunk_ends = np.searchsorted(np.cumsum(partners),
                                 np.arange(budget, partners.sum() + budget, budget), "right")
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
        raise ValueError("distance must be exactly symmetric; symmetrise it first, "
                         "e.g. (d + d.T) / 2")
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


def questioner_reward(valid: bool, confidence: float | None, penalty: float, *,
                      uncertainty_scale: float = 1.0, diversity_weight: float = 1.0,
                      invalid_reward: float = -1.0) -> float:
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


def reasoner_reward(response: str, silver_answer: str, choices: list[str] | None = None, *,
                    accuracy_weight: float = 0.9, format_weight: float = 0.1) -> float:
    """accuracy_weight * [boxed answer equals the silver answer] + format_weight * [boxed]."""
    correct = answers_equivalent(extract_boxed(response), silver_answer, choices)
    return accuracy_weight * float(correct) + format_weight * float(has_boxed_format(response))
