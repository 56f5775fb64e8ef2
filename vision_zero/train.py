"""Vision-Zero's run: one model plays every seat of the spy game and learns from it (`rules.py`
has the game's rules; the sampler, GRPO update, FSDP2, checkpoints and evaluation are VisPlay's).

    python visplay.py --config configs/vision-zero.yaml          # the embedded default (CPU)
    python visplay.py --config configs/vision-zero-qwen2.5-vl-7b.yaml \\
        --set model.path=/models/Qwen2.5-VL-7B-Instruct --set spy.pairs=/data/pairs.jsonl

1. The base: model.path, or for the embedded default the toy base after `warmup.warm_up` (a
   short supervised lesson in the game's format on base-domain scenes: the toy base never saw a
   game). It is evaluated on the benchmarks -> eval_v0.json.
2. `train_game`: spy.steps updates; each plays spy.prompts_per_step games (`play`: every game's
   clue turn k is sampled together, then every vote), scores them (`score`), trains the active
   stage only, and lets Iterative-SPO's switch pick the next stage. Checkpoints every save_every
   updates hold the switch and the role baselines too, so a rerun resumes exactly.
3. The trained model (spy_v1/) evaluated -> eval_v1.json; the per-step metrics are in
   metrics.jsonl, every step's games in games/.
With spy.heldout_games, the starting model's clues on a fixed set of held-out games are frozen
after step 1 (heldout_clues.jsonl), and the starting and the trained model vote on them (and after
their own clues) -> heldout_v0.json, heldout_v1.json (`heldout.py`); the run prints the line.
"""

import logging
import os
import random
import time

import torch

import checkpoint
import distributed
from data import read_pairs, write_jsonl
from distributed import my_part
from eval import evaluate_reasoner
from grpo import RolloutBatch, group_advantages, train_step
from run import Run, draw, free_memory, seed_for
from sampler import concat_rollouts
from summary import eval_row, format_summary
from tracking import progress
from vision_zero import heldout, rules
from vision_zero.play import play, readable_games
from vision_zero.warmup import toy_pairs, warm_up

log = logging.getLogger("visplay")


# ----------------------------------------------------------------------------
# Scoring


def score(played, baselines, settings):
    """Rewards and advantages of both stages, and the step's statistics (summed over ranks).

    Decision: each vote sample's reward (equation 4), normalised within its civilian's samples.
    Clue: each player's zero-sum reward from the votes (equation 1), the role baselines updated
    with this step's role means (over every rank), then advantage = reward - baseline; a player's
    advantage goes to each of its clues. Returns ((clue rewards, clue advantages) per clue row,
    (vote rewards, vote advantages) per vote sample, stats).
    """
    games = played.games
    votes_by_game = [[] for _ in games]
    for (i, _), samples in zip(played.vote_owner, played.votes):
        votes_by_game[i].append(samples)
    rewards = [rules.clue_rewards(rules.vote_counts(votes_by_game[i], g.players), g.spy,
                                  beta=settings.beta, lam=settings.lam)
               for i, g in enumerate(games)]
    spy_sum = sum(r[g.spy] for r, g in zip(rewards, games))
    civilian_sum = sum(sum(r[k] for k in g.civilians()) / len(g.civilians())
                       for r, g in zip(rewards, games))
    flat = [(v, games[i].spy) for (i, _), samples in zip(played.vote_owner, played.votes)
            for v in samples]  # (vote, the spy) per vote sample, in row order
    vote_rewards = torch.tensor([rules.decision_reward(v, s) for v, s in flat])
    vote_adv = group_advantages(vote_rewards, settings.group_size)
    plural_right = 0
    for (i, _), samples in zip(played.vote_owner, played.votes):
        counts = {v: samples.count(v) for v in set(samples)}
        top = max(counts.values())
        plural_right += [v for v, c in counts.items() if c == top] == [games[i].spy]
    totals = distributed.all_reduce_sum([
        len(games), spy_sum, civilian_sum,
        *rules.vote_tally(games, played.vote_owner, played.votes),
        len(played.votes), plural_right, len(played.clue_owner),
        sum(t.clue is None for turns in played.turns for t in turns)])
    (n_games, spy_sum, civilian_sum, n_votes, right, na, invalid, n_voters, plural_right,
     n_clues, bad_clues) = totals
    baselines.update(spy_sum / n_games, civilian_sum / n_games)
    clue_rewards = torch.tensor([rewards[i][k] for i, k in played.clue_owner])
    clue_adv = torch.tensor([baselines.advantage(rewards[i][k], k == games[i].spy)
                             for i, k in played.clue_owner])
    stats = {"games": int(n_games), "vote_acc": right / n_votes, "na_rate": na / n_votes,
             "invalid_vote_rate": invalid / n_votes, "invalid_votes": int(invalid),
             "plurality_acc": plural_right / n_voters, "invalid_clues": int(bad_clues),
             "invalid_clue_rate": bad_clues / n_clues,
             "clue_reward_spy": spy_sum / n_games, "clue_reward_civilian": civilian_sum / n_games,
             "baseline_spy": baselines.spy, "baseline_civilian": baselines.civilian}
    return (clue_rewards, clue_adv), (vote_rewards, vote_adv), stats


