"""GRPO for a vision-language model, in the order the algorithm runs (SPEC section 4).

1. `rollout`: sample G completions per (image, prompt). Written here rather than `model.generate`:
   each prompt is prefilled ONCE (vision tower + prompt), its KV cache is then copied to its G samples,
   which decode together; rows that end drop out of the batch.
2. `group_advantages`: (r - mean) / (std + 1e-6) within each group of G, on every token of a sample.
3. `completion_logprobs`: per-token log-probs of the sampled tokens under a model (policy, old policy,
   reference), projecting hidden states to the vocabulary a chunk at a time.
4. `policy_loss` + `kl_k3` + `aggregate`: clipped ratio loss with eps_low / eps_high and dual clip,
   k3 KL to the frozen reference, token-mean or seq-mean-token-mean.
5. `grpo_update`: the rollout batch is split into `updates_per_step` mini-batches, each one AdamW
   step after gradient accumulation over micro-batches, grad-norm clipping, and a skipped step when
   the norm is not finite.

Conventions: N sequences = prompts x G; T = completion length; tensors are [N, T] unless noted.
The policy is the model restricted to the tokens it may emit: vision placeholder tokens are masked
out of its distribution both when sampling and when scoring, so the two agree.
"""

import math
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

import distributed
from vlm import VISION_TOKENS


@dataclass
class Prompt:
    """One prompt (its image or images and text) encoded for the model."""
    input_ids: torch.Tensor       # [P] chat-formatted prompt, image placeholders already expanded
    pixel_values: torch.Tensor    # [patches, channels * temporal_patch * patch * patch]
    image_grid_thw: torch.Tensor  # [images, 3] patch grid (t, h, w) of each image, in prompt order


@dataclass
class Tokens:
    """Token ids that sampling and scoring need to know about."""
    pad_id: int
    eos_ids: list[int]
    banned_ids: list[int]         # never sampled: vision placeholders and ids the tokenizer does not have
    image_token_id: int


@dataclass
class Rollout:
    """G sampled completions for each of a list of prompts (rows grouped: prompt 0's G rows first)."""
    prompt_index: torch.Tensor    # [N] index of the prompt each row answers
    completion_ids: torch.Tensor  # [N, T] sampled tokens, pad after the end
    completion_mask: torch.Tensor  # [N, T] 1.0 on sampled tokens (the EOS included), 0.0 on padding
    logprobs: torch.Tensor        # [N, T] log-prob of each token under the policy as it was sampled


@dataclass
class Sampling:
    temperature: float = 1.0      # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                # 0: off
    max_new_tokens: int = 256


def special_tokens(processor, model):
    """The `Tokens` of a processor/model pair."""
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    eos = [i for i in (ids("<|im_end|>"), ids("<|endoftext|>"), tokenizer.eos_token_id) if i is not None]
    vocab = model.config.text_config.vocab_size
    banned = sorted({ids(t) for t in VISION_TOKENS if ids(t) is not None} | set(range(len(tokenizer), vocab)))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return Tokens(pad_id=pad, eos_ids=sorted(set(eos)), banned_ids=banned, image_token_id=model.config.image_token_id)


def _device(model):
    """Where the model computes: its buffers' device (with FSDP CPU offload the parameters sit in CPU
    memory between uses, but the buffers, e.g. the rotary frequencies, stay on the GPU)."""
    return next(model.buffers(), next(model.parameters())).device


def collate(model, prompts, tokens, completion_ids=None, completion_mask=None):
    """Batch prompts left-padded (so every prompt ends at the same column), completions after them.

    Returns model inputs: input_ids / attention_mask [n, P + T], position_ids [3, n, P + T] (Qwen's
    multimodal rope: image tokens get (t, h, w) positions, text continues after the largest),
    pixel_values [sum of patches, D], image_grid_thw [total images, 3].
    """
    device = _device(model)
    width = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokens.pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p.input_ids):] = p.input_ids
        attention_mask[row, width - len(p.input_ids):] = 1
    if completion_ids is not None:
        input_ids = torch.cat([input_ids, completion_ids.cpu()], dim=1)
        attention_mask = torch.cat([attention_mask, completion_mask.cpu().long()], dim=1)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    image_grid_thw = torch.cat([p.image_grid_thw for p in prompts]).to(device)
    position_ids, _ = model.model.get_rope_index(
        input_ids, mm_token_type_ids=(input_ids == tokens.image_token_id).int(),
        image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                pixel_values=torch.cat([p.pixel_values for p in prompts]).to(device),
                image_grid_thw=image_grid_thw)


