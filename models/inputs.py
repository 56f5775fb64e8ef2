"""What a vision-language model takes: prompts encoded once, then batched with their completions.

1. `encode_prompt`: chat-format (image(s), text) with the processor's template and encode it as a
   `Prompt` (image placeholders expanded, pixels preprocessed); the roles' prompts go through it.
2. `collate`: prompts left-padded into one batch (every prompt ends at the same column), with the
   family's positions (`families.py`: Qwen's multimodal rope, or 1-D); completions, when given,
   after them. Sampling prefills with it; training scores one row per completion with it.
3. `collate_groups`: one sequence per prompt group, the prompt then its G completions, a 4D mask
   keeping the completions apart (shared-prefix training: the prompt, image included, is computed
   once per group); `collate_prompt_cache`: the same sharing for a model with recurrent layers,
   which ignore masks (the prompts once, then each completion from its prompt's cache row).
`special_tokens` gives the ids sampling and scoring must know: EOS, padding, the never-sampled
vision placeholders.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.families import family_of
from models.split_attention import split_groups, split_mask


@dataclass
class Prompt:
    """One prompt (its image or images and text) encoded for the model."""
    input_ids: torch.Tensor       # [P] chat-formatted prompt, image placeholders already expanded
    pixel_values: torch.Tensor    # Qwen: [patches, channels * temporal_patch * patch * patch];
                                  # InternVL: [tiles, 3, 448, 448]; Gemma 3: [images, 3, 896, 896];
                                  # Gemma 4: [images, patches, 3 * patch * patch]
    image_grid_thw: torch.Tensor | None = None  # Qwen: [images, 3] patch grid (t, h, w) of each
                                                # image, in prompt order
    image_position_ids: torch.Tensor | None = None  # Gemma 4: [images, patches, 2] patch (x, y)


@dataclass
class Tokens:
    """Token ids that sampling and scoring need to know about."""
    pad_id: int
    eos_ids: list[int]
    banned_ids: list[int]         # never sampled: vision placeholders, ids the tokenizer lacks
    image_token_id: int


def special_tokens(processor, model):
    """The `Tokens` of a processor/model pair: the family's EOS and banned tokens (those the
    tokenizer has; looked up in its vocabulary, since a tokenizer with an unknown token maps any
    missing name to that token's id)."""
    tokenizer = processor.tokenizer
    family = family_of(model)
    vocabulary = tokenizer.get_vocab()
    eos = [vocabulary[t] for t in family.eos_tokens if t in vocabulary]
    eos += [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = model.config.text_config.vocab_size
    banned = sorted({vocabulary[t] for t in family.banned_tokens if t in vocabulary}
                    | set(range(len(tokenizer), vocab)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return Tokens(pad_id=pad, eos_ids=sorted(set(eos)), banned_ids=banned,
                  image_token_id=model.config.image_token_id)


def model_device(model):
    """Where the model computes: its buffers' device (with FSDP CPU offload the parameters sit in
    CPU memory between uses, but the buffers, e.g. the rotary frequencies, stay on the GPU)."""
    return next(model.buffers(), next(model.parameters())).device


def encode_prompt(processor, image, text):
    """Chat-format (image(s), user text) with the processor's template and encode it as a `Prompt`.

    `image` is one PIL image or a list of them; each becomes an image part of the message, in order,
    before the text (the `Prompt` then has one `image_grid_thw` row per image).
    """
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    chat = processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(images=images, text=[chat], return_tensors="pt")
    return Prompt(inputs["input_ids"][0], inputs["pixel_values"], inputs.get("image_grid_thw"),
                  inputs.get("image_position_ids"))


def collate(model, prompts, tokens, *, completion_ids=None, completion_mask=None, width=None):
    """Batch prompts left-padded (so every prompt ends at the same column), completions after them.
    `width`: pad the prompts to at least this many columns (one prefill chunk of a wider batch).

    Returns model inputs: input_ids / attention_mask [n, P + T], position_ids [3, n, P + T] (Qwen's
    multimodal rope: image tokens get (t, h, w) positions, text continues after the largest) or
    [n, P + T] (1-D: 0 at each row's first token), pixel_values (every prompt's, concatenated),
    and the family's image inputs (Qwen: image_grid_thw [total images, 3]; Gemma 4:
    image_position_ids; Gemma: token_type_ids or mm_token_type_ids [n, P + T], 1 on image tokens,
    which may attend to their whole image).
    """
    family = family_of(model)
    device = model_device(model)
    width = max([len(p.input_ids) for p in prompts] + [width or 0])
    input_ids = torch.full((len(prompts), width), tokens.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p.input_ids):] = p.input_ids
        attention_mask[row, width - len(p.input_ids):] = 1
    if completion_ids is not None:
        input_ids = torch.cat([input_ids, completion_ids.cpu()], dim=1)
        attention_mask = torch.cat([attention_mask, completion_mask.cpu().long()], dim=1)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    images = {name: torch.cat([getattr(p, name) for p in prompts]).to(device)
              for name in family.image_inputs}
    if family.rope == "mrope":
        position_ids, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=(input_ids == tokens.image_token_id).int(),
            attention_mask=attention_mask, **images)
    else:  # as `generate` numbers them: padding gets 1 (it is masked out anyway)
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
    if family.image_mask is not None:
        images[family.image_mask] = (input_ids == tokens.image_token_id).long()
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                pixel_values=torch.cat([p.pixel_values for p in prompts]).to(device), **images)


