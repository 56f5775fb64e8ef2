"""The training forward: per-token log-probs of sampled completions under a model.

`completion_logprobs` runs the model over prompts and their completions and projects only the
completion positions to the vocabulary, a chunk at a time (recomputed in backward), so
[n, P + T, vocab] logits never exist at once. With `shared_prefix`, consecutive rows of one prompt
share one encoding of it (`inputs.collate_groups`, whose attention `split_attention.py` computes
as the prompt once plus each completion against its prompt and itself; Qwen3.5 through its prompt
cache, `prompt_cache.py`): a group of G costs P + G x T positions instead of G x (P + T), vision
tower included. The GRPO step scores with it (`grpo.score_rollout`) and trains with it
(`grpo.grpo_update`); the toy base is pretrained with it.
"""

import logging
import math
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.families import family_of
from models.inputs import collate, collate_groups, collate_prompt_cache, group_rows
from models import split_attention
from models.prompt_cache import prompt_cache_hidden

log = logging.getLogger("visplay")


def _token_logprobs(hidden, lm_head_weight, targets, *, temperature, banned_ids, with_entropy,
                    softcap=None):
    """Project hidden [n, t, H] to the vocabulary; log-probs of targets [n, t] (+ entropy).
    softcap: logits become softcap * tanh(logits / softcap), as the model's forward makes them."""
    logits = F.linear(hidden, lm_head_weight).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    logits[..., banned_ids] = -math.inf
    if temperature > 0:
        logits = logits / temperature
    log_norm = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm
    if not with_entropy:
        return logprobs, None
    probs = torch.softmax(logits, dim=-1)
    entropy = log_norm - (probs * logits.masked_fill(probs == 0, 0)).sum(-1)
    return logprobs, entropy.detach()


def completion_forward(model, batch, targets, *, temperature, banned_ids, chunk_size,
                       with_entropy, gather=None):
    """Hidden states of the whole batch, then the vocabulary projection of the completion
    positions only, `chunk_size` positions at a time (recomputed in backward under autograd).

    batch: `inputs.collate`'s model inputs for n rows of P + T positions; targets [n, T], the
    completion tokens. Or, with `gather`, `inputs.collate_groups`'s (one sequence per group) and
    the flat index of the state that predicts each completion token. Or
    `inputs.collate_prompt_cache`'s (the prompts, then the completions from their cache).
    Returns (logprobs [n, T], entropy [n, T] or None).
    Under FSDP2 this runs as a registered forward method of the root module
    (`distributed.shard_model`), so the root's own weights (embeddings, lm_head) are gathered.
    """
    width = targets.shape[1]
    if "prompt" in batch:  # the prompts' cache shared by their completions (Qwen3.5)
        hidden = prompt_cache_hidden(model, batch)
    else:
        hidden = model.model(**batch, use_cache=False).last_hidden_state
        if gather is not None:
            hidden = hidden.flatten(0, 1)[gather]  # [n, T, H]: the state before each token
        else:
            start = hidden.shape[1] - width
            hidden = hidden[:, start - 1:start - 1 + width]  # the state before each completion
    weight = model.lm_head.weight
    logprobs, entropies = [], []
    options = dict(temperature=temperature, banned_ids=banned_ids, with_entropy=with_entropy)
    if family_of(model).softcap:  # (Gemma 4)
        options["softcap"] = model.config.get_text_config().final_logit_softcapping
    for s in range(0, width, chunk_size):
        args = (hidden[:, s:s + chunk_size], weight, targets[:, s:s + chunk_size])
        if torch.is_grad_enabled():
            chunk_logprobs, chunk_entropy = checkpoint(_token_logprobs, *args, use_reentrant=False,
                                                       **options)
        else:
            chunk_logprobs, chunk_entropy = _token_logprobs(*args, **options)
        logprobs.append(chunk_logprobs)
        entropies.append(chunk_entropy)
    entropy = torch.cat(entropies, dim=1) if with_entropy else None
    return torch.cat(logprobs, dim=1), entropy


_logged = set()


