"""Tests of sampler.py, grpo.py and the training forward (models/logprobs.py). Expected values are
worked out by hand (arithmetic in the comments) or by a slower, obvious method written in the test
(HF `model.generate`, a Python loop, a fresh forward).
Model tests use the tiny random Qwen2.5-VL of conftest.py, in fp32 on CPU."""

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

import grpo
import sampler
from config import ReasonerConfig
from models.inputs import collate, collate_groups, encode_prompt, special_tokens
from models.load import load_vlm
from models.logprobs import completion_logprobs
from sampler import (Limits, Rollout, Sampling, kv_bytes_per_token, next_token, plan_batches,
                     rollout, sample)

# ----------------------------------------------------------------------------
# Fixtures and helpers


def noise_image(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """(model, processor, tokens) of the tiny model, in eval mode. Tests must not train this one."""
    model, processor = load_vlm(tiny_model_dir)
    model.eval()
    return model, processor, special_tokens(processor, model)


@pytest.fixture(scope="module")
def prompts(tiny):
    """Three prompts whose images have different sizes (6, 8 and 4 merged image tokens) and whose
    questions have different lengths, so each row of a batch is left-padded differently."""
    _, processor, _ = tiny
    return [
        encode_prompt(processor, noise_image(56, 84, 0), "What?"),
        encode_prompt(processor, noise_image(112, 56, 1),
                      "How many red squares are in the picture, counting all rows?"),
        encode_prompt(processor, noise_image(56, 56, 2), "Count the circles."),
    ]


def with_common_eos(tokens, eos_ids=range(14, 120)):
    """The same Tokens, but ~100 ordinary BPE ids (14..119; 0..13 are the special tokens) also end a
    row, so with the near-uniform random model about a quarter of the rows end at each step."""
    return dataclasses.replace(tokens, eos_ids=sorted(set(tokens.eos_ids) | set(eos_ids)))


def row_prompts(prompts, result):
    return [prompts[i] for i in result.prompt_index.tolist()]


def expected_lengths(completion_ids, eos_ids, max_new_tokens):
    """Slow: each row's length is one past its first EOS, or max_new_tokens when it has none."""
    lengths = []
    for row in completion_ids.tolist():
        ends = [t for t, token in enumerate(row) if token in eos_ids]
        lengths.append(ends[0] + 1 if ends else max_new_tokens)
    return lengths


def check_row_structure(result, tokens, max_new_tokens):
    """mask is 1 up to and including the first EOS and 0 after; ids after it are pad; the rollout is
    exactly as wide as its longest row."""
    ids, mask = result.completion_ids, result.completion_mask
    lengths = expected_lengths(ids, set(tokens.eos_ids), max_new_tokens)
    assert ids.shape[1] == max(lengths)
    for row, n in enumerate(lengths):
        assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all(), (row, n, mask[row])
        assert ids[row, n:].eq(tokens.pad_id).all(), (row, n, ids[row])
    return lengths


def masked_max_abs(a, b, mask):
    return ((a - b).abs() * mask).max().item()


def stage_config(**overrides):
    base = dict(group_size=4, prompts_per_step=4, updates_per_step=1, micro_batch_size=8, lr=1e-3,
                kl_coef=0.0, max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0,
                loss_agg="seq-mean-token-mean")
    base.update(overrides)
    return ReasonerConfig(**base)


def trainable_copy(model):
    return copy.deepcopy(model)


def parameters(model):
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------
# group_advantages, policy_loss, kl_k3, aggregate (pure tensor functions)


def test_group_advantages_hand_example():
    """(r - mean) / (unbiased std + 1e-6) within CONSECUTIVE groups; an all-equal group gives 0."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 3.0])
    # group 1: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.5773503
    #          -> +-0.5 / (0.5773503 + 1e-6) = +-0.8660239
    # group 2: all 0.5 -> std 0 -> 0 / 1e-6 = 0
    # group 3: mean 0.75, deviations (-0.75, -0.75, -0.75, 2.25),
    #          var = (3 * 0.5625 + 5.0625) / 3 = 2.25, std 1.5 -> (-0.5, -0.5, -0.5, 1.5)
    #          (1e-6 negligible)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0, 0, -0.75 / 1.500001, -0.75 / 1.500001,
                             -0.75 / 1.500001, 2.25 / 1.500001])
    torch.testing.assert_close(grpo.group_advantages(rewards, 4), expected, rtol=0, atol=1e-6)


def test_group_advantages_equal_rewards_are_exactly_zero():
    """8 x 0.1 in float32: the computed mean is one rounding off 0.1 and std is tiny, so the
    formula alone gives about -0.0074 for every member; an all-equal group must give 0 exactly."""
    rewards = torch.tensor([0.1] * 8 + [0.2] * 6 + [0.7, 0.7], dtype=torch.float32)
    advantages = grpo.group_advantages(rewards, 8)
    assert advantages[:8].tolist() == [0.0] * 8
    # the mixed group keeps its advantages: mean 0.325, unbiased std 0.2315 -> -0.540 and +1.620
    torch.testing.assert_close(advantages[8:], torch.tensor([-0.125 / 0.2314550] * 6
                                                            + [0.375 / 0.2314550] * 2),
                               rtol=1e-5, atol=1e-5)


def _ratios_example():
    """logprobs / old_logprobs with ratios (0.5, 0.75, 1, 1.25, 1.5, 4) on two rows, advantages
    (+1, -1). 0.75 and 1.25 lie between the two clip bounds' alternatives (0.7 / 0.8 and 1.2 / 1.3),
    so swapping eps_low and eps_high changes the result."""
    ratios = torch.tensor([0.5, 0.75, 1.0, 1.25, 1.5, 4.0])
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -0.1, -4.0], [-0.7, -1.2, -2.5, -1.9, -0.3, -2.2]])
    logprobs = (old + ratios.log()).clone().requires_grad_(True)
    return logprobs, old, torch.tensor([1.0, -1.0])


def test_policy_loss_hand_values_and_clip_masks():
    """Per-token loss with eps_low 0.2, eps_high 0.3, dual clip 3, and where each clip binds."""
    logprobs, old, adv = _ratios_example()
    loss, clips = grpo.policy_loss(logprobs, old, adv, eps_low=0.2, eps_high=0.3, dual_clip=3.0)
    # clip(r, 0.8, 1.3) = (0.8, 0.8, 1.0, 1.25, 1.3, 1.3)
    # A=+1: max(-r, -clip r) = (max(-.5, -.8), max(-.75, -.8), -1, -1.25, max(-1.5, -1.3),
    #                           max(-4, -1.3))
    #                        = (-0.5, -0.75, -1, -1.25, -1.3, -1.3)
    # A=-1: max(r, clip r) = (0.8, 0.8, 1.0, 1.25, 1.5, 4.0); dual clip min(., -A * 3 = 3)
    #                      -> (0.8, 0.8, 1.0, 1.25, 1.5, 3.0)
    expected = torch.tensor([[-0.5, -0.75, -1.0, -1.25, -1.3, -1.3],
                             [0.8, 0.8, 1.0, 1.25, 1.5, 3.0]])
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-6)
    # clip_high: A > 0 and r > 1.3 -> r = 1.5, 4 of row 0 (not 1.25); clip_low: A < 0 and r < 0.8
    # -> r = 0.5, 0.75 of row 1; dual: A < 0 and the cap 3 binds -> r = 4 of row 1.
    f, t = False, True
    assert clips["clip_high"].tolist() == [[f, f, f, f, t, t], [f, f, f, f, f, f]]
    assert clips["clip_low"].tolist() == [[f, f, f, f, f, f], [t, t, f, f, f, f]]
    assert clips["dual_clip"].tolist() == [[f, f, f, f, f, f], [f, f, f, f, f, t]]


def test_policy_loss_without_dual_clip():
    """dual_clip = 0 turns the cap off: A=-1, r=4 costs 4, not 3, and no dual mask is set."""
    logprobs, old, adv = _ratios_example()
    loss, clips = grpo.policy_loss(logprobs, old, adv, eps_low=0.2, eps_high=0.3, dual_clip=0.0)
    expected = torch.tensor([[-0.5, -0.75, -1.0, -1.25, -1.3, -1.3],
                             [0.8, 0.8, 1.0, 1.25, 1.5, 4.0]])
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=1e-6)
    assert not clips["dual_clip"].any()


def test_policy_loss_gradient_is_zero_where_clipped():
    """d loss / d logprob = -A * r where the unclipped term is active and 0 where a clip binds."""
    logprobs, old, adv = _ratios_example()
    loss, _ = grpo.policy_loss(logprobs, old, adv, eps_low=0.2, eps_high=0.3, dual_clip=3.0)
    loss.sum().backward()
    # d(-A r)/d logp = -A r (r = experience(logp - old)).
    # A=+1: r = .5, .75, 1, 1.25 unclipped -> -r; r = 1.5, 4 clipped high -> 0
    # A=-1: r = .5, .75 clipped low -> 0; r = 1, 1.25 -> r; r = 1.5 unclipped (above 1.3, under the
    #       cap 3) -> 1.5; r = 4 dual-clipped -> 0
    expected = torch.tensor([[-0.5, -0.75, -1.0, -1.25, 0.0, 0.0], [0.0, 0.0, 1.0, 1.25, 1.5, 0.0]])
    torch.testing.assert_close(logprobs.grad, expected, rtol=0, atol=1e-6)


def test_policy_loss_zero_advantage_is_zero():
    """A = 0 gives loss 0 and no clip flags whatever the ratio."""
    logprobs, old, _ = _ratios_example()
    loss, clips = grpo.policy_loss(logprobs, old, torch.zeros(2), eps_low=0.2, eps_high=0.3,
                                   dual_clip=3.0)
    assert loss.detach().abs().max().item() == 0.0
    assert not any(m.any() for m in clips.values())


def test_kl_k3_hand_values():
    """k3 = experience(d) - d - 1 with d = ref - logp, clamped to [-10, 10]."""
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0, -1.0, -25.0])
    ref = torch.tensor([-1.0, -1.0 + math.log(2), -1.0 - math.log(2), 1.0, 4.0, -5.0])
    # d = 0 -> 0
    # d = log 2  -> 2 - 0.6931472 - 1 = 0.3068528
    # d = -log 2 -> 0.5 + 0.6931472 - 1 = 0.1931472 (so the direction of d matters)
    # d = 2 -> e^2 - 3 = 7.3890561 - 3 = 4.3890561
    # d = 5 -> e^5 - 6 = 142.41 -> clamped to 10
    # d = 20 -> huge -> 10
    expected = torch.tensor([0.0, 0.3068528, 0.1931472, 4.3890561, 10.0, 10.0])
    torch.testing.assert_close(grpo.kl_k3(logp, ref), expected, rtol=0, atol=1e-5)
    # large negative d: e^-20 + 20 - 1 = 19 -> clamped to 10
    torch.testing.assert_close(grpo.kl_k3(torch.tensor([0.0]), torch.tensor([-20.0])),
                               torch.tensor([10.0]))


def test_aggregate_hand_values():
    """token-mean and seq-mean-token-mean on a masked [2, 3] example; masked values never leak."""
    per_token = torch.tensor([[1.0, 2.0, 100.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # token-mean: (1 + 2 + 4) / 3 = 7/3
    assert grpo.aggregate(per_token, mask, mode="token-mean").item() == pytest.approx(7 / 3)
    # seq-mean-token-mean: ((1 + 2) / 2 + 4 / 1) / 2 = (1.5 + 4) / 2 = 2.75
    assert grpo.aggregate(per_token, mask, mode="seq-mean-token-mean").item() == pytest.approx(2.75)
    with pytest.raises(ValueError, match="token-mean"):
        grpo.aggregate(per_token, mask, mode="sum")


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_aggregate_micro_batches_sum_to_whole(mode):
    """Split a batch into unequal micro-batches; with the mini-batch totals their sum is the whole
    value."""
    gen = torch.Generator().manual_seed(0)
    per_token = torch.randn(5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]],
                        dtype=torch.float)
    whole = grpo.aggregate(per_token, mask, mode=mode)
    num_tokens, num_sequences = mask.sum().item(), 5
    parts = [grpo.aggregate(per_token[s], mask[s], mode=mode, num_tokens=num_tokens,
                            num_sequences=num_sequences)
             for s in (slice(0, 2), slice(2, 5))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-6)
    # Obvious method: token-mean = masked sum / 11 tokens (4 + 1 + 2 + 3 + 1); seq mean = mean over
    # rows of row means.
    if mode == "token-mean":
        slow = sum(per_token[i, j].item() for i in range(5) for j in range(4) if mask[i, j]) / 11
    else:
        slow = sum(
            sum(per_token[i, j].item() for j in range(4) if mask[i, j]) / mask[i].sum().item()
            for i in range(5)) / 5
    assert whole.item() == pytest.approx(slow, abs=1e-6)


# ----------------------------------------------------------------------------
# _next_token on hand-made logits


def test_next_token_top_p_top_k_and_recorded_logprob():
    """top-p keeps the smallest prefix reaching p, top-k the k best, banned ids never come out, and
    the recorded log-prob is the temperature-scaled one before truncation."""
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).clone()
    gen = torch.Generator().manual_seed(0)
    # top_p 0.7: mass before each token (0, 0.5, 0.8, 0.95) -> keep tokens 0, 1;
    # P(0) = .5 / .8 = .625
    token, logp = next_token(logits.clone(), Sampling(1.0, 0.7, 0, 1), [], gen)
    assert set(token.tolist()) == {0, 1}
    # 4000 draws: sd 0.008
    assert (token == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    torch.testing.assert_close(logp, probs.log()[token])
    # top_k 3: tokens 0..2 with probs renormalised over 0.95 -> P(2) = .15 / .95 = 0.158
    token, _ = next_token(logits.clone(), Sampling(1.0, 1.0, 3, 1), [], gen)
    assert set(token.tolist()) == {0, 1, 2}
    assert (token == 2).float().mean().item() == pytest.approx(0.158, abs=0.03)
    # banned 0 at temperature 2: p^(1/2) = (.70711, .54772, .38730, .22361); without token 0 the sum
    # is 1.15863, so token 1 has log-prob log(.54772 / 1.15863) = log(.47273) = -0.74922
    token, logp = next_token(logits.clone(), Sampling(2.0, 1.0, 0, 1), [0], gen)
    assert 0 not in token.tolist()
    assert logp[token == 1][0].item() == pytest.approx(-0.74922, abs=1e-4)


def test_next_token_top_p_after_top_k_renormalises():
    """top_k 2 then top_p 0.5 on probs (.4, .3, .2, .1): after top-k the kept probs renormalise to
    (4/7, 3/7) = (.571, .429); the mass before token 1 is .571 > .5, so only token 0 may be sampled.
    (Without renormalising, the mass before token 1 is .4 <= .5 and token 1 is sampled ~43% of the
    time.)"""
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(2000, 4).clone()
    token, _ = next_token(logits, Sampling(1.0, 0.5, 2, 1), [], torch.Generator().manual_seed(0))
    assert set(token.tolist()) == {0}


def _next_token_sorting_everything(logits, sampling, banned_ids, generator):
    """The obvious next_token: top-k by a threshold, then top-p by sorting the whole vocabulary."""
    logits = logits.float()
    logits[:, banned_ids] = -math.inf
    logprobs = torch.log_softmax(logits / sampling.temperature, dim=-1)
    kept = logprobs.clone()
    if sampling.top_k > 0:
        kept[kept < kept.topk(sampling.top_k, dim=-1).values[:, -1:]] = -math.inf
    if sampling.top_p < 1:
        sorted_logprobs, order = kept.sort(dim=-1, descending=True)
        probs = sorted_logprobs.softmax(dim=-1)
        sorted_logprobs[probs.cumsum(dim=-1) - probs > sampling.top_p] = -math.inf
        kept = torch.full_like(kept, -math.inf).scatter(-1, order, sorted_logprobs)
    token = torch.multinomial(kept.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


@pytest.mark.parametrize("peaked", [True, False])
@pytest.mark.parametrize("top_p,top_k", [(0.9, 0), (0.99, 0), (0.95, 40), (0.5, 3), (1.0, 7)])
def test_top_p_on_candidates_draws_what_sorting_the_vocabulary_draws(peaked, top_p, top_k,
                                                                     monkeypatch):
    """Top-p looks for its nucleus among the top-k (or TOP_P_CANDIDATES) most probable tokens and
    sorts the whole vocabulary only when they hold less than top_p of the mass: same seed, same
    tokens and log-probs as sorting everything, on 5000-token vocabularies whose nucleus fits the
    candidates (peaked: logits of scale 10) or does not (flat: scale 0.5)."""
    logits = torch.randn(64, 5000, generator=torch.Generator().manual_seed(3)) * (10 if peaked
                                                                                  else 0.5)
    sampling = Sampling(1.3, top_p, top_k, 1)
    expected = [_next_token_sorting_everything(logits.clone(), sampling, [5, 9],
                                               torch.Generator().manual_seed(seed))
                for seed in range(5)]
    if peaked or top_k or top_p == 1.0:  # the candidates hold the nucleus: no full sort
        monkeypatch.setattr(sampler, "_top_p_full_sort", None)
    for seed, (token, logprob) in enumerate(expected):
        got = next_token(logits.clone(), sampling, [5, 9], torch.Generator().manual_seed(seed))
        assert torch.equal(got[0], token)
        assert torch.equal(got[1], logprob)


# ----------------------------------------------------------------------------
# Sampling with the shared-prefix cache vs the training forward


def test_sampled_logprobs_match_training_forward(tiny, prompts):
    """Images of 3 sizes, questions of 3 lengths, G = 3, top-p 0.9: the log-probs recorded while
    sampling equal a full training forward (chunk 5 < T) on every sampled token."""
    model, _, tokens = tiny
    sampling = Sampling(temperature=1.0, top_p=0.9, top_k=0, max_new_tokens=12)
    result = sample(model, prompts, group_size=3, sampling=sampling, tokens=tokens,
                    generator=torch.Generator().manual_seed(0))
    assert result.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert result.completion_ids.shape == result.completion_mask.shape == result.logprobs.shape
    check_row_structure(result, tokens, 12)
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, row_prompts(prompts, result),
                                          result.completion_ids, result.completion_mask,
                                          tokens=tokens, temperature=1.0, chunk_size=5)
    assert logprobs.shape == result.logprobs.shape
    assert masked_max_abs(logprobs, result.logprobs, result.completion_mask) <= 1e-5
    assert torch.isfinite(logprobs[result.completion_mask.bool()]).all()


def test_rows_end_at_their_first_eos_and_logprobs_still_match(tiny, prompts):
    """With ~100 EOS ids rows end at different steps and leave the decoding batch; each row's mask
    is 1 up to and including its first EOS, 0 after, ids after are pad, and the remaining rows'
    log-probs (decoded from a cache with rows removed) still equal the training forward."""
    model, _, tokens = tiny
    eos_tokens = with_common_eos(tokens)
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=12)
    result = sample(model, prompts, group_size=4, sampling=sampling, tokens=eos_tokens,
                    generator=torch.Generator().manual_seed(1))
    lengths = check_row_structure(result, eos_tokens, 12)
    assert min(lengths) < max(lengths), lengths  # rows really ended at different steps
    assert result.completion_mask.sum(-1).tolist() == lengths
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, row_prompts(prompts, result),
                                          result.completion_ids, result.completion_mask,
                                          tokens=eos_tokens, temperature=1.0, chunk_size=5)
    assert masked_max_abs(logprobs, result.logprobs, result.completion_mask) <= 1e-5


def test_sampled_logprobs_match_training_forward_at_temperature(tiny, prompts):
    """At temperature 0.7 the recorded log-probs are those of the 0.7-scaled policy (the training
    forward with temperature 0.7), and differ from the unscaled ones."""
    model, _, tokens = tiny
    eos_tokens = with_common_eos(tokens)
    sampling = Sampling(temperature=0.7, top_p=1.0, top_k=0, max_new_tokens=10)
    result = sample(model, prompts, group_size=3, sampling=sampling, tokens=eos_tokens,
                    generator=torch.Generator().manual_seed(2))
    args = (model, row_prompts(prompts, result), result.completion_ids, result.completion_mask)
    with torch.no_grad():
        scaled, _ = completion_logprobs(*args, tokens=eos_tokens, temperature=0.7,
                                        chunk_size=3)
        unscaled, _ = completion_logprobs(*args, tokens=eos_tokens, temperature=1.0,
                                          chunk_size=3)
    assert masked_max_abs(scaled, result.logprobs, result.completion_mask) <= 1e-5
    assert masked_max_abs(unscaled, result.logprobs, result.completion_mask) > 1e-3


def _generate_greedy(model, prompts, tokens, max_new_tokens):
    batch = collate(model, prompts, tokens)
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             pixel_values=batch["pixel_values"],
                             image_grid_thw=batch["image_grid_thw"],
                             mm_token_type_ids=(batch["input_ids"] == tokens.image_token_id).int(),
                             bad_words_ids=[[i] for i in tokens.banned_ids], do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokens.eos_ids,
                             pad_token_id=tokens.pad_id)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("which", [[0], [0, 1], [1, 2, 0]])
@pytest.mark.parametrize("common_eos", [False, True])
def test_greedy_matches_hf_generate(tiny, prompts, which, common_eos):
    """Greedy decoding with the shared-prefix cache gives HF generate's greedy tokens (one prompt,
    and left-padded batches of prompts of different lengths), compared up to each row's EOS. With
    common EOS ids rows also end early (and so leave the cache) at different steps."""
    model, _, tokens = tiny
    if common_eos:
        tokens = with_common_eos(tokens, eos_ids=range(200, 300))
    subset = [prompts[i] for i in which]
    result = sample(model, subset, group_size=1,
                    sampling=Sampling(temperature=0.0, max_new_tokens=10), tokens=tokens)
    reference = _generate_greedy(model, subset, tokens, 10)
    lengths = expected_lengths(reference, set(tokens.eos_ids), 10)
    for row, n in enumerate(lengths):
        assert result.completion_ids[row, :n].tolist() == reference[row, :n].tolist(), row
        assert result.completion_mask[row].sum().item() == n


def test_banned_tokens_never_sampled(tiny, prompts):
    """At temperature 5 (nearly flat), with ids 200..399 and the vision tokens banned, no banned id
    is ever sampled and the training forward scores every sampled token with a finite log-prob
    equal to the recorded one. Without the ban the same sampling (vision tokens still banned) does
    produce ids >= 200 (the test can fail)."""
    model, _, tokens = tiny
    vocab = model.config.text_config.vocab_size
    banned = sorted(set(tokens.banned_ids) | set(range(200, vocab)))
    assert {9, 10, 11, 12, 13} <= set(banned)  # the five vision tokens of families.VISION_TOKENS
    restricted = dataclasses.replace(tokens, banned_ids=banned)
    sampling = Sampling(temperature=5.0, top_p=1.0, top_k=0, max_new_tokens=40)
    result = sample(model, prompts, group_size=8, sampling=sampling, tokens=restricted,
                    generator=torch.Generator().manual_seed(3))
    sampled = result.completion_ids[result.completion_mask.bool()]
    assert sampled.numel() > 500
    assert not torch.isin(sampled, torch.tensor(banned)).any()
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, row_prompts(prompts, result),
                                          result.completion_ids, result.completion_mask,
                                          tokens=restricted, temperature=5.0, chunk_size=16)
    assert torch.isfinite(logprobs[result.completion_mask.bool()]).all()
    assert masked_max_abs(logprobs, result.logprobs, result.completion_mask) <= 1e-5

    free = sample(model, prompts, group_size=8, sampling=sampling, tokens=tokens,
                  generator=torch.Generator().manual_seed(3))  # vision ban only
    assert (free.completion_ids[free.completion_mask.bool()] >= 200).any()


@pytest.mark.parametrize("truncation", [dict(top_k=1), dict(top_p=1e-6),
                                        dict(top_k=1, temperature=0.7)])
def test_top_k_one_and_tiny_top_p_are_greedy(tiny, prompts, truncation):
    """Only the top token survives top_k=1 or top_p=1e-6, so sampling equals greedy decoding."""
    model, _, tokens = tiny
    greedy = sample(model, prompts, group_size=2,
                    sampling=Sampling(temperature=0.0, max_new_tokens=8), tokens=tokens)
    settings = dict(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)
    settings.update(truncation)
    sampled = sample(model, prompts, group_size=2, sampling=Sampling(**settings), tokens=tokens,
                     generator=torch.Generator().manual_seed(4))
    assert torch.equal(sampled.completion_ids, greedy.completion_ids)
    assert torch.equal(sampled.completion_mask, greedy.completion_mask)
    # the 2 rows of a group are identical under greedy decoding
    assert torch.equal(greedy.completion_ids[0::2], greedy.completion_ids[1::2])


@torch.no_grad()
def _sample_dropping_rows_every_step(model, prompts, group_size, sampling, tokens, generator):
    """The slow obvious decode: transformers' own growing cache (a concatenation per step) and
    finished rows dropped from it at every step; tokens drawn for the running rows, in order."""
    cache, logits, attention_mask, position_ids = sampler._prefill(model, prompts, tokens, None)
    cache.batch_repeat_interleave(group_size)
    logits = logits.repeat_interleave(group_size, dim=0)
    attention_mask = attention_mask.repeat_interleave(group_size, dim=0)
    next_position = position_ids.amax(dim=(0, 2)).repeat_interleave(group_size) + 1
    n = len(prompts) * group_size
    ids = torch.full((n, sampling.max_new_tokens), tokens.pad_id)
    logprobs = torch.zeros(ids.shape)
    active = torch.arange(n)
    for step in range(sampling.max_new_tokens):
        token, token_logprob = next_token(logits, sampling, tokens.banned_ids, generator)
        ids[active, step], logprobs[active, step] = token, token_logprob
        running = ~torch.isin(token, torch.tensor(tokens.eos_ids))
        if step == sampling.max_new_tokens - 1 or not running.any():
            break
        keep = running.nonzero().squeeze(-1)
        cache.batch_select_indices(keep)
        active, token, attention_mask = active[keep], token[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, torch.ones(len(active), 1, dtype=torch.long)],
                                   dim=1)
        position = (next_position[active] + step).view(1, -1, 1).expand(3, -1, 1)
        logits = model(input_ids=token[:, None], attention_mask=attention_mask,
                       position_ids=position, past_key_values=cache, use_cache=True).logits[:, -1]
    return ids, logprobs


def test_in_place_cache_and_late_row_dropping_sample_the_same_tokens(tiny, prompts):
    """Decode writes its KV cache in place and drops finished rows only when half of them are
    finished: the tokens a seed samples are exactly those of the slow decode (a concatenated
    cache, finished rows dropped at every step), and their log-probs agree to fp32 rounding.
    ~100 ordinary ids end a row, so rows end at many different steps."""
    model, _, tokens = tiny
    eos_tokens = with_common_eos(tokens)
    sampling = Sampling(temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=12)
    fast = sample(model, prompts, group_size=4, sampling=sampling, tokens=eos_tokens,
                  generator=torch.Generator().manual_seed(21))
    slow_ids, slow_logprobs = _sample_dropping_rows_every_step(
        model, prompts, 4, sampling, eos_tokens, torch.Generator().manual_seed(21))
    lengths = check_row_structure(fast, eos_tokens, 12)
    assert len(set(lengths)) > 3  # rows ended at several different steps
    width = fast.completion_ids.shape[1]
    assert torch.equal(fast.completion_ids, slow_ids[:, :width])
    assert masked_max_abs(fast.logprobs, slow_logprobs[:, :width], fast.completion_mask) <= 1e-5


@pytest.mark.parametrize("check_every", [2, 5])
def test_looking_for_finished_rows_every_few_steps(tiny, prompts, check_every):
    """With finished rows looked for every few steps (no wait on the device in between): greedy
    decoding gives exactly the tokens of looking every step; sampled rows still end at their first
    EOS (pad and mask 0 after it, the rollout as wide as its longest row) with log-probs equal to
    the training forward's, though finished rows kept drawing (and so the draws differ)."""
    model, _, tokens = tiny
    eos_tokens = with_common_eos(tokens)
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    every_step = sample(model, prompts, group_size=2, sampling=greedy, tokens=eos_tokens)
    every_few = sample(model, prompts, group_size=2, sampling=greedy, tokens=eos_tokens,
                       check_every=check_every)
    assert torch.equal(every_few.completion_ids, every_step.completion_ids)
    assert torch.equal(every_few.completion_mask, every_step.completion_mask)
    assert masked_max_abs(every_few.logprobs, every_step.logprobs, every_step.completion_mask) \
        <= 1e-5
    sampling = Sampling(temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=12)
    result = sample(model, prompts, group_size=4, sampling=sampling, tokens=eos_tokens,
                    generator=torch.Generator().manual_seed(21), check_every=check_every)
    lengths = check_row_structure(result, eos_tokens, 12)
    assert len(set(lengths)) > 3  # rows ended at several different steps
    assert result.logprobs[result.completion_mask == 0].eq(0).all()
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, row_prompts(prompts, result),
                                          result.completion_ids, result.completion_mask,
                                          tokens=eos_tokens, temperature=1.0, chunk_size=5)
    assert masked_max_abs(logprobs, result.logprobs, result.completion_mask) <= 1e-5


