"""GRPO for a vision-language model: one step, in the order it runs (README, "One GRPO step").

Given a sampled rollout batch (`sampler.rollout`) and one reward per completion:
1. `group_advantages`: (r - mean) / (std + 1e-6) within each group of G, on every token of a sample.
2. `score_rollout`: per-token log-probs of the sampled tokens under the policy right after the
   rollout (the "old" policy) and under the frozen reference (`completion_logprobs`, the
   training forward of `models/logprobs.py`, which projects hidden states to the vocabulary a
   chunk of positions at a time). The first mini-batch is trained on by the very policy that
   sampled it: its old log-probs are the training forward's own, detached, and it gets no
   separate forward.
3. `policy_loss` + `kl_k3` + `aggregate`: clipped ratio loss with eps_low / eps_high and dual clip,
   k3 KL to the frozen reference, token-mean or seq-mean-token-mean.
4. `grpo_update`: the batch is split into `updates_per_step` mini-batches, each one AdamW step after
   gradient accumulation over micro-batches, grad-norm clipping, and a skipped step when the norm
   is not finite. Without a KL term, rows whose advantage is exactly 0 (a group whose rewards are
   all equal) add nothing to the loss: `trained_rows` leaves them out of the forward and backward.
`train_step` runs 1-4 for one rollout batch (`RolloutBatch`) with a stage's models and optimizer
(`Learner`) and returns the step's metrics.

Conventions: N sequences = prompts x G; T = completion length; tensors are [N, T] unless noted.
"""

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

import distributed
from models.inputs import Tokens
from models.logprobs import completion_logprobs
from sampler import Rollout, concat_rollouts

# ----------------------------------------------------------------------------
# The GRPO math


def group_advantages(rewards, group_size, eps=1e-6):
    """(r - mean) / (std + eps) within consecutive groups of `group_size`. rewards [N] -> [N].

    std is the unbiased one (Bessel), as in the released code. A group whose rewards are all equal
    gets advantage exactly 0 for every member and contributes no policy gradient (computed, its
    mean can be one rounding off the common value, and that error divided by std + eps is not 0).
    """
    groups = rewards.view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, keepdim=True)
    advantages = (groups - mean) / (std + eps)
    all_equal = (groups == groups[:, :1]).all(dim=1, keepdim=True)
    return advantages.masked_fill(all_equal, 0.0).view(-1)


def policy_loss(logprobs, old_logprobs, advantages, *, eps_low, eps_high, dual_clip):
    """Clipped GRPO/PPO loss per token. logprobs, old_logprobs [n, T]; advantages [n] -> [n, T].

    loss = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high)); for A < 0 it is further capped
    at -A * dual_clip (dual clip), which bounds the push on a token whose ratio has exploded.
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
    """k3 estimator of KL(policy || reference) per token: exp(d) - d - 1 with d = ref - logp,
    clamped to [-10, 10]."""
    delta = ref_logprobs - logprobs
    return torch.clamp(torch.exp(delta) - delta - 1, -10.0, 10.0)


def aggregate(per_token, mask, *, mode, num_tokens=None, num_sequences=None):
    """Reduce a per-token loss [n, T] to a scalar.

    token-mean: sum of every token's loss / number of tokens;
    seq-mean-token-mean: each sequence's token mean, then the mean over sequences (released code).
    `num_tokens` / `num_sequences` are the mini-batch totals when [n, T] is one micro-batch of it,
    so accumulating micro-batch gradients gives exactly the mini-batch's gradient.
    """
    if mode == "token-mean":
        return (per_token * mask).sum() / (mask.sum() if num_tokens is None else num_tokens)
    if mode == "seq-mean-token-mean":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sequence.sum() / (per_token.shape[0] if num_sequences is None else num_sequences)
    raise ValueError(f"unknown loss aggregation {mode!r}: use token-mean or seq-mean-token-mean")


# ----------------------------------------------------------------------------
# One GRPO step


def _trimmed(ids, mask):
    """A micro-batch's completions cut to its own longest one: the rollout pads every row to the
    longest of the whole batch, and a forward over that padding would cost time and memory."""
    width = int(mask.sum(-1).max().item())
    return ids[:, :width], mask[:, :width]


@dataclass
class Learner:
    """What a GRPO stage trains and scores with (`run.Run.open_stage` loads it)."""
    policy: torch.nn.Module              # the trained model (fp32 master weights)
    optimizer: torch.optim.Optimizer | None  # AdamW over its trainable parameters (None: scoring
                                             # only); `make_optimizer`
    reference: torch.nn.Module | None    # the stage's starting weights, frozen: the KL anchor
                                         # (None when kl_coef == 0)
    tokens: Tokens                       # pad, EOS and never-sampled ids
    autocast: Callable = nullcontext     # opened around each forward, never around an optimizer
                                         # step (`Run.autocast`: bf16 compute of fp32 weights)
    on_device: Callable = nullcontext    # on_device(reference): the context the reference scores
                                         # in (`Run.on_device`: a parked reference visits the GPU)


@dataclass
class RolloutBatch:
    """One GRPO step's sampled and rewarded data on this rank."""
    prompts: list                 # the `Prompt` of each prompt index of `sampled`
    sampled: Rollout              # G completions per prompt, grouped
    rewards: torch.Tensor         # [N] one per completion, in the order of `sampled`
    advantages: torch.Tensor | None = None  # [N] used instead of normalising `rewards` within
                                            # groups of G (the spy game's clues: reward - baseline)
    metrics: dict = field(default_factory=dict)  # the role's own metrics (seconds sampling, ...)