def _next_token(logits, sampling, banned_ids, generator):
    """Pick one token per row. logits [n, V] -> (tokens [n], their log-probs [n]).

    The recorded log-prob is under the temperature-scaled policy before top-p / top-k truncation,
    which is what `completion_logprobs` recomputes (the usual GRPO convention).
    """
    logits = logits.float()
    logits[:, banned_ids] = -math.inf
    if sampling.temperature > 0:
        logits = logits / sampling.temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    if sampling.temperature == 0:
        token = logprobs.argmax(dim=-1)
    else:
        kept = logprobs.clone()
        if sampling.top_k > 0:
            kth = kept.topk(min(sampling.top_k, kept.shape[-1]), dim=-1).values[:, -1:]
            kept[kept < kth] = -math.inf
        if sampling.top_p < 1:
            sorted_logp, order = kept.sort(dim=-1, descending=True)
            probs = sorted_logp.softmax(dim=-1)  # renormalised after top-k, as vLLM and HF do
            mass_before = probs.cumsum(dim=-1) - probs  # keep the smallest prefix whose mass reaches top_p
            sorted_logp[mass_before > sampling.top_p] = -math.inf
            kept = torch.full_like(kept, -math.inf).scatter(-1, order, sorted_logp)
        token = torch.multinomial(kept.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return token, logprobs.gather(-1, token[:, None]).squeeze(-1)


@torch.no_grad()
def sample(model, prompts, group_size, sampling, tokens, generator=None):
    """Sample `group_size` completions for each prompt with a shared-prefix KV cache.

    Steps: (1) prefill all prompts once, vision tower included; (2) repeat each prompt's cache and
    last logits G times; (3) decode all rows together, one token per step, positions continuing the
    prompt's multimodal rope; (4) a row that emits EOS is finished and leaves the batch (its cache
    rows are dropped), so the step cost follows the rows still running.
    Returns a `Rollout` with N = len(prompts) * group_size rows.
    """
    device = _device(model)
    batch = collate(model, prompts, tokens)
    out = model(**batch, use_cache=True, logits_to_keep=1)
    cache = out.past_key_values
    cache.batch_repeat_interleave(group_size)
    logits = out.logits[:, -1].repeat_interleave(group_size, dim=0)
    attention_mask = batch["attention_mask"].repeat_interleave(group_size, dim=0)
    # First generated position of each row: one past the largest rope position of its prompt.
    next_position = batch["position_ids"].amax(dim=(0, 2)).repeat_interleave(group_size) + 1

    n_rows = len(prompts) * group_size
    completion = torch.full((n_rows, sampling.max_new_tokens), tokens.pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((n_rows, sampling.max_new_tokens), device=device)
    mask = torch.zeros((n_rows, sampling.max_new_tokens), device=device)
    eos = torch.tensor(tokens.eos_ids, device=device)
    active = torch.arange(n_rows, device=device)  # rows still decoding, in cache order
    length = 0
    for step in range(sampling.max_new_tokens):
        token, token_logprob = _next_token(logits, sampling, tokens.banned_ids, generator)
        completion[active, step], logprobs[active, step], mask[active, step] = token, token_logprob, 1.0
        length = step + 1
        running = ~torch.isin(token, eos)
        if step == sampling.max_new_tokens - 1 or not running.any():
            break
        if not running.all():
            keep = running.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            active, token, attention_mask = active[keep], token[keep], attention_mask[keep]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=1)
        position = (next_position[active] + step).view(1, -1, 1).expand(3, -1, 1)
        out = model(input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                    past_key_values=cache, use_cache=True)
        logits = out.logits[:, -1]
    prompt_index = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
    return Rollout(prompt_index, completion[:, :length], mask[:, :length], logprobs[:, :length])


def concat_rollouts(rollouts, pad_id, prompt_offsets):
    """Join rollouts of consecutive prompt batches; `prompt_offsets[i]` is batch i's first prompt index."""
    width = max(r.completion_ids.shape[1] for r in rollouts)

    def pad(x, value):
        return F.pad(x, (0, width - x.shape[1]), value=value)

    return Rollout(
        prompt_index=torch.cat([r.prompt_index + off for r, off in zip(rollouts, prompt_offsets)]),
        completion_ids=torch.cat([pad(r.completion_ids, pad_id) for r in rollouts]),
        completion_mask=torch.cat([pad(r.completion_mask, 0.0) for r in rollouts]),
        logprobs=torch.cat([pad(r.logprobs, 0.0) for r in rollouts]))


def rollout(model, prompts, group_size, sampling, tokens, batch_size, generator=None):
    """`sample` over a long prompt list, `batch_size` prompts prefilled at a time."""
    starts = list(range(0, len(prompts), batch_size))
    parts = [sample(model, prompts[s:s + batch_size], group_size, sampling, tokens, generator) for s in starts]
    return concat_rollouts(parts, tokens.pad_id, starts)


def decode(processor, completion_ids, completion_mask):
    """Completion texts, without special tokens. [N, T] -> list of N strings."""
    rows = [ids[m.bool()].tolist() for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())]
    return processor.tokenizer.batch_decode(rows, skip_special_tokens=True)