def training_batch(played, phase, clue, vote, *, phase_mask, pad_id):
    """The `grpo.RolloutBatch` the update trains on: the active stage's samples only (phase_mask
    False, the released code: clue steps train the votes too), with their advantages. clue, vote:
    (rewards, advantages) of the clue rows and of the vote samples (`score`)."""
    if phase == rules.DECISION:
        return RolloutBatch(played.vote_prompts, played.vote_rollout, *vote)
    if phase_mask:
        return RolloutBatch(played.clue_prompts, played.clue_rollout, *clue)
    n, m = len(played.clue_prompts), len(played.vote_prompts)
    sampled = concat_rollouts([played.clue_rollout, played.vote_rollout], pad_id,
                              [list(range(n)), list(range(n, n + m))])
    return RolloutBatch(played.clue_prompts + played.vote_prompts, sampled,
                        torch.cat([clue[0], vote[0]]), torch.cat([clue[1], vote[1]]))


# ----------------------------------------------------------------------------
# Training


def _switch(settings):
    return rules.PhaseSwitch(rho=settings.ema_rho, acc_up=settings.acc_up,
                             na_down=settings.na_down, err_up=settings.err_up,
                             na_up=settings.na_up, k_min=settings.k_min,
                             patience=settings.patience, schedule=settings.schedule,
                             debias=settings.ema_debias)


def _game_rows(played):
    """One row per game: the pair, the spy's seat, every clue (raw text and parsed), the votes."""
    raw = [[] for _ in played.games]  # clue rows run round by round, seat by seat, game by game
    for (i, _), text in zip(played.clue_owner, played.clue_texts):
        raw[i].append(text)
    rows = []
    for i, game in enumerate(played.games):
        rows.append({"pair": game.pair, "spy": game.spy,
                     "clues": [{"player": t.player, "round": t.round, "clue": t.clue, "raw": text}
                               for t, text in zip(played.turns[i], raw[i])],
                     "votes": {str(voter): ["n/a" if v == rules.NA else v for v in samples]
                               for (j, voter), samples in zip(played.vote_owner, played.votes)
                               if j == i}})
    return rows