@dataclass
class Experience:
    """A scored rollout batch, ready for the update."""
    prompts: list                 # `Prompt` per prompt index of `sampled`
    sampled: Rollout
    advantages: torch.Tensor      # [N]
    old_logprobs: torch.Tensor    # [N, T] policy right after the rollout
    ref_logprobs: torch.Tensor | None  # [N, T] frozen reference (None when kl_coef == 0)
    entropy: torch.Tensor         # [N, T] the old policy's entropy at each completion position
    fresh_rows: int = 0           # rows [0, fresh_rows): old log-probs and entropy still to come
                                  # from the first update's own forward (`grpo_update`)


@torch.no_grad()
def score_rollout(learner, prompts, sampled, advantages, cfg, fresh_rows=0, trained=None):
    """Old-policy log-probs and entropy of the rollout `sampled` (but the fresh rows) and
    reference log-probs of every row (no grad), micro-batch by micro-batch; returns an
    `Experience`.

    prompts: the `Prompt` of each prompt index of `sampled`; advantages: [N], one per completion.
    fresh_rows: the first mini-batch's rows, which the first update trains on with the policy that
    sampled them; `grpo_update` fills their old log-probs from its own forward, detached (the same
    numbers a separate forward would give, so the ratio there is 1 either way). trained: [N] bool,
    the rows the update will train on (`trained_rows`); a fresh row it skips is scored here.
    """
    policy, reference, tokens = learner.policy, learner.reference, learner.tokens
    rows, width = sampled.completion_ids.shape
    device = sampled.completion_ids.device
    old, entropy = torch.zeros((rows, width), device=device), torch.zeros((rows, width),
                                                                          device=device)
    ref = torch.zeros((rows, width), device=device) if reference is not None else None
    from_update = torch.arange(rows, device=device) < fresh_rows  # old log-probs: the update's
    if trained is not None:
        from_update &= trained.to(device)

    def score(model, index, **options):
        micro_prompts = [prompts[i] for i in sampled.prompt_index[index].tolist()]
        ids, mask = _trimmed(sampled.completion_ids[index], sampled.completion_mask[index])
        logprobs, token_entropy = completion_logprobs(
            model, micro_prompts, ids, mask, tokens=tokens, temperature=cfg.temperature,
            chunk_size=cfg.logprob_chunk, shared_prefix=cfg.shared_prefix, **options)
        return ids.shape[1], logprobs.to(device), token_entropy

    starts = range(0, rows, cfg.micro_batch_size)
    # a micro-batch's policy forward runs on every rank if one rank needs it (FSDP2's collectives)
    needed = distributed.all_reduce_sum(
        [float((~from_update[start:start + cfg.micro_batch_size]).any()) for start in starts])
    with learner.on_device(reference) if reference is not None else nullcontext():
        for start, need in zip(starts, needed):
            index = torch.arange(start, min(start + cfg.micro_batch_size, rows), device=device)
            with learner.autocast():
                scored = index[~from_update[index]]
                if need:
                    scored = scored if len(scored) else index  # (the update overwrites these)
                    columns, logprobs, token_entropy = score(policy, scored, with_entropy=True)
                    old[scored, :columns] = logprobs
                    entropy[scored, :columns] = token_entropy.to(device)
                if reference is not None:
                    columns, logprobs, _ = score(reference, index)
                    ref[index, :columns] = logprobs
    return Experience(prompts, sampled, advantages.to(device), old, ref, entropy, fresh_rows)


