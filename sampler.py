"""Sampling from a vision-language model: G completions per (image, prompt), with a shared prefix.

Written here rather than calling `model.generate`, because GRPO samples G completions of one
prompt, and the prompt (image included) is the expensive part. Prompts come encoded
(`models.inputs.Prompt`, built by `roles.questioner_prompt` / `roles.reasoner_prompt`):

1. `next_token`: one token per row: temperature, top-k, top-p; vision placeholder tokens banned.
2. `sample`: prefill each prompt ONCE (vision tower + prompt, batched by `models.inputs.collate`),
   copy its KV cache to its G rows, and decode all rows together; a row that ends leaves the batch.
3. `rollout`: `sample` over a long prompt list, in batches that `plan_batches` sizes by memory
   (`Limits`: prompts per batch, GiB of KV cache, prompt tokens per prefill forward).
4. `decode`: completion token ids back to text.

Conventions: N rows = prompts x G, grouped (prompt 0's G rows first); T = completion length.
The policy is the model restricted to the tokens it may emit: vision placeholder tokens are masked
out of its distribution both here and when `models.logprobs.completion_logprobs` scores, so the
two agree.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from models.inputs import collate, model_device
from models.prompt_cache import concat_rows, repeat_rows, select_rows


@dataclass
class Rollout:
    """G sampled completions for each of a list of prompts (rows grouped: prompt 0's G first)."""
    prompt_index: torch.Tensor    # [N] index of the prompt each row answers
    completion_ids: torch.Tensor  # [N, T] sampled tokens, pad after the end
    completion_mask: torch.Tensor  # [N, T] 1.0 on sampled tokens (the EOS included), 0.0 after
    logprobs: torch.Tensor        # [N, T] log-prob of each token under the policy as it sampled


@dataclass
class Limits:
    """How much one sampling batch may hold (per process)."""
    max_prompts: int = 64               # prompts sampled together
    kv_cache_gib: float | None = None   # KV cache of the batch at full length; None: no bound
    prefill_tokens: int | None = None   # padded prompt tokens per prefill forward; None: no bound
    check_every: int = 1                # decode steps between looks at which rows are finished


@dataclass
class Sampling:
    temperature: float = 1.0      # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                # 0: off
    max_new_tokens: int = 256


TOP_P_CANDIDATES = 256  # top-p looks for its nucleus among this many most probable tokens first


def _top_p_full_sort(kept, top_p):
    """Keep the smallest prefix of the sorted distribution whose mass reaches top_p (mass
    renormalised over the tokens `kept` holds, as vLLM and HF do); -inf elsewhere."""
    sorted_logprobs, order = kept.sort(dim=-1, descending=True)
    probs = sorted_logprobs.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logprobs[mass_before > top_p] = -math.inf
    return torch.full_like(kept, -math.inf).scatter(-1, order, sorted_logprobs)


def _top_p(kept, top_p, candidates):
    """`_top_p_full_sort` without sorting the whole vocabulary when the nucleus lies within the
    `candidates` most probable tokens (top-k's, or the TOP_P_CANDIDATES largest): their mass is
    measured against the full normaliser, and the full sort runs only if some row's candidates
    hold less than top_p of the mass (then the nucleus may reach past them)."""
    if candidates >= kept.shape[-1]:
        return _top_p_full_sort(kept, top_p)
    values, order = kept.topk(candidates, dim=-1)  # sorted, largest first
    probs = (values - kept.logsumexp(dim=-1, keepdim=True)).exp()
    mass = probs.cumsum(dim=-1)
    if not bool((mass[:, -1] > top_p).all()):  # the candidate after the last one may be needed
        return _top_p_full_sort(kept, top_p)
    values = values.masked_fill(mass - probs > top_p, -math.inf)
    return torch.full_like(kept, -math.inf).scatter(-1, order, values)


def next_token(logits, sampling, banned_ids, generator):
    """Pick one token per row. logits [n, V] -> (tokens [n], their log-probs [n]).

    The recorded log-prob is under the temperature-scaled policy before top-p / top-k truncation,
    which is what `logprobs.completion_logprobs` recomputes (the usual GRPO convention). Top-p is
    applied after top-k, renormalised over what top-k keeps.
    """
    logits = logits.float()
    logits[:, banned_ids] = -math.inf
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    if sampling.temperature == 0:
        token = logprobs.argmax(dim=-1)
    else:
        kept = logprobs
        if sampling.top_k > 0:
            kth = kept.topk(min(sampling.top_k, kept.shape[-1]), dim=-1).values[:, -1:]
            kept = kept.masked_fill(kept < kth, -math.inf)
        if sampling.top_p < 1:
            kept = _top_p(kept, sampling.top_p, sampling.top_k or TOP_P_CANDIDATES)
        token = torch.multinomial(kept.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


def kv_bytes_per_token(config, dtype):
    """Bytes of KV cache one token takes: keys and values of every layer's KV heads."""
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return (2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
            * torch.finfo(dtype).bits // 8)


def plan_batches(lengths, *, group_size, max_new_tokens, kv_bytes, limits):
    """Prompt indices of each sampling batch, longest prompts first, each batch as large as
    `limits` allow.

    Prompts are left-padded to the batch's longest, so a batch of n prompts holds at most
    n x G x (longest + max_new_tokens) x kv_bytes of KV cache; sorting by length keeps the padding
    small. A prompt whose G rows alone exceed the budget is sampled alone (a group is never split).
    """
    budget = None if limits.kv_cache_gib is None else limits.kv_cache_gib * 2**30
    batches = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if batches:
            batch = batches[-1]
            rows = (len(batch) + 1) * group_size
            width = lengths[batch[0]] + max_new_tokens  # the batch's first prompt is its longest
            if len(batch) < limits.max_prompts and (budget is None
                                                    or rows * width * kv_bytes <= budget):
                batch.append(i)
                continue
        batches.append([i])
    return batches


def _prefill(model, prompts, tokens, prefill_tokens):
    """Forward the prompts (vision tower included) into a KV cache, at most `prefill_tokens`
    padded tokens per forward. Returns (cache, last logits [n, V], attention_mask, position_ids)."""
    width = max(len(p.input_ids) for p in prompts)
    rows = len(prompts) if prefill_tokens is None else max(1, prefill_tokens // width)
    caches, logits, masks, positions = [], [], [], []
    for start in range(0, len(prompts), rows):
        batch = collate(model, prompts[start:start + rows], tokens, width=width)
        out = model(**batch, use_cache=True, logits_to_keep=1)
        caches.append(out.past_key_values)
        logits.append(out.logits[:, -1])
        masks.append(batch["attention_mask"])
        positions.append(batch["position_ids"])
    cache = concat_rows(caches)  # one cache for the whole batch, chunk after chunk
    return cache, torch.cat(logits), torch.cat(masks), torch.cat(positions, dim=-2)


class _InPlaceLayer(DynamicLayer):
    """A KV cache layer with room for every token still to come, written in place (transformers'
    DynamicLayer concatenates, copying the whole cache at every decode step)."""

    def __init__(self, layer, room):
        super().__init__()
        batch, heads, length, dim = layer.keys.shape
        self.dtype, self.device, self.is_initialized = layer.keys.dtype, layer.keys.device, True
        self.key_buffer = layer.keys.new_empty((batch, heads, length + room, dim))
        self.value_buffer = layer.values.new_empty((batch, heads, length + room, dim))
        self.key_buffer[:, :, :length] = layer.keys
        self.value_buffer[:, :, :length] = layer.values
        self.length = length
        self._views()

    def _views(self):
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def update(self, key_states, value_states, *args, **kwargs):
        new = key_states.shape[-2]
        self.key_buffer[:, :, self.length:self.length + new] = key_states
        self.value_buffer[:, :, self.length:self.length + new] = value_states
        self.length += new
        self._views()
        return self.keys, self.values

    def get_seq_length(self):
        return self.length

    def batch_select_indices(self, indices):
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._views()


@torch.no_grad()
def sample(model, prompts, *, group_size, sampling, tokens, generator=None, prefill_tokens=None,
           check_every=1):
    """Sample `group_size` completions for each prompt with a shared-prefix KV cache.

    Steps: (1) prefill all prompts once, vision tower included (`prefill_tokens` padded tokens per
    forward at most); (2) repeat each prompt's cache and last logits G times; (3) decode all rows
    together, one token per step, positions continuing the prompt's multimodal rope; (4) a row that
    emits EOS is finished; the cache keeps its rows (dropping rows copies the whole cache) until
    half of them are finished, then drops them at once, so the step cost follows the rows still
    running. The KV cache has room for every new token from the start and each step writes into
    it in place.
    check_every: decode steps between looks at which rows are finished (each look waits for the
    device). With 1, tokens are drawn for the running rows only, in order, so what a seed samples
    does not depend on when finished rows are dropped. With more, every cache row draws at every
    step and a finished row's draws are discarded: the device never waits within those steps,
    and a seed's samples depend on check_every (greedy decoding does not).
    Returns a `Rollout` with N = len(prompts) * group_size rows.
    """
    device = model_device(model)
    cache, logits, attention_mask, position_ids = _prefill(model, prompts, tokens, prefill_tokens)
    repeat_rows(cache, group_size)
    logits = logits.repeat_interleave(group_size, dim=0)
    attention_mask = attention_mask.repeat_interleave(group_size, dim=0)
    # First generated position of each row: one past the largest rope position of its prompt
    # ([3, n, P] multimodal or [n, P] 1-D positions).
    rope_rows = 3 if position_ids.dim() == 3 else 1
    position_ids = position_ids.view(rope_rows, -1, position_ids.shape[-1])
    next_position = position_ids.amax(dim=(0, 2)).repeat_interleave(group_size) + 1

    n_rows = len(prompts) * group_size
    width = sampling.max_new_tokens
    cache.layers = [_InPlaceLayer(layer, width) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    prompt_width = attention_mask.shape[1]
    attention_mask = torch.cat([attention_mask, attention_mask.new_ones((n_rows, width))], dim=1)
    completion = torch.full((n_rows, width), tokens.pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n_rows, width), device=device)
    mask = torch.zeros((n_rows, width), device=device)
    eos = torch.tensor(tokens.eos_ids, dtype=torch.long, device=device)
    banned = torch.tensor(tokens.banned_ids, dtype=torch.long, device=device)
    rows = torch.arange(n_rows, device=device)  # the rollout row of each cache row
    running = torch.ones(n_rows, dtype=torch.bool, device=device)  # per cache row
    for step in range(width):
        # the cache rows that draw a token
        live = running.nonzero().squeeze(-1) if check_every == 1 else torch.arange(
            len(rows), device=device)
        token, token_logprob = next_token(logits[live], sampling, banned, generator)
        drawing = running[live]  # all True when check_every is 1
        token = torch.where(drawing, token, tokens.pad_id)
        completion[rows[live], step] = token
        logprobs[rows[live], step] = torch.where(drawing, token_logprob, 0.0)
        mask[rows[live], step] = drawing.float()
        running[live] = drawing & ~torch.isin(token, eos)
        if step == width - 1:
            break
        step_input = torch.full((len(rows),), tokens.pad_id, dtype=torch.long, device=device)
        step_input[live] = token  # finished rows keep decoding padding until they are dropped
        if (step + 1) % check_every == 0:
            still = int(running.sum())
            if still == 0:
                break
            if still <= len(rows) // 2:  # drop the finished rows, all at once
                keep = running.nonzero().squeeze(-1)
                select_rows(cache, keep)
                rows, running, step_input = rows[keep], running[keep], step_input[keep]
                attention_mask = attention_mask[keep]
        position = (next_position[rows] + step).view(1, -1, 1).expand(rope_rows, -1, 1)
        if rope_rows == 1:
            position = position[0]
        out = model(input_ids=step_input[:, None],
                    attention_mask=attention_mask[:, :prompt_width + step + 1],
                    position_ids=position, past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    # the last column any row sampled in (steps past every row's end are cut off)
    length = int(mask.any(dim=0).nonzero().max()) + 1
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    return Rollout(prompt_index, completion[:, :length], mask[:, :length], logprobs[:, :length])


def concat_rollouts(parts, pad_id, batches):
    """Join the rollouts of prompt batches (`batches[i]`: the prompt indices of part i), rows in
    prompt order (prompt 0's G rows first), padded to the widest part."""
    width = max(part.completion_ids.shape[1] for part in parts)

    def pad(x, value):
        return F.pad(x, (0, width - x.shape[1]), value=value)

    prompt_index = torch.cat([torch.tensor(batch, device=part.prompt_index.device)
                              [part.prompt_index] for part, batch in zip(parts, batches)])
    order = torch.argsort(prompt_index, stable=True)
    return Rollout(
        prompt_index=prompt_index[order],
        completion_ids=torch.cat([pad(part.completion_ids, pad_id) for part in parts])[order],
        completion_mask=torch.cat([pad(part.completion_mask, 0.0) for part in parts])[order],
        logprobs=torch.cat([pad(part.logprobs, 0.0) for part in parts])[order])


def _compute_dtype(model):
    """The dtype activations (and so the KV cache) have: autocast's, else the weights'. (A policy
    sharded with bf16 mixed precision reports its fp32 master weights: its KV cache is planned
    at twice its size, on the safe side.)"""
    device = model_device(model)
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


def rollout(model, prompts, *, group_size, sampling, tokens, limits, generator=None):
    """`sample` over a long prompt list, in batches `plan_batches` sizes by `limits`; rows come
    back in prompt order."""
    kv_bytes = kv_bytes_per_token(model.config, _compute_dtype(model))
    batches = plan_batches([len(p.input_ids) for p in prompts], group_size=group_size,
                           max_new_tokens=sampling.max_new_tokens, kv_bytes=kv_bytes,
                           limits=limits)
    parts = [sample(model, [prompts[i] for i in batch], group_size=group_size, sampling=sampling,
                    tokens=tokens, generator=generator, prefill_tokens=limits.prefill_tokens,
                    check_every=limits.check_every)
             for batch in batches]
    return concat_rollouts(parts, tokens.pad_id, batches)


def decode(processor, completion_ids, completion_mask):
    """Completion texts, without special tokens. [N, T] -> list of N strings."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())]
    return processor.tokenizer.batch_decode(rows, skip_special_tokens=True)