def _token_logprobs(hidden, lm_head_weight, targets, temperature, banned_ids, with_entropy):
    """Project hidden [n, t, H] to the vocabulary and return log-probs of targets [n, t] (+ entropy)."""
    logits = F.linear(hidden, lm_head_weight).float()
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


def _completion_forward(model, batch, targets, temperature, banned_ids, chunk_size, with_entropy):
    """Hidden states of the whole batch, then the vocabulary projection of the completion positions
    only, `chunk_size` positions at a time (recomputed in backward under autograd)."""
    hidden = model.model(**batch, use_cache=False).last_hidden_state
    width = targets.shape[1]
    start = hidden.shape[1] - width
    hidden = hidden[:, start - 1:start - 1 + width]  # the state before each completion token predicts it
    weight = model.lm_head.weight
    logprobs, entropies = [], []
    for s in range(0, width, chunk_size):
        args = (hidden[:, s:s + chunk_size], weight, targets[:, s:s + chunk_size], temperature, banned_ids,
                with_entropy)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_token_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _token_logprobs(*args)
        logprobs.append(lp)
        entropies.append(ent)
    return torch.cat(logprobs, dim=1), (torch.cat(entropies, dim=1) if with_entropy else None)


def completion_logprobs(model, prompts, completion_ids, completion_mask, tokens, temperature=1.0,
                        chunk_size=256, with_entropy=False):
    """Per-token log-probs of completions under `model`, as in training (one forward, full sequence).

    prompts: n `Prompt`s (one per row); completion_ids, completion_mask: [n, T].
    Returns (logprobs [n, T], entropy [n, T] or None). Only the T completion positions are projected
    to the vocabulary, `chunk_size` positions at a time, and under autograd each chunk is recomputed
    in backward, so [n, P + T, vocab] (or even [n, T, vocab]) logits never exist at once.
    """
    batch = collate(model, prompts, tokens, completion_ids, completion_mask)
    targets = completion_ids.to(batch["input_ids"].device)
    # Under FSDP this must run as a forward of the root (see `shard_model`), which registers it as one.
    forward = getattr(model, "completion_forward", None) or types.MethodType(_completion_forward, model)
    return forward(batch, targets, temperature, tokens.banned_ids, chunk_size, with_entropy)