def test_sampling_is_seeded(tiny, prompts):
    """Same generator seed -> identical samples; another seed -> different samples."""
    model, _, tokens = tiny
    sampling = Sampling(temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=8)

    def run(seed):
        return sample(model, prompts, group_size=3, sampling=sampling, tokens=tokens,
                      generator=torch.Generator().manual_seed(seed))

    a, b, c = run(11), run(11), run(12)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    # ~395 near-equally likely tokens: 72 draws agreeing by chance is impossible in practice
    width = min(a.completion_ids.shape[1], c.completion_ids.shape[1])
    assert not torch.equal(a.completion_ids[:, :width], c.completion_ids[:, :width])


def test_rollout_batches_longest_first_rows_in_prompt_order(tiny, prompts):
    """5 prompts, at most 2 per batch, G 2: batches are the prompts sorted by length, longest
    first, 2 at a time; each batch equals `sample` on it with the same generator stream; rows come
    back grouped in prompt order (0,0,1,1,...,4,4), padded to the widest batch with pad / 0; and
    the log-probs still match the training forward of each row's own prompt."""
    model, processor, tokens = tiny
    five = prompts + [encode_prompt(processor, noise_image(84, 56, 5), "Is it red?"),
                      encode_prompt(processor, noise_image(56, 56, 6),
                                    "Which column has the most shapes?")]
    lengths = [len(p.input_ids) for p in five]
    assert len(set(lengths)) == 5
    by_length = sorted(range(5), key=lambda i: -lengths[i])
    batches = [by_length[0:2], by_length[2:4], by_length[4:]]
    assert batches != [[0, 1], [2, 3], [4]]  # sorting really reorders here
    eos_tokens = with_common_eos(tokens)
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=10)
    # The slow way: `sample` on each batch in turn, one generator stream. Take the first seed whose
    # batches come out with different widths, so that the concatenation must pad.
    for seed in range(5, 50):
        gen = torch.Generator().manual_seed(seed)
        parts = [sample(model, [five[i] for i in batch], group_size=2, sampling=sampling,
                        tokens=eos_tokens, generator=gen) for batch in batches]
        if len({p.completion_ids.shape[1] for p in parts}) > 1:
            break
    assert len({p.completion_ids.shape[1] for p in parts}) > 1
    width = max(p.completion_ids.shape[1] for p in parts)
    expected = {}  # prompt -> its rows (ids, mask, logprobs), as the batches sampled them
    for batch, part in zip(batches, parts):
        for r in range(part.completion_ids.shape[0]):
            expected.setdefault(batch[r // 2], []).append(
                (part.completion_ids[r], part.completion_mask[r], part.logprobs[r]))

    result = rollout(model, five, group_size=2, sampling=sampling, tokens=eos_tokens,
                     limits=Limits(max_prompts=2), generator=torch.Generator().manual_seed(seed))
    assert result.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert (result.completion_ids.shape == result.completion_mask.shape == result.logprobs.shape
            == (10, width))
    for row in range(10):
        ids, mask, logprobs = expected[row // 2][row % 2]
        w = ids.shape[0]
        assert result.completion_ids[row, :w].tolist() == ids.tolist()
        assert result.completion_ids[row, w:].eq(eos_tokens.pad_id).all()
        assert torch.equal(result.completion_mask[row, :w], mask)
        assert result.completion_mask[row, w:].eq(0).all()
        assert torch.equal(result.logprobs[row, :w], logprobs)
    check_row_structure(result, eos_tokens, 10)
    with torch.no_grad():
        logprobs, _ = completion_logprobs(model, row_prompts(five, result),
                                          result.completion_ids, result.completion_mask,
                                          tokens=eos_tokens, chunk_size=4)
    assert masked_max_abs(logprobs, result.logprobs, result.completion_mask) <= 1e-5


def test_chunked_prefill_samples_what_one_prefill_samples(tiny, prompts):
    """prefill_tokens small enough for one prompt per prefill forward: the chunks' caches join
    into the batch's, and the samples (same generator seed) are identical to one whole-batch
    prefill's."""
    model, _, tokens = tiny
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)
    width = max(len(p.input_ids) for p in prompts)

    def run(prefill_tokens):
        return sample(model, prompts, group_size=3, sampling=sampling, tokens=tokens,
                      generator=torch.Generator().manual_seed(4), prefill_tokens=prefill_tokens)

    whole, chunked = run(None), run(width)  # width tokens: one prompt per forward
    assert torch.equal(whole.completion_ids, chunked.completion_ids)
    torch.testing.assert_close(chunked.logprobs, whole.logprobs, rtol=0, atol=1e-5)


def test_kv_bytes_per_token_of_real_shapes():
    """Qwen2.5-VL-3B: 36 layers x 2 KV heads x head 128; 7B: 28 x 4 x 128. K and V, bf16."""
    from transformers import Qwen2_5_VLConfig

    three = Qwen2_5_VLConfig(text_config=dict(hidden_size=2048, num_hidden_layers=36,
                                              num_attention_heads=16, num_key_value_heads=2))
    seven = Qwen2_5_VLConfig(text_config=dict(hidden_size=3584, num_hidden_layers=28,
                                              num_attention_heads=28, num_key_value_heads=4))
    assert kv_bytes_per_token(three, torch.bfloat16) == 2 * 36 * 2 * 128 * 2 == 36864
    assert kv_bytes_per_token(seven, torch.bfloat16) == 2 * 28 * 4 * 128 * 2 == 57344
    assert kv_bytes_per_token(seven, torch.float32) == 114688
    # the 3B preset's worst case, unplanned: 64 prompts x G 8 x (2000 + 1024) tokens = 53.1 GiB
    assert 64 * 8 * 3024 * 36864 / 2**30 == pytest.approx(53.16, abs=0.01)


def test_plan_batches_hand_worked():
    """kv_bytes 1, G 2, 4 new tokens, a budget of 48 bytes (kv_cache_gib = 48 / 2^30).
    Lengths 10, 2, 8, 4, 3 sorted: 10 (i0), 8 (i2), 4 (i3), 3 (i4), 2 (i1). Batch [0]: one prompt
    costs 2 x (10 + 4) = 28 <= 48; adding i2 makes 4 x 14 = 56 > 48, so i2 starts a batch:
    2 x 12 = 24; + i3: 4 x 12 = 48 fits; + i4: 6 x 12 = 72 no. [4]: 2 x 7 = 14; + i1: 4 x 7 = 28
    fits."""
    limits = Limits(max_prompts=8, kv_cache_gib=48 / 2**30)
    plan = plan_batches([10, 2, 8, 4, 3], group_size=2, max_new_tokens=4, kv_bytes=1,
                        limits=limits)
    assert plan == [[0], [2, 3], [4, 1]]
    # max_prompts binds too; no budget: only the count
    assert plan_batches([10, 2, 8, 4, 3], group_size=2, max_new_tokens=4, kv_bytes=1,
                        limits=Limits(max_prompts=2)) == [[0, 2], [3, 4], [1]]
    # a prompt whose group alone exceeds the budget is sampled alone, never dropped or split
    assert plan_batches([100, 1], group_size=2, max_new_tokens=4, kv_bytes=1,
                        limits=limits) == [[0], [1]]
    # equal lengths keep their order (stable)
    assert plan_batches([5, 5, 5], group_size=1, max_new_tokens=1, kv_bytes=1,
                        limits=Limits(max_prompts=2)) == [[0, 1], [2]]


# ----------------------------------------------------------------------------
# The update


def _learning_run(model, tokens, four_prompts, sign, steps=15):
    """GRPO steps where the reward is the fraction of completion tokens with id < 200 (about half
    the vocabulary, so the random model starts near 0.5); `sign` -1 trains on the negated reward."""
    cfg = stage_config(lr=1e-2, updates_per_step=1, micro_batch_size=8)
    optimizer = grpo.make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                        max_new_tokens=cfg.max_new_tokens)
    history = []
    for _ in range(steps):
        result = rollout(model, four_prompts, group_size=cfg.group_size, sampling=sampling,
                         tokens=tokens, limits=Limits(4), generator=gen)
        mask = result.completion_mask
        reward = ((result.completion_ids < 200).float() * mask).sum(-1) / mask.sum(-1)
        learner = grpo.Learner(model, optimizer, None, tokens)
        metrics = grpo.train_step(learner, grpo.RolloutBatch(four_prompts, result, sign * reward),
                                  cfg)
        assert metrics["skipped_updates"] == 0
        assert metrics["logprob_mismatch"] <= 1e-5
        history.append(reward.mean().item())
    return history


