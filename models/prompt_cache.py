"""A prompt's cache shared by its G completions, whatever the cache's layers hold.

Most layers cache keys and values ([rows, heads, tokens, dim]); Qwen3.5's linear-attention layers
instead carry a recurrent state (a convolution window and a [rows, heads, dk, dv] matrix) that
summarises every token so far. Two consequences:

- Sampling (`sampler.sample`) repeats a prompt's cache rows G times and later drops finished rows:
  `repeat_rows` / `select_rows` do it for every kind of layer (`concat_rows` joins the caches of
  prefill chunks).
- Training cannot pack a prompt and its G completions into one sequence with a 4D mask
  (`inputs.collate_groups`): a recurrent layer ignores the mask, so completion 2 would read
  completion 1 through the state. Instead (`inputs.collate_prompt_cache`, `prompt_cache_hidden`)
  the prompts are forwarded once into a cache, with gradients; each completion row takes its
  prompt's cache row and continues from it. Exact, and the prompt (image included) is still
  computed once per group; the price is a second forward call (the completions), and the caches
  of the full-attention layers are kept for the backward.
"""

import torch
from transformers.cache_utils import LinearAttentionLayer


def concat_rows(caches):
    """One cache holding the rows of `caches` (prefill chunks of one batch), in order."""
    cache = caches[0]
    for index, layer in enumerate(cache.layers):
        chunks = [c.layers[index] for c in caches]
        if isinstance(layer, LinearAttentionLayer):  # its states, one dict entry per state
            for i in layer.conv_states:
                layer.conv_states[i] = torch.cat([c.conv_states[i] for c in chunks])
            for i in layer.recurrent_states:
                layer.recurrent_states[i] = torch.cat([c.recurrent_states[i] for c in chunks])
        elif getattr(layer, "keys", None) is not None:  # (a KV-shared layer holds none)
            layer.keys = torch.cat([c.keys for c in chunks])
            layer.values = torch.cat([c.values for c in chunks])
    return cache


def repeat_rows(cache, repeats):
    """Each row of the cache `repeats` times in a row (a prompt's cache for its G samples)."""
    for layer in cache.layers:
        if hasattr(layer, "batch_repeat_interleave"):
            layer.batch_repeat_interleave(repeats)
        else:  # recurrent state
            rows = next(iter(layer.conv_states.values())).shape[0]
            layer.reorder_cache(torch.arange(rows).repeat_interleave(repeats))


def select_rows(cache, index):
    """Keep the cache rows `index` names (in that order, repeats allowed)."""
    for layer in cache.layers:
        if hasattr(layer, "batch_select_indices"):
            layer.batch_select_indices(index)
        else:  # recurrent state
            layer.reorder_cache(index)


class _OutOfPlaceLinearLayer(LinearAttentionLayer):
    """A linear-attention cache layer that rebinds its states instead of copying into them: the
    stock layer's in-place `copy_` would overwrite the prompt's state that the backward of the
    completions still needs. Only used after a prefill (it assumes a previous state)."""

    def update_conv_state(self, conv_states, state_idx=0, conv_kernel_size=None, **kwargs):
        full = torch.cat([self.conv_states[state_idx], conv_states], dim=-1)
        self.conv_states[state_idx] = full[..., -self.conv_kernel_size[state_idx]:]
        return full

    def update_recurrent_state(self, recurrent_states, state_idx=0, **kwargs):
        self.recurrent_states[state_idx] = recurrent_states
        return recurrent_states


def prompt_cache_hidden(model, batch):
    """The hidden state before each completion token, [n, T, H]: the prompts forwarded once into
    a cache (under autograd), each completion row continuing from its prompt's cache row."""
    prompt = model.model(**batch["prompt"], use_cache=True)
    cache = prompt.past_key_values
    select_rows(cache, batch["rows"])  # out of place: each row's gradient reaches its prompt
    for layer in cache.layers:
        if type(layer) is LinearAttentionLayer:
            layer.__class__ = _OutOfPlaceLinearLayer
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         position_ids=batch["position_ids"], past_key_values=cache,
                         use_cache=True).last_hidden_state
    before_first = prompt.last_hidden_state[:, -1][batch["rows"]]  # predicts completion token 0
    return torch.cat([before_first[:, None], hidden[:, :-1]], dim=1)
