"""Shared-prefix attention at the cost of what it computes (the prompt / completions split).

A packed group (`inputs.collate_groups`) is one sequence: the prompt in its first P columns
(left-padded), then S slots of T columns, one completion each. With one dense 4D mask, attention
computes every (query, key) pair of the P + S T columns, (P + S T)^2, most of them masked out:
completion s never sees completion s'. Here each layer's attention is split in two:

- the prompt attends to itself, causally: P x P;
- each completion attends to the prompt's keys and values and, causally, to its own:
  S x T x (P + T), the S slots batched as S rows.

That is P^2 + S T (P + T) pairs, less than one row per completion's S (P + T)^2, and the prompt's
projections, MLPs and vision tower are still computed once. Every query sees exactly the keys it
sees under the dense mask (or alone after its prompt), so log-probs and gradients are the same to
float rounding (tests/test_grpo.py, tests/test_families.py).

How it reaches the layers: `install` switches the text model's attention implementation to
`split_attention`, which runs transformers' SDPA attention for every ordinary mask (sampling,
evaluation: the same calls as before) and the split for a mask made by `split_mask`. That mask is a
stand-in of the right 4D shape (the models pass a 4D mask through unchanged) carrying the
`SplitGroups` that describe the layout; it is never read as a mask. Families whose layers need
more than one mask (sliding windows, bidirectional image blocks: Gemma) keep the dense mask
(`models.logprobs.shared_prefix_attention` chooses, and logs its choice).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

NAME = "visplay_split"


@dataclass
class SplitGroups:
    """The layout of a batch of packed groups: B sequences of P + S x T columns."""
    prompt_width: int             # P
    slots: int                    # S
    width: int                    # T
    prompt_mask: torch.Tensor     # [B, 1, P, P] bool: prompt query may attend prompt key
    completion_mask: torch.Tensor  # [B x S, 1, T, P + T] bool: slot query -> prompt, own slot


def split_groups(prompt_valid, completion_valid):
    """The `SplitGroups` of prompts [B, P] and completion slots [B, S, T] (True: a real token).

    A query attends the real keys at or before it in its prompt, or in the prompt and its own
    slot; and itself always (a padding query attends to itself only, so no row is empty).
    """
    batch, slots, width = completion_valid.shape
    prompt_width = prompt_valid.shape[1]
    device = prompt_valid.device
    eye = torch.eye(prompt_width, dtype=torch.bool, device=device)
    causal = eye.cumsum(0).bool()  # lower triangle
    prompt_mask = (causal & prompt_valid[:, None, :]) | eye
    own_eye = torch.eye(width, dtype=torch.bool, device=device)
    own = (own_eye.cumsum(0).bool() & completion_valid[..., None, :]) | own_eye  # [B, S, T, T]
    shared = prompt_valid[:, None, None, :].expand(batch, slots, width, prompt_width)
    completion_mask = torch.cat([shared, own], dim=-1).flatten(0, 1)
    return SplitGroups(prompt_width, slots, width, prompt_mask[:, None], completion_mask[:, None])


def split_mask(groups):
    """A stand-in attention mask of shape [B, 1, L, L] (no memory) that carries `groups`."""
    batch = groups.prompt_mask.shape[0]
    length = groups.prompt_width + groups.slots * groups.width
    mask = torch.ones((), dtype=torch.bool, device=groups.prompt_mask.device)
    mask = mask.expand(batch, 1, length, length)
    mask.split_groups = groups
    return mask


def _repeat_heads(x, heads):
    """Grouped-query attention: each key/value head repeated for its query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def split_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    **kwargs):
    """An attention implementation (transformers' interface): query [B, H, L, D], key / value
    [B, H_kv, L, D] -> ([B, L, H, D], None). The split for a `split_mask`; transformers' SDPA
    attention for any other mask."""
    groups = getattr(attention_mask, "split_groups", None)
    if groups is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask,
                                               dropout=dropout, scaling=scaling, **kwargs)
    heads, prompt, slots = query.shape[1], groups.prompt_width, groups.slots
    key, value = _repeat_heads(key, heads), _repeat_heads(value, heads)

    def attend(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              scale=scaling)

    def per_slot(x):  # the completion columns [B, H, S T, D] -> [B S, H, T, D]
        return x[:, :, prompt:].unflatten(2, (slots, groups.width)).transpose(1, 2).flatten(0, 1)

    def with_prompt(x):  # each slot's keys: the prompt's, then its own [B S, H, P + T, D]
        return torch.cat([x[:, :, :prompt].repeat_interleave(slots, dim=0), per_slot(x)], dim=2)

    prompt_out = attend(query[:, :, :prompt], key[:, :, :prompt], value[:, :, :prompt],
                        groups.prompt_mask)                                     # [B, H, P, D]
    slot_out = attend(per_slot(query), with_prompt(key), with_prompt(value),
                      groups.completion_mask)                                   # [B S, H, T, D]
    slot_out = slot_out.unflatten(0, (-1, slots)).transpose(1, 2).flatten(2, 3)  # [B, H, S T, D]
    return torch.cat([prompt_out, slot_out], dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, split_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # ordinary masks: as for SDPA


def install(model):
    """Make the model's text layers run `split_attention` (over SDPA, which it runs for ordinary
    masks: `load_vlm`'s default). Returns False, changing nothing, for a model whose text layers
    run another implementation (eager, flash attention)."""
    text = model.config.get_text_config()
    if text._attn_implementation == "sdpa":
        text._attn_implementation = NAME
    return text._attn_implementation == NAME