def trained_rows(advantages, cfg):
    """[N] bool: the rows an update must train on. Without a KL term (kl_coef 0) a row whose
    advantage is exactly 0 (every row of a group whose rewards are all equal) adds exactly 0 to
    the loss and to every gradient, so its forward and backward are skipped; the loss is still
    normalised by all the mini-batch's tokens or sequences, so the update is the same."""
    if cfg.kl_coef == 0:
        return advantages != 0
    return torch.ones_like(advantages, dtype=torch.bool)


def rows_to_forward(index, trained, micro_batch_size):
    """The rows of one mini-batch (`index`, [n]) an update forwards: those `trained` ([n] bool)
    marks, in order. At least one micro-batch always runs (an update with no trained row still
    takes its optimizer step from a zero gradient, as it would without the skip), and under
    data parallelism every rank runs as many micro-batches as the busiest (FSDP2 gathers and
    reduces per forward and backward): a rank with fewer trained rows adds skipped ones, which
    add exactly 0."""
    keep = trained.to(index.device)
    micro_batches = distributed.all_gather_list([math.ceil(int(keep.sum()) / micro_batch_size)])
    at_least = (max(max(micro_batches), 1) - 1) * micro_batch_size + 1  # rows for that many
    missing = at_least - int(keep.sum())
    if missing > 0:
        keep = keep | (torch.cumsum((~keep).long(), 0) <= missing)  # the first skipped rows
    return index[keep]


def scoring_stats(experience):
    """The old policy's mean entropy per completion token, and the largest gap between the
    log-probs recorded while sampling and those recomputed for the update (over every rank)."""
    sampled = experience.sampled
    mask = sampled.completion_mask.to(experience.old_logprobs.device)
    entropy_sum, tokens_sum = distributed.all_reduce_sum([(experience.entropy * mask).sum().item(),
                                                         mask.sum().item()])
    gap = (experience.old_logprobs - sampled.logprobs.to(mask.device)).abs() * mask
    return {"entropy": entropy_sum / tokens_sum,
            "logprob_mismatch": max(distributed.all_gather_list([gap.max().item()]))}