def shared_prefix_attention(model):
    """How a packed group's attention runs for this model: "split" (`split_attention`, the text
    layers switched to it on first use), "dense" (one 4D boolean mask per attention type: Gemma's
    sliding-window and image-block layers), or None: the text layers run an attention that takes
    no boolean 4D mask (`model.attn_implementation` eager or flash_attention_2), so training scores
    one row per completion. Logged once per family and choice."""
    family = family_of(model)
    text = model.config.get_text_config()._attn_implementation
    if family.shared_prefix == "mask" and split_attention.install(model):
        choice, why = "split", ("each prompt once, each completion against its prompt and itself; "
                                "one row per completion where that does not pay")
    elif text in ("sdpa", split_attention.NAME):
        choice, why = "dense", (f"{family.name}'s layers need a mask per attention type; one row "
                                "per completion where that does not pay")
    else:
        choice, why = None, f"{text} attention takes no 4D boolean mask"
    if (family.name, choice) not in _logged:
        _logged.add((family.name, choice))
        log.info("shared prefix: %s (%s)", choice or "one row per completion", why)
    return choice


def shared_prefix_pays(prompts, width, attention):
    """Whether a micro-batch (one `Prompt` per row, consecutive rows of one Prompt a group;
    completions `width` long) trains faster packed ("split" or "dense" attention) than as one row
    per completion. Packing must save at least 10% of the positions: below that the packed
    attention's masked kernel costs more than it saves (on this project's CPU measurements,
    docs/performance.md: 0.88x per-row at 55 prompt + 8 x 1,024 tokens, 4.5% fewer positions).
    A dense packed mask must also cost at most twice per-row's attention pairs."""
    groups = [(len(prompt.input_ids), len(rows)) for prompt, rows in group_rows(prompts)]
    per_row = sum(size * (length + width) for length, size in groups)
    packed = sum(length + size * width for length, size in groups)
    if packed > 0.9 * per_row:
        return False
    return attention != "dense" or (sum((length + size * width) ** 2 for length, size in groups)
                                    <= 2 * sum(size * (length + width) ** 2
                                               for length, size in groups))


# The methods FSDP2 must run as forwards of the root (`distributed.shard_model`).
FORWARD_METHODS = {"completion_forward": completion_forward}


def completion_logprobs(model, prompts, completion_ids, completion_mask, *, tokens,
                        temperature=1.0, chunk_size=256, with_entropy=False, shared_prefix=False):
    """Per-token log-probs of completions under `model`, as in training (one forward).

    prompts: n `Prompt`s (one per row); completion_ids, completion_mask: [n, T].
    Returns (logprobs [n, T], entropy [n, T] or None). Only the T completion positions are
    projected to the vocabulary, `chunk_size` positions at a time, and under autograd each chunk is
    recomputed in backward, so [n, P + T, vocab] (or even [n, T, vocab]) logits never exist at once.
    shared_prefix: consecutive rows of one Prompt share one encoding of it (`collate_groups`): a
    group of G costs P + G x T positions instead of G x (P + T), vision tower included, and its
    attention P^2 + G T (P + T) pairs (`split_attention`; Gemma's layers keep one dense mask
    per attention type, (P + G T)^2); a micro-batch where that does not pay
    (`shared_prefix_pays`) runs one row per completion. (Qwen3.5: through the prompts' cache,
    `prompt_cache.py`; one row per completion when its layers are checkpointed in training.)
    """
    gather = None
    through_cache = shared_prefix and family_of(model).shared_prefix == "prompt cache"
    if through_cache and model.training and any(getattr(layer, "gradient_checkpointing", False)
                                                for layer in model.model.language_model.layers):
        # a checkpointed layer drops the cache (its recomputation would append to it twice), so
        # with activation checkpointing Qwen3.5 trains one row per completion
        shared_prefix = through_cache = False
    if through_cache:
        batch = collate_prompt_cache(model, prompts, tokens, completion_ids, completion_mask)
    elif (shared_prefix and (attention := shared_prefix_attention(model))
          and shared_prefix_pays(prompts, completion_ids.shape[1], attention)):
        batch, gather = collate_groups(model, prompts, tokens, completion_ids, completion_mask,
                                       split=attention == "split")
    else:
        batch = collate(model, prompts, tokens, completion_ids=completion_ids,
                        completion_mask=completion_mask)
    targets = completion_ids.to(batch["input_ids"].device)
    forward = getattr(model, "completion_forward", None) or partial(completion_forward, model)
    return forward(batch, targets, temperature=temperature, banned_ids=tokens.banned_ids,
                   chunk_size=chunk_size, with_entropy=with_entropy, gather=gather)