def group_rows(prompts):
    """[(prompt, [rows])]: consecutive rows with the same Prompt object form one group (the G
    completions of one prompt)."""
    groups = []
    for row, prompt in enumerate(prompts):
        if groups and groups[-1][0] is prompt:
            groups[-1][1].append(row)
        else:
            groups.append((prompt, [row]))
    return groups


def collate_groups(model, prompts, tokens, completion_ids, completion_mask, *, split=False):
    """Model inputs that encode each prompt ONCE for all its completions (shared-prefix training).

    prompts: one `Prompt` per completion row; consecutive rows with the same Prompt object form a
    group (G completions of one prompt). Each group becomes one sequence: its prompt in the first
    P columns (left-padded, as `collate` pads), then its completions one after another in slots of
    T columns (a group with fewer rows than the largest, cut by a micro-batch, ends with empty
    slots). A completion attends to the prompt and causally to itself only, and its rope positions
    continue the prompt's (the family's positions), exactly as if it were alone after its prompt;
    so every completion token sees what it sees in `collate`'s one-row-per-completion batch, but
    the prompt (image included) is computed once, and its gradient gathers all G completions'.

    Returns (inputs, gather): inputs as `collate`'s, with as attention mask either (`split`) a
    `split_attention.split_mask`, for a model whose text layers run `split_attention` (the
    prompt, then each completion against the prompt and itself), or a dense boolean mask
    [B, 1, L, L] (True: may attend), one per attention type for a family with sliding-window
    layers (`_masks_per_layer_type`); gather [n, T] the flat index (into B x L) of the hidden state
    that predicts each completion token.
    """
    device = model_device(model)
    family = family_of(model)
    groups = group_rows(prompts)
    base = collate(model, [prompt for prompt, _ in groups], tokens)  # prompts left-padded
    width = completion_ids.shape[1]
    prompt_width = base["input_ids"].shape[1]
    slots = max(len(rows) for _, rows in groups)
    length = prompt_width + slots * width
    n_groups = len(groups)
    input_ids = torch.full((n_groups, slots, width), tokens.pad_id, dtype=torch.long,
                           device=device)
    valid = torch.zeros((n_groups, slots, width), dtype=torch.bool, device=device)
    # [3, B, P] multimodal rope or [1, B, P] 1-D positions
    base_positions = base["position_ids"].view(-1, *base["input_ids"].shape)
    next_position = base_positions.amax(dim=(0, 2)) + 1  # [B]: each prompt's largest + 1
    steps = torch.arange(width, device=device)
    position_ids = (next_position[:, None, None] + steps).expand(len(base_positions), -1, slots,
                                                                 -1)
    gather = torch.zeros(completion_ids.shape, dtype=torch.long, device=device)
    completion_ids = completion_ids.to(device)
    completion_mask = completion_mask.to(device).bool()
    for g, (_, rows) in enumerate(groups):
        input_ids[g, :len(rows)] = completion_ids[rows]
        valid[g, :len(rows)] = completion_mask[rows]
        for slot, row in enumerate(rows):
            first = prompt_width + slot * width
            # the state before token 0 is the prompt's last; before token t, token t - 1's
            gather[row] = g * length + torch.cat([steps[:1] + prompt_width - 1,
                                                  first + steps[:-1]])
    prompt_valid = base["attention_mask"].bool()
    input_ids = torch.cat([base["input_ids"], input_ids.flatten(1)], dim=1)
    position_ids = torch.cat([base_positions, position_ids.flatten(2)], dim=2)
    if family.rope != "mrope":
        position_ids = position_ids[0]
    if split:
        mask = split_mask(split_groups(prompt_valid, valid))
    else:
        segment = torch.cat([torch.zeros((n_groups, prompt_width), dtype=torch.long,
                                         device=device),
                             (torch.arange(slots, device=device) + 1).repeat_interleave(width)
                             .expand(n_groups, -1)], dim=1)  # 0: prompt, s + 1: slot s
        query, key = segment.unsqueeze(2), segment.unsqueeze(1)
        causal = torch.ones((length, length), dtype=torch.bool, device=device).tril()
        keys = torch.cat([prompt_valid, valid.flatten(1)], dim=1).unsqueeze(1)
        mask = causal & keys & ((key == 0) | (key == query))
        mask |= torch.eye(length, dtype=torch.bool, device=device)  # padding attends to itself
        mask = mask.unsqueeze(1)
        if family.shared_prefix == "mask per layer type":
            mask = _masks_per_layer_type(model, mask, input_ids, position_ids, tokens, family)
    inputs = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                  pixel_values=base["pixel_values"],
                  **{name: base[name] for name in family.image_inputs})
    return inputs, gather