def group_advantages(rewards, group_size, eps=1e-6):
    """(r - mean) / (std + eps) within consecutive groups of `group_size`. rewards [N] -> [N].

    std is the unbiased one (Bessel), as in the released code; a group whose rewards are all equal
    gets advantage 0 for every member and contributes no policy gradient.
    """
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(dim=1, keepdim=True)) / (groups.std(dim=1, keepdim=True) + eps)
    return advantages.view(-1)


def policy_loss(logprobs, old_logprobs, advantages, eps_low, eps_high, dual_clip):
    """Clipped GRPO/PPO loss per token. logprobs, old_logprobs [n, T]; advantages [n] -> loss [n, T].

    loss = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high)); for A < 0 it is further capped at
    -A * dual_clip (dual clip), which bounds the push on a token whose ratio has already exploded.
    Also returns boolean [n, T] masks of where each clip binds (for the clip-fraction metrics).
    """
    advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(torch.clamp(logprobs - old_logprobs, -20.0, 20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    clip_high = (advantages > 0) & (ratio > 1 + eps_high)
    clip_low = negative & (ratio < 1 - eps_low)
    dual = torch.zeros_like(clip_low)
    if dual_clip > 0:
        cap = -advantages * dual_clip
        dual = negative & (loss > cap)
        loss = torch.where(negative, torch.minimum(loss, cap), loss)
    return loss, {"clip_high": clip_high, "clip_low": clip_low, "dual_clip": dual}


def kl_k3(logprobs, ref_logprobs):
    """k3 estimator of KL(policy || reference) per token: exp(d) - d - 1 with d = ref - logp, in [-10, 10]."""
    delta = ref_logprobs - logprobs
    return torch.clamp(torch.exp(delta) - delta - 1, -10.0, 10.0)


def aggregate(per_token, mask, mode, num_tokens=None, num_sequences=None):
    """Reduce a per-token loss [n, T] to a scalar.

    token-mean: sum of every token's loss / number of tokens;
    seq-mean-token-mean: each sequence's token mean, then the mean over sequences (released code).
    `num_tokens` / `num_sequences` are the mini-batch totals when [n, T] is one micro-batch of it, so
    accumulating micro-batch gradients gives exactly the mini-batch's gradient.
    """
    if mode == "token-mean":
        return (per_token * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)
    if mode == "seq-mean-token-mean":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sequence.sum() / (per_token.shape[0] if num_sequences is None else num_sequences)
    raise ValueError(f"unknown loss aggregation {mode!r}: use token-mean or seq-mean-token-mean")


@dataclass
class Experience:
    """A scored rollout batch, ready for the update."""
    prompts: list                 # Prompt per row's prompt index
    rollout: Rollout
    advantages: torch.Tensor      # [N]
    old_logprobs: torch.Tensor    # [N, T] policy right after the rollout
    ref_logprobs: torch.Tensor | None  # [N, T] frozen reference (None when kl_coef == 0)


@torch.no_grad()
def score_rollout(policy, reference, prompts, rollout, advantages, tokens, cfg):
    """Recompute old-policy and reference log-probs (no grad), micro-batch by micro-batch.

    Returns (Experience, stats) where stats holds entropy and sampling-vs-scoring log-prob mismatch.
    """
    old, ref, entropy = [], [], []
    rows = rollout.prompt_index.shape[0]
    for s in range(0, rows, cfg.micro_batch_size):
        idx = slice(s, s + cfg.micro_batch_size)
        mb_prompts = [prompts[i] for i in rollout.prompt_index[idx].tolist()]
        ids, mask = rollout.completion_ids[idx], rollout.completion_mask[idx]
        lp, ent = completion_logprobs(policy, mb_prompts, ids, mask, tokens, cfg.temperature, cfg.logprob_chunk,
                                      with_entropy=True)
        old.append(lp)
        entropy.append(ent)
        if reference is not None:
            ref.append(completion_logprobs(reference, mb_prompts, ids, mask, tokens, cfg.temperature,
                                           cfg.logprob_chunk)[0])
    old = torch.cat(old)
    mask = rollout.completion_mask.to(old.device)
    entropy_sum, tokens_sum = distributed.all_reduce_sum([(torch.cat(entropy) * mask).sum().item(),
                                                         mask.sum().item()])
    mismatch = ((old - rollout.logprobs.to(old.device)).abs() * mask).max().item()
    stats = {"entropy": entropy_sum / tokens_sum, "logprob_mismatch": max(distributed.all_gather_list([mismatch]))}
    return Experience(prompts, rollout, advantages.to(old.device), old, torch.cat(ref) if ref else None), stats


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters; constant lr (the first update already uses it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def clip_grad_norm(params, max_norm):
    """Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before scaling.

    Written out because the norm must cover every rank's shard under FSDP: the squares of the local
    shards are summed over ranks. A non-finite norm is returned as is and nothing is scaled (the
    caller skips that step).
    """
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    # one device sync for all tensors (not one per tensor); summed in Python floats as before
    squares = sum(torch.stack([g.detach().float().pow(2).sum() for g in grads]).tolist()) if grads else 0.0
    norm = math.sqrt(distributed.all_reduce_sum(squares))
    if math.isfinite(norm) and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def grpo_update(policy, optimizer, exp, tokens, cfg):
    """`cfg.updates_per_step` optimizer updates over one scored rollout batch (one pass, in order).

    Per mini-batch: zero grads; for each micro-batch, loss = aggregate(policy_loss + kl_coef * k3)
    normalised by the mini-batch totals, backward; clip the grad norm to cfg.grad_clip; step only
    if the norm is finite. Returns a dict of metrics averaged over tokens / updates.
    Data parallel: each rank holds its share of every mini-batch; the totals that normalise the loss
    are summed over ranks and FSDP sums the gradients (`shard_model`), so the update is exactly that
    of the whole mini-batch on one process.
    """
    # The optimizer's parameters: under FSDP `policy.parameters()` may yield the root's gathered
    # copies (the root stays unsharded after a forward), which never receive the sharded gradients.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    rows = exp.rollout.prompt_index.shape[0]
    per_update = rows // cfg.updates_per_step
    sums = {"loss": 0.0, "kl": 0.0, "clip_high": 0.0, "clip_low": 0.0, "dual_clip": 0.0}
    total_tokens, grad_norms, skipped = 0.0, [], 0
    policy.train()
    for u in range(cfg.updates_per_step):
        lo, hi = u * per_update, (u + 1) * per_update
        num_tokens, num_sequences = distributed.all_reduce_sum([exp.rollout.completion_mask[lo:hi].sum().item(),
                                                                hi - lo])
        optimizer.zero_grad(set_to_none=True)
        for s in range(lo, hi, cfg.micro_batch_size):
            idx = slice(s, min(s + cfg.micro_batch_size, hi))
            mb_prompts = [exp.prompts[i] for i in exp.rollout.prompt_index[idx].tolist()]
            ids, mask = exp.rollout.completion_ids[idx], exp.rollout.completion_mask[idx]
            logprobs, _ = completion_logprobs(policy, mb_prompts, ids, mask, tokens, cfg.temperature,
                                              cfg.logprob_chunk)
            mask = mask.to(logprobs.device)
            per_token, clips = policy_loss(logprobs, exp.old_logprobs[idx], exp.advantages[idx],
                                           cfg.eps_low, cfg.eps_high, cfg.dual_clip)
            kl = None
            if exp.ref_logprobs is not None:
                kl = kl_k3(logprobs, exp.ref_logprobs[idx])
                per_token = per_token + cfg.kl_coef * kl
            loss = aggregate(per_token, mask, cfg.loss_agg, num_tokens, num_sequences)
            loss.backward()
            with torch.no_grad():
                sums["loss"] += loss.item()
                if kl is not None:
                    sums["kl"] += (kl * mask).sum().item()
                for name, where in clips.items():
                    sums[name] += (where * mask).sum().item()
        total_tokens += num_tokens  # already global
        norm = clip_grad_norm(params, cfg.grad_clip)
        grad_norms.append(norm)
        if math.isfinite(norm):
            optimizer.step()
        else:
            skipped += 1
        optimizer.zero_grad(set_to_none=True)
    policy.eval()
    # Each rank's losses are its shares of the global mini-batch losses: sums over ranks are global.
    sums = dict(zip(sums, distributed.all_reduce_sum(list(sums.values()))))
    tokens_seen = max(total_tokens, 1.0)
    finite = [g for g in grad_norms if math.isfinite(g)]
    return {"loss": sums["loss"] / cfg.updates_per_step, "kl": sums["kl"] / tokens_seen,
            "clip_frac_high": sums["clip_high"] / tokens_seen, "clip_frac_low": sums["clip_low"] / tokens_seen,
            "clip_frac_dual": sums["dual_clip"] / tokens_seen,
            "grad_norm": sum(finite) / len(finite) if finite else math.nan, "skipped_updates": skipped}


def train_step(policy, reference, optimizer, prompts, rollout, rewards, tokens, cfg):
    """Everything after the rollout and its rewards: advantages, old/ref log-probs, the update.

    rewards [N] (grouped as the rollout is). Returns metrics (reward, advantage, length, timing, loss).
    """
    started = time.perf_counter()
    advantages = group_advantages(rewards.float(), cfg.group_size)  # groups never span ranks
    exp, stats = score_rollout(policy, reference, prompts, rollout, advantages, tokens, cfg)
    metrics = grpo_update(policy, optimizer, exp, tokens, cfg)
    metrics.update(stats)
    rows = zip(rewards.float().tolist(), advantages.tolist(), rollout.completion_mask.sum(-1).float().tolist())
    reward, advantage, length = torch.tensor(distributed.all_gather_list(rows)).T  # every rank's rows
    metrics.update({"reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
                    "advantage_std": advantage.std().item(), "response_length_mean": length.mean().item(),
                    "response_length_max": int(length.max().item()),
                    "seconds_training": time.perf_counter() - started})
    return metrics


# ----------------------------------------------------------------------------
# FSDP2 by hand (torchrun with several processes)


def shard_model(model, mixed_precision, cpu_offload=False, activation_checkpointing=False):
    """Shard a model over the process group with FSDP2, torchtitan style.

    `fully_shard` each vision block and each language decoder layer (a unit all-gathers its weights
    just before its forward and frees them after), then the root, which keeps what is left: the
    embeddings, the vision patch embedding and merger, the final norm and lm_head (tied or not).
    - mixed_precision: compute in bf16, reduce gradients in fp32 (the sharded master weights stay fp32);
    - cpu_offload: sharded parameters, gradients and optimizer state live in CPU memory;
    - activation_checkpointing: every block recomputes its activations in backward.
    Gradients are summed over ranks (divide factor 1): `grpo_update` normalises the loss by totals
    summed over ranks. `completion_forward` is registered as a forward of the root so that the
    chunked log-prob computation runs with the root's parameters gathered.
    """
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                        register_fsdp_forward_method)

    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = dict(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if mixed_precision else MixedPrecisionPolicy(),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    for block in list(model.model.visual.blocks) + list(model.model.language_model.layers):
        fully_shard(block, **policy)
    fully_shard(model, **policy)
    model.completion_forward = types.MethodType(_completion_forward, model)
    register_fsdp_forward_method(model, "completion_forward")
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no pre-multiplied sum
    return model


def is_sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def gathered(model):
    """Whole (unsharded) weights on every rank for a rollout: one all-gather per unit up front,
    none during the hundreds of small decode forwards, which also lets ranks decode different
    numbers of steps. Resharded on exit. A no-op for an unsharded model."""
    if not is_sharded(model):
        yield model
        return
    units = [m for m in model.modules() if hasattr(m, "unshard")]
    model.set_reshard_after_forward(False)
    for unit in units:
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
        model.set_reshard_after_forward(True)
        model.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root