def test_grpo_steps_raise_a_learnable_reward(tiny_model_dir, tiny):
    """15 GRPO steps (4 prompts x G 4, 6 new tokens, lr 1e-2) raise the fraction of low-id tokens by
    a clear margin; the same run on the negated reward lowers it (so the test can fail)."""
    _, processor, tokens = tiny
    four = [encode_prompt(processor, noise_image(56, 56, 10 + i), text)
            for i, text in enumerate(["What?", "Count the red ones.", "Is it big?", "Which row?"])]
    model, _ = load_vlm(tiny_model_dir)
    up = _learning_run(model, tokens, four, +1.0)
    assert sum(up[-3:]) / 3 > up[0] + 0.2, up
    model, _ = load_vlm(tiny_model_dir)
    down = _learning_run(model, tokens, four, -1.0)
    assert sum(down[-3:]) / 3 < down[0] - 0.1, down


def _experience(model, prompts, tokens, cfg, seed, advantages=None, reference=None):
    """A scored result of 2 prompts x G 4 whose rows have different lengths."""
    eos_tokens = with_common_eos(tokens)
    sampling = Sampling(temperature=cfg.temperature, top_p=1.0, top_k=0,
                        max_new_tokens=cfg.max_new_tokens)
    result = sample(model, prompts[:2], group_size=cfg.group_size, sampling=sampling,
                    tokens=eos_tokens, generator=torch.Generator().manual_seed(seed))
    if advantages is None:
        rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.2])
        advantages = grpo.group_advantages(rewards, cfg.group_size)
    experience = grpo.score_rollout(grpo.Learner(model, None, reference, eos_tokens), prompts[:2],
                                    result, advantages, cfg)
    assert grpo.scoring_stats(experience)["logprob_mismatch"] <= 1e-5
    return experience, eos_tokens