def train_game(run, pairs, *, start_path, out_path):
    """spy.steps updates of the game from start_path to a save_pretrained folder at out_path
    (`Run.open_stage` loads, resumes, checkpoints and exports, as for VisPlay's stages)."""
    settings = run.cfg.spy
    stage = run.open_stage(settings, start_path=start_path, out_path=out_path, label="spy")
    policy, processor, tokens = stage.learner.policy, stage.processor, stage.learner.tokens
    baselines, switch = rules.RoleBaselines(settings.rae_alpha), _switch(settings)
    if stage.extra is not None:  # resumed: baselines and switch as the checkpoint left them
        baselines.load_state_dict(stage.extra["baselines"])
        switch.load_state_dict(stage.extra["switch"])
    run.restart_metrics(1, "spy", from_step=stage.start)
    skipped, mismatched = 0, set()  # unreadable games; pairs whose images differ in size
    bar = progress(settings.steps, stage.start, "spy", show=distributed.is_main())
    for step in range(stage.start, settings.steps):
        started = time.perf_counter()
        order = draw(seed_for(run.cfg.seed, "spy-pairs", step), len(pairs),
                     settings.prompts_per_step)
        seats = random.Random(seed_for(run.cfg.seed, "spy-seats", step))
        games = my_part(rules.deal(seats, order, settings.civilians + 1),
                        blocks=settings.updates_per_step)
        kept, images, unreadable = readable_games(games, pairs, run.cfg.model.min_pixels,
                                                  run.cfg.model.max_pixels, warned=mismatched)
        skipped += unreadable
        if not kept:
            raise RuntimeError(f"no readable pair among step {step}'s games ({skipped} skipped)")
        with run.autocast():
            played = play(run, policy, processor, tokens, kept, images, step)
        seconds_playing = time.perf_counter() - started
        clue, vote, stats = score(played, baselines, settings)
        phase = switch.phase
        batch = training_batch(played, phase, clue, vote, phase_mask=settings.phase_mask,
                               pad_id=tokens.pad_id)
        metrics = train_step(stage.learner, batch, settings)
        next_phase = switch.observe(stats["plurality_acc"], stats["na_rate"])
        ema_acc, ema_na = switch.estimates()
        metrics.update(stats, iteration=1, stage="spy", step=step, phase=phase,
                       next_phase=next_phase, switch_reason=switch.reason, ema_acc=ema_acc,
                       ema_na=ema_na, skipped_pairs=skipped, seconds_playing=seconds_playing)
        run.log_metrics(metrics)
        rows = distributed.all_gather_list(_game_rows(played))
        if distributed.is_main():
            os.makedirs(run.path("games"), exist_ok=True)
            write_jsonl(run.path("games", f"step_{step:05d}.jsonl"), rows)
        log.info("[spy %d/%d %s] vote acc %.2f (plurality %.2f)  n/a %.2f  invalid votes %.2f "
                 "clues %.2f  kl %.4f  -> %s%s  time play %.1fs train %.1fs", step + 1,
                 settings.steps, phase, stats["vote_acc"], stats["plurality_acc"],
                 stats["na_rate"], stats["invalid_vote_rate"], stats["invalid_clue_rate"],
                 metrics["kl"], next_phase, f" (switch: {switch.reason})" if switch.reason else "",
                 seconds_playing, metrics["seconds_training"])
        stage.save(step + 1, extra={"baselines": baselines.state_dict(),
                                    "switch": switch.state_dict()})
        bar.update(1)
    bar.close()
    stage.finish()


def run_game(cfg):
    """The whole Vision-Zero run: the base evaluated, the game trained, the result evaluated."""
    started = time.perf_counter()
    run = Run(cfg)  # (checks spy.prompts_per_step against the processes too)
    settings = cfg.spy
    run.check_config()
    pairs = read_pairs(settings.pairs if settings.pairs else toy_pairs(run))
    base = run.base
    if cfg.model.path is None and settings.warmup_steps:
        base = warm_up(run, run.base, run.path("embedded", "game_base"))
    log.info("vision-zero run %s: %d pairs, base %s, %d civilians + 1 spy, %d process(es)",
             run.dir, len(pairs), base, settings.civilians, distributed.world_size())
    held = settings.heldout_games > 0
    if held:
        held_pairs = heldout.read_heldout_pairs(run)
    steps = [  # (what a step writes, the last marking it done; the step)
        (("eval_v0_items.jsonl", "eval_v0.json"),
         lambda out: evaluate_reasoner(run, 0, reasoner_path=base, out_path=out)),
        *([(("heldout_clues.jsonl",),
            lambda out: heldout.freeze_clues(run, base, held_pairs, out)),
           (("heldout_v0.json",), lambda out: heldout.measure(
               run, base, held_pairs, run.path("heldout_clues.jsonl"), out))] if held else []),
        (("spy_v1",), lambda out: train_game(run, pairs, start_path=base, out_path=out)),
        (("eval_v1_items.jsonl", "eval_v1.json"),
         lambda out: evaluate_reasoner(run, 1, reasoner_path=run.path("spy_v1"), out_path=out)),
        *([(("heldout_v1.json",), lambda out: heldout.measure(
            run, run.path("spy_v1"), held_pairs, run.path("heldout_clues.jsonl"), out))]
          if held else [])]
    checkpoint.check_outputs(run.dir, [name for names, _ in steps for name in names])
    for names, step in steps:
        if not os.path.exists(run.path(names[-1])):
            step(run.path(names[-1]))
            checkpoint.record_outputs(run.dir, names)
            free_memory()
    summaries = [eval_row(run.dir, 0), eval_row(run.dir, 1)]
    run.log_summaries(summaries)
    run.close_logging()
    if distributed.is_main():
        write_jsonl(run.path("summary.jsonl"), summaries)
        log.info("done in %.1f s", time.perf_counter() - started)
        print(format_summary(summaries))
        if held:
            print(heldout.heldout_line(run.path("heldout_v0.json"), run.path("heldout_v1.json")))
    return summaries