def make_optimizer(model, cfg):
    """AdamW over the trainable parameters; constant lr (the first update already uses it).

    Fused (one kernel for all parameters, no temporaries the size of the model) where the
    parameters are plain CUDA tensors; PyTorch's default (foreach) otherwise: on CPU, whose
    numbers the tests and the embedded default pin, and for FSDP2's sharded DTensors.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = all(p.is_cuda and not isinstance(p, DTensor) for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                             weight_decay=cfg.weight_decay, fused=fused or None)


def clip_grad_norm(params, max_norm):
    """Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before.

    Written out because the norm must cover every rank's shard under FSDP: the squares of the local
    shards are summed over ranks. A non-finite norm is returned as is and nothing is scaled (the
    caller skips that step).
    """
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
             for p in params if p.grad is not None]
    squares = 0.0
    if grads:  # one device sync for all tensors (not one per tensor); summed in Python floats
        squares = sum(torch.stack([g.detach().float().pow(2).sum() for g in grads]).tolist())
    norm = math.sqrt(distributed.all_reduce_sum(squares))
    if math.isfinite(norm) and norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def grpo_update(learner, experience, cfg, trained=None):
    """`cfg.updates_per_step` optimizer updates of the learner's policy over one scored rollout
    batch (one pass, in order).

    Per mini-batch: zero grads; for each micro-batch, loss = aggregate(policy_loss + kl_coef * k3)
    normalised by the mini-batch totals, backward; clip the grad norm to cfg.grad_clip; step only
    if the norm is finite. Returns a dict of metrics averaged over tokens / updates.
    Data parallel: each rank holds its share of every mini-batch; the totals that normalise the loss
    are summed over ranks and FSDP sums the gradients (`distributed.shard_model`), so the update is
    exactly that of the whole mini-batch on one process.
    """
    policy, optimizer = learner.policy, learner.optimizer
    # The optimizer's parameters: under FSDP `policy.parameters()` may yield the root's gathered
    # copies (the root stays unsharded after a forward), which never receive the sharded gradients.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sampled = experience.sampled
    rows = sampled.prompt_index.shape[0]
    per_update = rows // cfg.updates_per_step
    sums = {"loss": 0.0, "kl": 0.0, "clip_high": 0.0, "clip_low": 0.0, "dual_clip": 0.0}
    total_tokens, grad_norms, skipped = 0.0, [], 0
    policy.train()
    for update in range(cfg.updates_per_step):
        first, last = update * per_update, (update + 1) * per_update
        num_tokens, num_sequences = distributed.all_reduce_sum(
            [sampled.completion_mask[first:last].sum().item(), last - first])
        optimizer.zero_grad(set_to_none=True)
        index = torch.arange(first, last, device=sampled.completion_ids.device)
        if trained is not None:
            index = rows_to_forward(index, trained[first:last], cfg.micro_batch_size)
        for start in range(0, len(index), cfg.micro_batch_size):
            rows_here = index[start:start + cfg.micro_batch_size]
            micro_prompts = [experience.prompts[i]
                             for i in sampled.prompt_index[rows_here].tolist()]
            ids, mask = _trimmed(sampled.completion_ids[rows_here],
                                 sampled.completion_mask[rows_here])
            width = ids.shape[1]
            fresh = update == 0 and int(rows_here[0]) < experience.fresh_rows  # sampler's policy
            with learner.autocast():  # the forward only: backward and the step outside it
                logprobs, entropy = completion_logprobs(
                    policy, micro_prompts, ids, mask, tokens=learner.tokens,
                    temperature=cfg.temperature,
                    chunk_size=cfg.logprob_chunk, with_entropy=fresh,
                    shared_prefix=cfg.shared_prefix)
            if fresh:  # its old log-probs are this forward's own (ratio exactly 1)
                experience.old_logprobs[rows_here, :width] = logprobs.detach()
                experience.entropy[rows_here, :width] = entropy
            mask = mask.to(logprobs.device)
            per_token, clips = policy_loss(logprobs, experience.old_logprobs[rows_here, :width],
                                           experience.advantages[rows_here], eps_low=cfg.eps_low,
                                           eps_high=cfg.eps_high, dual_clip=cfg.dual_clip)
            kl = None
            if experience.ref_logprobs is not None:
                kl = kl_k3(logprobs, experience.ref_logprobs[rows_here, :width])
                per_token = per_token + cfg.kl_coef * kl
            loss = aggregate(per_token, mask, mode=cfg.loss_agg, num_tokens=num_tokens,
                             num_sequences=num_sequences)
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
            "clip_frac_high": sums["clip_high"] / tokens_seen,
            "clip_frac_low": sums["clip_low"] / tokens_seen,
            "clip_frac_dual": sums["dual_clip"] / tokens_seen,
            "grad_norm": sum(finite) / len(finite) if finite else math.nan,
            "skipped_updates": skipped}


# ----------------------------------------------------------------------------
# DAPO's dynamic sampling (an option, off by default)


def informative_groups(batch):
    """[P] bool, one per prompt of the `RolloutBatch`: its group's rewards are not all equal, so
    its advantages are not all 0."""
    index, rewards = batch.sampled.prompt_index.cpu(), batch.rewards.float().cpu()
    count = len(batch.prompts)
    high = torch.full((count,), -math.inf).scatter_reduce(0, index, rewards, "amax")
    low = torch.full((count,), math.inf).scatter_reduce(0, index, rewards, "amin")
    return high > low


def take_groups(batches, chosen, pad_id):
    """The `RolloutBatch` of the groups `chosen` names ((batch number, prompt index) pairs) out
    of `batches`, in that order, completions padded to the widest."""
    parts, prompts, rewards = [], [], []
    for number, prompt in chosen:
        batch = batches[number]
        rows = (batch.sampled.prompt_index == prompt).nonzero().flatten()
        parts.append(Rollout(torch.zeros_like(rows), batch.sampled.completion_ids[rows],
                             batch.sampled.completion_mask[rows], batch.sampled.logprobs[rows]))
        prompts.append(batch.prompts[prompt])
        rewards.append(batch.rewards[rows.to(batch.rewards.device)])
    sampled = concat_rollouts(parts, pad_id, [[i] for i in range(len(parts))])
    return RolloutBatch(prompts, sampled, torch.cat(rewards))


def dynamic_sampling(first, sample_more, *, rounds, updates_per_step, pad_id):
    """DAPO's dynamic sampling: a batch of the groups whose rewards are not all equal.

    first: this rank's `RolloutBatch`; sample_more(r) another one (r = 1, 2, ...: further
    prompts), drawn while a rank holds fewer informative groups than `first` has prompts and
    fewer than `rounds` have been drawn. Every rank keeps its first N informative groups, N the
    fewest any rank found, at most a full batch, cut to a multiple of updates_per_step (so ranks
    and updates stay even); with N 0, `first` as drawn. The rounds' metrics are summed (seconds).
    """
    batches, chosen, wanted = [first], [], len(first.prompts)
    while True:
        chosen += [(len(batches) - 1, prompt)
                   for prompt in informative_groups(batches[-1]).nonzero().flatten().tolist()]
        fewest = min(distributed.all_gather_list([len(chosen)]))
        if fewest >= wanted or len(batches) > rounds:
            break
        batches.append(sample_more(len(batches)))
    keep = min(fewest, wanted) // updates_per_step * updates_per_step
    batch = take_groups(batches, chosen[:keep], pad_id) if keep else first
    drawn, found, kept = distributed.all_reduce_sum([len(batches) * wanted, len(chosen), keep])
    batch.metrics = {name: sum(b.metrics[name] for b in batches) for name in first.metrics}
    batch.metrics.update({"sampling_rounds": len(batches), "informative_share": found / drawn,
                          "groups_kept": kept / (distributed.world_size() * wanted)})
    return batch


def train_step(learner, batch, cfg):
    """One GRPO step after the rollout: advantages, old/reference log-probs, the updates.

    batch: a `RolloutBatch` (rewards [N] grouped as its rollout is; advantages, when given, are
    used as they are). cfg: the stage's settings (`config.StageConfig`). Returns metrics (reward,
    advantage, length, timing, loss, KL, clip fractions, grad norm; the share of groups with
    no gradient, `zero_advantage_groups`, and of rows trained on, `rows_trained`).
    """
    started = time.perf_counter()
    rewards, advantages = batch.rewards, batch.advantages
    if advantages is None:
        advantages = group_advantages(rewards.float(), cfg.group_size)  # groups never span ranks
    advantages = advantages.float()
    trained = trained_rows(advantages, cfg)
    experience = score_rollout(learner, batch.prompts, batch.sampled, advantages, cfg,
                               fresh_rows=len(advantages) // cfg.updates_per_step,
                               trained=trained)
    metrics = grpo_update(learner, experience, cfg, trained=trained)
    metrics.update(scoring_stats(experience))
    sampled = batch.sampled
    rows = zip(rewards.float().tolist(), advantages.tolist(),
               sampled.completion_mask.sum(-1).float().tolist())
    reward, advantage, length = torch.tensor(distributed.all_gather_list(rows)).T  # every rank's
    # groups (the samples of one prompt) whose advantages are all 0: no policy gradient
    groups, index = torch.unique(sampled.prompt_index.cpu(), return_inverse=True)
    moving = torch.zeros(len(groups)).index_add_(0, index, (advantages.cpu() != 0).float())
    n_groups, zero_groups, rows_trained = distributed.all_reduce_sum(
        [len(groups), (moving == 0).sum().item(), trained.sum().item()])
    metrics.update({"zero_advantage_groups": zero_groups / n_groups,
                    "rows_trained": rows_trained / len(reward)})
    metrics.update({"reward_mean": reward.mean().item(), "reward_std": reward.std().item(),
                    "advantage_std": advantage.std().item(),
                    "response_length_mean": length.mean().item(),
                    "response_length_max": int(length.max().item()),
                    "seconds_training": time.perf_counter() - started})
    return metrics