def test_update_skipped_when_grad_norm_not_finite(tiny, prompts):
    """A NaN advantage makes the loss and grad norm NaN: no optimizer step is taken (parameters
    bit-identical) and skipped_updates counts every skipped update. A NaN only in the second
    mini-batch skips that one alone, and the first (finite) update does change the parameters."""
    base, _, tokens = tiny
    cfg = stage_config(updates_per_step=2, micro_batch_size=2, max_new_tokens=6)
    model = trainable_copy(base)
    good = grpo.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0, 1.0, 0.2]), 4)

    bad = good.clone()
    bad[[1, 5]] = math.nan  # one NaN row in each mini-batch of 4 rows
    experience, eos_tokens = _experience(model, prompts, tokens, cfg, seed=6, advantages=bad)
    before = parameters(model)
    optimizer = grpo.make_optimizer(model, cfg)
    metrics = grpo.grpo_update(grpo.Learner(model, optimizer, None, eos_tokens), experience, cfg)
    assert metrics["skipped_updates"] == 2
    assert math.isnan(metrics["grad_norm"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    half_bad = good.clone()
    half_bad[5] = math.nan  # second mini-batch only
    experience.advantages = half_bad
    metrics = grpo.grpo_update(grpo.Learner(model, optimizer, None, eos_tokens), experience, cfg)
    assert metrics["skipped_updates"] == 1
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_finite_update_changes_parameters(tiny, prompts):
    """One finite grpo_update takes its step: parameters change, stay finite, nothing skipped."""
    base, _, tokens = tiny
    cfg = stage_config(updates_per_step=1, micro_batch_size=8)
    model = trainable_copy(base)
    experience, eos_tokens = _experience(model, prompts, tokens, cfg, seed=7)
    before = parameters(model)
    learner = grpo.Learner(model, grpo.make_optimizer(model, cfg), None, eos_tokens)
    metrics = grpo.grpo_update(learner, experience, cfg)
    assert (metrics["skipped_updates"] == 0 and math.isfinite(metrics["grad_norm"])
            and metrics["grad_norm"] > 0)
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert sum(changed) > len(changed) // 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_micro_batches_forward_only_their_own_length(tiny, prompts, monkeypatch):
    """Scoring and the update forward each micro-batch cut to its own longest completion, not the
    rollout's: the widths seen are each micro-batch's longest row (worked out from the mask)."""
    base, _, tokens = tiny
    cfg = stage_config(updates_per_step=1, micro_batch_size=3, max_new_tokens=10)
    model = trainable_copy(base)
    widths = []
    real = grpo.completion_logprobs

    def recording(model, prompts, completion_ids, completion_mask, **kwargs):
        widths.append(completion_ids.shape[1])
        return real(model, prompts, completion_ids, completion_mask, **kwargs)

    monkeypatch.setattr(grpo, "completion_logprobs", recording)
    experience, eos_tokens = _experience(model, prompts, tokens, cfg, seed=8)
    lengths = experience.sampled.completion_mask.sum(-1).int().tolist()
    longest = [max(lengths[s:s + 3]) for s in range(0, 8, 3)]
    assert longest != [max(lengths)] * 3, lengths  # trimming matters in this batch
    assert widths == longest  # scoring (no reference: one forward per micro-batch)
    widths.clear()
    grpo.grpo_update(grpo.Learner(model, grpo.make_optimizer(model, cfg), None, eos_tokens),
                     experience, cfg)
    assert widths == longest


@pytest.mark.parametrize("updates_per_step", [1, 2])
def test_first_mini_batch_takes_old_logprobs_from_its_own_forward(tiny, prompts, monkeypatch,
                                                                 updates_per_step):
    """The first mini-batch is trained on by the policy that sampled it: its old log-probs come
    from the training forward, detached, instead of a separate scoring forward. Slow way: score
    every row first (fresh_rows 0). Both give the same old log-probs, entropies, loss and update,
    and the fast way runs the policy forward only on the rows that need a separate one."""
    base, _, tokens = tiny
    cfg = stage_config(updates_per_step=updates_per_step, micro_batch_size=2, max_new_tokens=8,
                       grad_clip=1e9)
    experience, eos_tokens = _experience(base, prompts, tokens, cfg, seed=9)
    rows = experience.sampled.completion_ids.shape[0]
    fresh_rows = rows // updates_per_step
    calls = []
    real = grpo.completion_logprobs

    def counting(model, prompts, completion_ids, completion_mask, **kwargs):
        calls.append((torch.is_grad_enabled(), completion_ids.shape[0]))
        return real(model, prompts, completion_ids, completion_mask, **kwargs)

    def update(fresh):
        model = trainable_copy(base)
        before = parameters(model)
        monkeypatch.setattr(grpo, "completion_logprobs", counting)
        calls.clear()
        sgd = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is the gradient itself
        learner = grpo.Learner(model, sgd, None, eos_tokens)
        scored = grpo.score_rollout(learner, prompts[:2], experience.sampled,
                                    experience.advantages, cfg, fresh_rows=fresh)
        metrics = grpo.grpo_update(learner, scored, cfg)
        monkeypatch.setattr(grpo, "completion_logprobs", real)
        scoring_rows = sum(n for grad, n in calls if not grad)
        delta = [p.detach() - b for p, b in zip(model.parameters(), before)]
        return scored, metrics, delta, scoring_rows

    slow, slow_metrics, slow_delta, slow_scored = update(0)
    fast, fast_metrics, fast_delta, fast_scored = update(fresh_rows)
    assert slow_scored == rows and fast_scored == rows - fresh_rows
    mask = experience.sampled.completion_mask
    torch.testing.assert_close(fast.old_logprobs * mask, slow.old_logprobs * mask,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.entropy * mask, slow.entropy * mask, rtol=0, atol=1e-5)
    assert fast_metrics["loss"] == pytest.approx(slow_metrics["loss"], abs=1e-6)
    assert max(d.abs().max().item() for d in slow_delta) > 1e-4  # a real step was taken
    for a, b in zip(slow_delta, fast_delta):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("group_size", [1, 3])
def test_shared_prefix_forward_equals_one_row_per_completion(tiny, prompts, group_size):
    """Shared-prefix training forward (each prompt encoded once for its G completions) against the
    one-row-per-completion forward: prompts of different lengths (left padding), image sizes, a
    two-image prompt, rows of different lengths, and a micro-batch that cuts a group in two. Per
    token log-probs, entropies and every parameter's gradient agree to fp32 rounding."""
    model, processor, tokens = tiny
    model = trainable_copy(model)
    two_images = encode_prompt(processor, [noise_image(56, 56, 7), noise_image(84, 56, 8)],
                               "Are these the same?")
    four = prompts + [two_images]
    eos_tokens = with_common_eos(tokens)
    result = sample(model, four, group_size=group_size, sampling=Sampling(1.0, 1.0, 0, 8),
                    tokens=eos_tokens, generator=torch.Generator().manual_seed(3))
    rows = [four[i] for i in result.prompt_index.tolist()]
    mask = result.completion_mask
    n = len(rows)
    cut = n // 2 + (1 if group_size > 1 else 0)  # not on a group boundary when G > 1

    def forward_and_backward(shared):
        model.zero_grad()
        parts = []
        for piece in (slice(0, cut), slice(cut, n)):  # two micro-batches
            logprobs, entropy = completion_logprobs(
                model, rows[piece], result.completion_ids[piece], mask[piece], tokens=eos_tokens,
                chunk_size=3, with_entropy=True, shared_prefix=shared)
            (logprobs * mask[piece]).sum().backward()
            parts.append((logprobs.detach(), entropy))
        logprobs = torch.cat([p[0] for p in parts])
        entropy = torch.cat([p[1] for p in parts])
        return logprobs, entropy, [p.grad.clone() for p in model.parameters()]

    per_row = forward_and_backward(False)
    shared = forward_and_backward(True)
    assert masked_max_abs(shared[0], per_row[0], mask) <= 1e-5
    assert masked_max_abs(shared[1], per_row[1], mask) <= 1e-4
    assert masked_max_abs(shared[0], result.logprobs, mask) <= 1e-5
    for a, b in zip(per_row[2], shared[2]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max().item() for g in shared[2]) > 0


def test_collate_groups_encodes_each_prompt_once(tiny, prompts):
    """Three prompts x G 4 with T = 5: one sequence per prompt of (longest prompt + 4 x 5)
    columns, not 12 rows of (prompt + 5); the image patches are in the batch once per prompt."""
    model, _, tokens = tiny
    rows = [p for p in prompts for _ in range(4)]
    ids = torch.full((12, 5), 20)
    inputs, gather = collate_groups(model, rows, tokens, ids, torch.ones(12, 5))
    longest = max(len(p.input_ids) for p in prompts)
    assert inputs["input_ids"].shape == (3, longest + 20)
    assert inputs["attention_mask"].shape == (3, 1, longest + 20, longest + 20)
    assert inputs["pixel_values"].shape[0] == sum(p.pixel_values.shape[0] for p in prompts)
    # row 5 = prompt 1's second completion: token 0 is predicted by the prompt's last column,
    # token t by the slot's column t - 1 (slot 1 starts at longest + 5)
    assert gather[5].tolist() == [(longest + 20) + longest - 1] + [
        (longest + 20) + longest + 5 + t for t in range(4)]
    # a completion never sees another completion of its group
    mask = inputs["attention_mask"][1, 0]
    slot0, slot1 = slice(longest, longest + 5), slice(longest + 5, longest + 10)
    assert not mask[slot1, slot0].any() and mask[slot1, :longest].any()


def _perturbed_reference(model):
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return reference


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean"])
def test_gradient_accumulation_equals_whole_mini_batch(tiny, prompts, loss_agg):
    """Rows of different lengths, k3 KL to a perturbed reference: grpo_update with micro-batches of
    3 (3 + 3 + 2 rows) gives the same plain-SGD step (grad_clip off, so the step is -lr * gradient)
    as one micro-batch of all 8 rows; the same holds with AdamW and grad clipping."""
    base, _, tokens = tiny
    cfg = stage_config(loss_agg=loss_agg, kl_coef=0.1, max_new_tokens=8, micro_batch_size=8,
                       grad_clip=1e9)
    reference = _perturbed_reference(base)
    experience, eos_tokens = _experience(base, prompts, tokens, cfg, seed=8, reference=reference)
    lengths = experience.sampled.completion_mask.sum(-1)
    assert len(set(lengths.tolist())) > 2, lengths  # token-mean and seq-mean really differ here
    assert experience.ref_logprobs is not None

    def step(micro_batch_size, make_optimizer, grad_clip):
        model = trainable_copy(base)
        run_cfg = dataclasses.replace(cfg, micro_batch_size=micro_batch_size, grad_clip=grad_clip)
        before = parameters(model)
        learner = grpo.Learner(model, make_optimizer(model, run_cfg), None, eos_tokens)
        metrics = grpo.grpo_update(learner, experience, run_cfg)
        assert metrics["skipped_updates"] == 0 and metrics["kl"] > 0
        return [p.detach() - b for p, b in zip(model.parameters(), before)], metrics

    def sgd(model, run_cfg):
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)

    whole, m_whole = step(8, sgd, 1e9)
    micro, m_micro = step(3, sgd, 1e9)
    assert max(d.abs().max().item() for d in whole) > 1e-3  # a real step was taken
    for a, b in zip(whole, micro):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)  # atol: ulp of the weights
    assert m_micro["loss"] == pytest.approx(m_whole["loss"], abs=1e-6)
    assert m_micro["kl"] == pytest.approx(m_whole["kl"], rel=1e-5)
    assert m_micro["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-5)

    # AdamW (lr 1e-3): its first step is lr * g / (|g| + 1e-8) per weight, so where |g| is below
    # ~1e-6 (a few vision-tower weights) float rounding of g (~1e-10 here) moves the step by a
    # visible fraction of lr: those weights are left out, the rest must agree to 1% of lr. (Adam is
    # nearly scale-invariant, so the SGD comparison above is the one that pins the normalisation.)
    gradient = [-d for d in whole]  # the SGD step at lr 1 is minus the gradient
    whole, _ = step(8, grpo.make_optimizer, 1.0)
    micro, _ = step(4, grpo.make_optimizer, 1.0)
    assert max(d.abs().max().item() for d in whole) > 0.5 * cfg.lr
    compared = 0
    for a, b, g in zip(whole, micro, gradient):
        clear = (g.abs() >= 1e-6) | (g == 0)  # (unused embedding rows: no gradient, no step)
        compared += int(clear.sum())
        torch.testing.assert_close(b[clear], a[clear], rtol=0, atol=1e-2 * cfg.lr)
    assert compared > 0.9 * sum(g.numel() for g in gradient)  # nearly every weight is compared


@pytest.mark.parametrize("updates_per_step", [1, 2])
def test_zero_advantage_rows_are_skipped_exactly(tiny, prompts, monkeypatch, updates_per_step):
    """Without KL, rows of a group whose rewards are all equal (advantage exactly 0) get no forward
    or backward in the update; the step (plain SGD at lr 1: the gradient itself), the loss and the
    old log-probs of every row (the skipped fresh rows scored separately) equal those of training
    on every row. Rewards: 3 prompts x G 4, the middle group all 1.0: zero_advantage_groups 1/3,
    rows_trained 8/12."""
    base, _, tokens = tiny
    cfg = stage_config(updates_per_step=updates_per_step, micro_batch_size=3, max_new_tokens=6,
                       grad_clip=1e9, kl_coef=0.0)
    eos_tokens = with_common_eos(tokens)
    sampling = Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6)
    sampled = sample(base, prompts, group_size=4, sampling=sampling, tokens=eos_tokens,
                     generator=torch.Generator().manual_seed(4))
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.2])
    batch = grpo.RolloutBatch(prompts, sampled, rewards)
    trained_rows = []
    real = grpo.completion_logprobs

    def counting(model, prompts, completion_ids, completion_mask, **kwargs):
        if torch.is_grad_enabled():
            trained_rows.append(completion_ids.shape[0])
        return real(model, prompts, completion_ids, completion_mask, **kwargs)

    monkeypatch.setattr(grpo, "completion_logprobs", counting)

    def step(skip):
        if not skip:
            monkeypatch.setattr(grpo, "trained_rows",
                                lambda advantages, cfg: torch.ones_like(advantages, dtype=bool))
        model = trainable_copy(base)
        before = parameters(model)
        trained_rows.clear()
        learner = grpo.Learner(model, torch.optim.SGD(model.parameters(), lr=1.0), None,
                               eos_tokens)
        metrics = grpo.train_step(learner, batch, cfg)
        return [p.detach() - b for p, b in zip(model.parameters(), before)], metrics, sum(
            trained_rows)

    skipped, skipped_metrics, skipped_rows = step(True)
    every, every_metrics, every_rows = step(False)
    assert (skipped_rows, every_rows) == (8, 12)
    assert skipped_metrics["zero_advantage_groups"] == pytest.approx(1 / 3)
    assert skipped_metrics["rows_trained"] == pytest.approx(8 / 12)
    assert every_metrics["rows_trained"] == 1.0
    assert skipped_metrics["loss"] == pytest.approx(every_metrics["loss"], abs=1e-7)
    assert skipped_metrics["entropy"] == pytest.approx(every_metrics["entropy"], rel=1e-5)
    assert max(d.abs().max().item() for d in every) > 1e-4  # a real step was taken
    for a, b in zip(every, skipped):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)  # atol: ulp of the weights


