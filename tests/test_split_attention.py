"""Tests of models/split_attention.py: the prompt / completions split of a packed group's attention
against one dense softmax over a mask built by a Python loop from the rule (a completion sees
its prompt's real tokens and its own real tokens up to itself; padding sees itself), and the
training forward that uses it against the dense-mask forward and one row per completion."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models import split_attention
from models.inputs import collate_groups, encode_prompt, special_tokens
from models.load import load_vlm
from models.logprobs import (completion_forward, completion_logprobs,
                             shared_prefix_attention, shared_prefix_pays)
from test_grpo import noise_image


def dense_mask_by_loop(prompt_valid, completion_valid):
    """[B, 1, L, L]: who sees whom in the packed sequence, one (query, key) pair at a time."""
    batch, prompt_width = prompt_valid.shape
    _, slots, width = completion_valid.shape
    length = prompt_width + slots * width
    valid = torch.cat([prompt_valid, completion_valid.flatten(1)], dim=1)
    mask = torch.zeros((batch, 1, length, length), dtype=torch.bool)
    for b in range(batch):
        for q in range(length):
            for k in range(length):
                q_slot = -1 if q < prompt_width else (q - prompt_width) // width
                k_slot = -1 if k < prompt_width else (k - prompt_width) // width
                sees = k <= q and bool(valid[b, k]) and k_slot in (-1, q_slot)
                mask[b, 0, q, k] = sees or q == k
    return mask


def test_split_equals_dense_attention_over_the_same_mask():
    """Two groups, P 5 (left padding 2 and 0), 3 slots of T 4 (padding inside a completion, an
    empty slot), 4 query heads on 2 key/value heads: outputs and the gradients of query, key and
    value equal one softmax over the loop-built mask (fp32 rounding)."""
    prompt_valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    completion_valid = torch.tensor([[[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]],
                                     [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]],
                                    dtype=torch.bool)
    groups = split_attention.split_groups(prompt_valid, completion_valid)
    mask = dense_mask_by_loop(prompt_valid, completion_valid)
    # the groups' masks are the loop's blocks: the prompt's corner, and per slot its rows over
    # the prompt's columns and its own
    torch.testing.assert_close(groups.prompt_mask, mask[:, :, :5, :5])
    for b in range(2):
        for s in range(3):
            rows = slice(5 + 4 * s, 9 + 4 * s)
            expected = torch.cat([mask[b, 0, rows, :5], mask[b, 0, rows, rows]], dim=1)
            torch.testing.assert_close(groups.completion_mask[3 * b + s, 0], expected)

    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 17, 8, generator=gen, requires_grad=True)
    key = torch.randn(2, 2, 17, 8, generator=gen, requires_grad=True)
    value = torch.randn(2, 2, 17, 8, generator=gen, requires_grad=True)
    weights = torch.randn(2, 17, 4, 8, generator=gen)
    out, _ = split_attention.split_attention(None, query, key, value,
                                             split_attention.split_mask(groups), scaling=0.3)
    (out * weights).sum().backward()
    split_grads = [x.grad.clone() for x in (query, key, value)]
    for x in (query, key, value):
        x.grad = None
    dense = F.scaled_dot_product_attention(query, key.repeat_interleave(2, 1),
                                           value.repeat_interleave(2, 1), attn_mask=mask,
                                           scale=0.3).transpose(1, 2)
    (dense * weights).sum().backward()
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(split_grads, (query.grad, key.grad, value.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_split_mask_stands_in_without_memory():
    groups = split_attention.split_groups(torch.ones(2, 3, dtype=torch.bool),
                                          torch.ones(2, 4, 5, dtype=torch.bool))
    mask = split_attention.split_mask(groups)
    assert mask.shape == (2, 1, 23, 23) and mask.split_groups is groups
    assert mask.untyped_storage().nbytes() == 1  # one bool, expanded


@pytest.fixture(scope="module")
def model_and_prompts(tiny_model_dir):
    model, processor = load_vlm(tiny_model_dir)
    model.eval()
    prompts = [encode_prompt(processor, noise_image(56, 84, 0), "What?"),
               encode_prompt(processor, [noise_image(56, 56, 1), noise_image(84, 56, 2)],
                             "How many red squares are in the pictures, counting all rows?")]
    return model, special_tokens(processor, model), prompts


def _forward_and_grads(model, rows, ids, mask, tokens, **options):
    model.zero_grad()
    logprobs, _ = completion_logprobs(model, rows, ids, mask, tokens=tokens, **options)
    (logprobs * mask).sum().backward()
    return logprobs.detach(), [p.grad.clone() for p in model.parameters()]


def test_training_forward_runs_the_split(model_and_prompts, monkeypatch):
    """A Qwen model's shared-prefix forward runs every text layer through the split (and its
    vision tower through SDPA); log-probs and gradients equal the dense-mask forward's and one
    row per completion's. The prompts differ in length (left padding), one has two images, the
    groups have 3 and 2 rows, completions end at different lengths."""
    base, tokens, prompts = model_and_prompts
    model = copy.deepcopy(base)
    rows = [prompts[0]] * 3 + [prompts[1]] * 2
    ids = torch.randint(20, 300, (5, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(5, 6)
    mask[1, 4:] = 0
    mask[4, 2:] = 0
    per_row = _forward_and_grads(model, rows, ids, mask, tokens, shared_prefix=False)

    seen = []
    real = split_attention.split_attention

    def counting(module, query, key, value, attention_mask, **kwargs):
        seen.append(getattr(attention_mask, "split_groups", None) is not None)
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(split_attention, "split_attention", counting)
    split_attention.AttentionInterface.register(split_attention.NAME, counting)
    try:
        shared = _forward_and_grads(model, rows, ids, mask, tokens, shared_prefix=True)
    finally:
        split_attention.AttentionInterface.register(split_attention.NAME, real)
    layers = model.config.get_text_config().num_hidden_layers
    assert seen == [True] * layers
    assert model.config.get_text_config()._attn_implementation == split_attention.NAME
    assert model.config.vision_config._attn_implementation == "sdpa"

    # the dense mask over the same packed layout, through SDPA
    dense_model = copy.deepcopy(base)
    dense_model.config.get_text_config()._attn_implementation = "sdpa"
    dense_model.zero_grad()
    batch, gather = collate_groups(dense_model, rows, tokens, ids, mask, split=False)
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].shape[-1] == (
        batch["input_ids"].shape[1])
    dense, _ = completion_forward(dense_model, batch, ids, temperature=1.0,
                                  banned_ids=tokens.banned_ids, chunk_size=256,
                                  with_entropy=False, gather=gather)
    (dense * mask).sum().backward()
    dense_grads = [p.grad for p in dense_model.parameters()]

    assert ((shared[0] - per_row[0]) * mask).abs().max() <= 1e-5
    assert ((shared[0] - dense.detach()) * mask).abs().max() <= 1e-5
    for a, b, c in zip(per_row[1], shared[1], dense_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-6)
    assert max(g.abs().max().item() for g in shared[1]) > 0


def test_eager_attention_trains_one_row_per_completion(tiny_model_dir):
    """Eager attention adds a mask to its scores, so a boolean packed mask would be read as 0 / 1
    biases (its shared-prefix log-probs were 0.014 off here): a model loaded with it is left as
    it is and scores one row per completion, equal to the plain forward."""
    model, processor = load_vlm(tiny_model_dir, attn_implementation="eager")
    model.eval()
    tokens = special_tokens(processor, model)
    prompt = encode_prompt(processor, noise_image(56, 56, 3), "Count the circles.")
    ids = torch.randint(20, 300, (2, 4), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 4)
    assert not split_attention.install(model)
    assert shared_prefix_attention(model) is None
    assert model.config.get_text_config()._attn_implementation == "eager"
    with torch.no_grad():
        shared, _ = completion_logprobs(model, [prompt] * 2, ids, mask, tokens=tokens,
                                        shared_prefix=True)
        per_row, _ = completion_logprobs(model, [prompt] * 2, ids, mask, tokens=tokens)
    torch.testing.assert_close(shared, per_row, rtol=0, atol=0)


def test_shared_prefix_pays_by_hand():
    """Packed when it saves >= 10% of the positions (and, dense, at most 2x per-row's pairs)."""
    def rows(prompt_length, group):
        prompt = SimpleNamespace(input_ids=[0] * prompt_length)
        return [prompt] * group

    # 55 + 8 x 1024 = 8247 positions packed, 8 x 1079 = 8632 per row: 4.5% saved
    assert not shared_prefix_pays(rows(55, 8), 1024, "split")
    assert shared_prefix_pays(rows(55, 8), 256, "split")  # 2103 against 2488: 15.5%
    # dense pairs: 2343^2 = 5.49M against 8 x 551^2 = 2.43M (2.26x); 5431^2 = 29.5M against
    # 8 x 1847^2 = 27.3M
    assert shared_prefix_pays(rows(295, 8), 256, "split")
    assert not shared_prefix_pays(rows(295, 8), 256, "dense")
    assert shared_prefix_pays(rows(1335, 8), 512, "dense")
    # two groups: (10 + 2 x 40) + (100 + 40) = 230 against 2 x 50 + 140 = 240: 4% saved
    assert not shared_prefix_pays(rows(10, 2) + rows(100, 1), 40, "split")
    assert shared_prefix_pays(rows(30, 2) + rows(100, 1), 40, "split")  # 240 against 280


def test_a_micro_batch_where_sharing_does_not_pay_runs_one_row_per_completion(
        model_and_prompts, monkeypatch):
    """A short prompt with 2 long completions (packing would save under 10% of the positions):
    the shared-prefix forward runs no split, and equals one row per completion exactly."""
    base, tokens, prompts = model_and_prompts
    prompt = prompts[0]
    width = 5 * len(prompt.input_ids)  # packed P + 2T = 11P against 2(P + T) = 12P: 8% saved
    ids = torch.randint(20, 300, (2, width), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, width)
    seen = []
    real = split_attention.split_attention

    def counting(module, query, key, value, attention_mask, **kwargs):
        seen.append(getattr(attention_mask, "split_groups", None) is not None)
        return real(module, query, key, value, attention_mask, **kwargs)

    split_attention.AttentionInterface.register(split_attention.NAME, counting)
    try:
        with torch.no_grad():
            shared, _ = completion_logprobs(base, [prompt] * 2, ids, mask, tokens=tokens,
                                            shared_prefix=True)
    finally:
        split_attention.AttentionInterface.register(split_attention.NAME, real)
    with torch.no_grad():
        per_row, _ = completion_logprobs(base, [prompt] * 2, ids, mask, tokens=tokens)
    assert not shared_prefix_pays([prompt] * 2, width, "split")
    assert seen and not any(seen)
    torch.testing.assert_close(shared, per_row, rtol=0, atol=0)