def collate_prompt_cache(model, prompts, tokens, completion_ids, completion_mask):
    """Model inputs for `prompt_cache.prompt_cache_hidden` (Qwen3.5's shared prefix): each
    group's prompt once, then one row per completion (groups as `group_rows` forms them).

    Returns dict(prompt=`collate`'s inputs for the groups' prompts (left-padded),
    rows [n] = the group of each completion row, input_ids [n, T] = the completions,
    attention_mask [n, P + T] = the prompt's padding then the completion mask, position_ids
    continuing each prompt's largest position).
    """
    groups = group_rows(prompts)
    rows = [g for g, (_, members) in enumerate(groups) for _ in members]
    base = collate(model, [prompt for prompt, _ in groups], tokens)
    device = base["input_ids"].device
    rows = torch.tensor(rows, device=device)
    positions = base["position_ids"].view(-1, *base["input_ids"].shape)  # [3 or 1, B, P]
    first = positions.amax(dim=(0, 2))[rows] + 1
    steps = torch.arange(completion_ids.shape[1], device=device)
    position_ids = (first[:, None] + steps).expand(len(positions), -1, -1)
    if base["position_ids"].dim() == 2:
        position_ids = position_ids[0]
    attention_mask = torch.cat([base["attention_mask"][rows],
                                completion_mask.to(device).long()], dim=1)
    return dict(prompt=base, rows=rows, input_ids=completion_ids.to(device),
                attention_mask=attention_mask, position_ids=position_ids)


def _masks_per_layer_type(model, mask, input_ids, position_ids, tokens, family):
    """Gemma's masks for a packed batch, as its model builds them for one row per completion: full
    attention layers see `mask`, plus (bidirectional image attention) every token of their own
    image for an image token; sliding layers see the same within the window, measured on
    positions (a completion slot does not sit next to its prompt in the packed row, its
    positions do).
    A single 4D mask would reach every layer unchanged: no window, no image blocks."""
    text = model.config.get_text_config()
    if family.image_attention == "bidirectional" or (
            family.image_attention == "config" and text.use_bidirectional_attention == "vision"):
        is_image = input_ids == tokens.image_token_id
        starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
        block = torch.where(is_image, starts.long().cumsum(-1), 0)  # 0: not an image token
        mask = mask | ((block.unsqueeze(2) == block.unsqueeze(1)) & is_image.unsqueeze(2))[:, None]
    window = text.sliding_window
    near = position_ids.unsqueeze(1) > position_ids.unsqueeze(2) - window  # [B, query, key]
    return {"full_attention": mask, "sliding_attention": mask & near[:, None]}