def test_zero_advantage_rows_are_trained_when_kl_pulls_them(tiny, prompts):
    """With a KL term every row adds to the loss: none is skipped."""
    cfg = stage_config(kl_coef=0.1)
    advantages = grpo.group_advantages(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2)
    assert advantages.tolist()[:2] == [0.0, 0.0]
    assert grpo.trained_rows(advantages, cfg).all()
    assert grpo.trained_rows(advantages, stage_config(kl_coef=0.0)).tolist() == [
        False, False, True, True]


def test_rows_to_forward_by_hand():
    """The trained rows, at least one micro-batch (the first rows when none is trained)."""
    index = torch.arange(10, 15)
    trained = torch.tensor([False, True, False, False, True])
    assert grpo.rows_to_forward(index, trained, 2).tolist() == [11, 14]  # 1 micro-batch
    assert grpo.rows_to_forward(index, trained, 1).tolist() == [11, 14]  # 2 micro-batches
    assert grpo.rows_to_forward(index, torch.zeros(5, dtype=torch.bool), 2).tolist() == [10]
    assert grpo.rows_to_forward(index, torch.ones(5, dtype=torch.bool), 2).tolist() == [
        10, 11, 12, 13, 14]


def test_a_mini_batch_with_nothing_to_learn_still_steps_adamw(tiny, prompts, monkeypatch):
    """3 updates of one group each, the middle group's rewards all equal: its update has no
    gradient but AdamW still steps (momentum, weight decay) from a zero gradient, as it does
    when every row is trained. Same weights after the step, skipped or not."""
    base, _, tokens = tiny
    cfg = stage_config(updates_per_step=3, micro_batch_size=4, max_new_tokens=6, kl_coef=0.0)
    eos_tokens = with_common_eos(tokens)
    sampled = sample(base, prompts, group_size=4,
                     sampling=Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=6),
                     tokens=eos_tokens, generator=torch.Generator().manual_seed(4))
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.2])
    batch = grpo.RolloutBatch(prompts, sampled, rewards)
    weights = []
    for skip in (True, False):
        if not skip:
            monkeypatch.setattr(grpo, "trained_rows",
                                lambda advantages, cfg: torch.ones_like(advantages, dtype=bool))
        model = trainable_copy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        metrics = grpo.train_step(grpo.Learner(model, optimizer, None, eos_tokens), batch, cfg)
        weights.append(parameters(model))
        assert metrics["zero_advantage_groups"] == pytest.approx(1 / 3)
    for skipped, every in zip(*weights):
        torch.testing.assert_close(skipped, every, rtol=0, atol=1e-7)


def _fake_batch(rewards, group_size, width, fill, seconds=1.0):
    """A RolloutBatch of len(rewards) / G prompts named by `fill`, completion ids = fill + row."""
    rows = len(rewards)
    prompts = [f"{fill}-{p}" for p in range(rows // group_size)]
    ids = (fill + torch.arange(rows))[:, None].expand(rows, width).clone()
    sampled = Rollout(torch.arange(rows // group_size).repeat_interleave(group_size), ids,
                      torch.ones(rows, width), torch.zeros(rows, width))
    return grpo.RolloutBatch(prompts, sampled, torch.tensor(rewards),
                             metrics={"seconds_sampling": seconds})


def test_informative_groups_by_hand():
    batch = _fake_batch([1.0, 1.0, 0.0, 1.0, 0.5, 0.5], 2, 3, 0)
    assert grpo.informative_groups(batch).tolist() == [False, True, False]


def test_dynamic_sampling_keeps_informative_groups_and_refills():
    """First draw: prompts 0 and 3 of 4 informative; round 1: prompts 1, 2, 3. A full batch of 4
    is 0-0, 0-3, 1-1, 1-2 (in that order), the refill's completions padded to the widest; with
    no round allowed, the 2 found; with 3 updates per step, none of 2 fits: the first draw."""
    first = _fake_batch([1, 0, 1, 1, 0, 0, 0.1, 0.9], 2, 3, 100)
    more = _fake_batch([1, 1, 1, 0, 0, 1, 0.5, 0.2], 2, 5, 200)
    calls = []

    def sample_more(round_):
        calls.append(round_)
        return more

    batch = grpo.dynamic_sampling(first, sample_more, rounds=2, updates_per_step=2, pad_id=-1)
    assert calls == [1]
    assert batch.prompts == ["100-0", "100-3", "200-1", "200-2"]
    assert batch.rewards.tolist() == pytest.approx([1, 0, 0.1, 0.9, 1, 0, 0, 1])
    assert batch.sampled.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert batch.sampled.completion_ids[:, 0].tolist() == [100, 101, 106, 107, 202, 203, 204, 205]
    assert batch.sampled.completion_ids[0].tolist() == [100, 100, 100, -1, -1]
    assert batch.sampled.completion_mask.sum(1).tolist() == [3, 3, 3, 3, 5, 5, 5, 5]
    assert batch.metrics == {"seconds_sampling": 2.0, "sampling_rounds": 2,
                             "informative_share": 5 / 8, "groups_kept": 1.0}

    calls.clear()
    batch = grpo.dynamic_sampling(first, sample_more, rounds=0, updates_per_step=1, pad_id=-1)
    assert calls == [] and batch.prompts == ["100-0", "100-3"]
    assert batch.metrics["groups_kept"] == 0.5
    batch = grpo.dynamic_sampling(first, sample_more, rounds=0, updates_per_step=3, pad_id=-1)
    assert batch.prompts == first.prompts and batch.rewards.tolist() == first.rewards.tolist()
