"""Vision-Zero's run: one model plays every seat of the spy game and learns from it (`spy.py` has
the game's rules; the sampler, GRPO update, FSDP2, checkpoints and evaluation are VisPlay's).

    python visplay.py --config configs/vision-zero.yaml          # the embedded default (CPU)
    python visplay.py --config configs/vision-zero-qwen2.5-vl-7b.yaml \\
        --set model.path=/models/Qwen2.5-VL-7B-Instruct --set spy.pairs=/data/pairs.jsonl

1. The base: model.path, or for the embedded default the toy base after `warm_up` (a short
   supervised lesson in the game's format on base-domain scenes: the toy base never saw a
   game). It is evaluated on the benchmarks -> eval_v0.json.
2. `train_game`: spy.steps updates; each plays spy.prompts_per_step games (`play`: every game's
   clue turn k is sampled together, then every vote), scores them (`score`), trains the active
   stage only, and lets Iterative-SPO's switch pick the next stage. Checkpoints every save_every
   updates hold the switch and the role baselines too, so a rerun resumes exactly.
3. The trained model (spy_v1/) evaluated -> eval_v1.json; the per-step metrics are in
   metrics.jsonl, every step's games in games/.
"""

import json
import logging
import os
import random
import time
from dataclasses import dataclass

import torch
from PIL import Image

import checkpoint
import distributed
import spy
from config import ConfigError
from data import atomic_path, load_image, write_jsonl
from distributed import gathered, my_part
from grpo import group_advantages, make_optimizer, train_step
from roles import encode_prompt
from run import Run, free_memory, seed_for
from sampler import Sampling, concat_rollouts, decode, rollout, special_tokens
from summary import eval_row, format_summary

log = logging.getLogger("visplay")


# ----------------------------------------------------------------------------
# The embedded default's pairs and game-ready base


def toy_pairs(run):
    """The embedded default's image pairs: every pool scene and its twin (`spy.twin`), written
    once under RUN/embedded/pairs. Returns the manifest."""
    import toyworld

    folder = run.path("embedded", "pairs")
    if distributed.is_main() and not os.path.isdir(folder):
        with atomic_path(folder) as tmp:
            spy.write_toy_pairs(tmp, toyworld.pool_scenes(toyworld.WorldConfig(), run.cfg.seed),
                                seed_for(run.cfg.seed, "twins"))
    distributed.barrier()
    return os.path.join(folder, "pairs.jsonl")


def warmup_example(rng, processor, world, base, *, players, rounds, difference):
    """One supervised pair in the game's compact format, on a fresh base-domain scene of 2-5
    things and its twin, with scripted players: each clue names a thing of the speaker's image
    not named before (the spy's may be a changed one); a civilian's vote checks every clue
    against its image as the base answers "Is there a red circle?" ("2 red circle: none", or
    "2 red circle: red circle" when it has one), then votes the first player whose clue its
    image lacks, or n/a. Three examples in
    ten are the base's own pretraining (`toybase.pretraining_example`), so it keeps answering."""
    import toybase
    import toyworld

    if rng.random() < 0.3:
        return toybase.pretraining_example(rng, processor, world, base)
    scene = toyworld.random_scene(rng, rows=world.rows, cols=world.cols, min_things=2,
                                  max_things=5)
    edited = spy.twin(scene, rng)
    game = spy.Game(0, rng.randint(1, players), players)
    turns, named = [], set()
    speaker, when = rng.randint(1, players), rng.randint(1, rounds)
    for r in range(1, rounds + 1):
        for k in range(1, players + 1):
            things = (edited if k == game.spy else scene).things
            fresh = [t.name for t in things if t.name not in named] or [t.name for t in things]
            clue = rng.choice(fresh)
            if (r, k) == (when, speaker) and rng.random() < 0.5:
                image = (edited if k == game.spy else scene).render()
                text = spy.clue_prompt_text(game, k, r, turns, style="compact",
                                            difference=difference)
                return (encode_prompt(processor, image, text),
                        toybase.encode_target(processor, f"\\boxed{{{clue}}}"))
            named.add(clue)
            turns.append(spy.Turn(k, r, "", clue))
    voter = rng.choice(game.civilians())
    mine = {t.name for t in scene.things}
    odd = [t for t in turns if t.clue not in mine]
    checked = "; ".join(f"{t.player} {t.clue}: {t.clue if t.clue in mine else 'none'}"
                        for t in turns)
    target = f"{checked}. \\boxed{{{odd[0].player if odd else spy.NA}}}"
    text = spy.vote_prompt_text(game, voter, turns, style="compact", difference=difference)
    return encode_prompt(processor, scene.render(), text), toybase.encode_target(processor, target)


SHIPPED_GAME_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "embedded_game_base")


def warmup_settings(cfg, source):
    """What a game base depends on: the seed, the game's shape and the toy base it starts from
    (the SHA-256 of `source`'s weights, so a game base is never reused for another toy base)."""
    import toybase

    spy_cfg = cfg.spy
    return {"seed": cfg.seed, "steps": spy_cfg.warmup_steps, "players": spy_cfg.civilians + 1,
            "rounds": spy_cfg.rounds, "difference": spy_cfg.difference,
            "source_weights": toybase.sha256(os.path.join(source, "model.safetensors"))}


def build_game_base(source, dest, settings):
    """`source` (the toy base) after settings["steps"] supervised steps of `warmup_example`,
    saved atomically to `dest` with warmup.json (the settings)."""
    from dataclasses import replace
    from functools import partial

    import toybase
    import toyworld
    from vlm import load_vlm, save_vlm

    started = time.perf_counter()
    model, processor = load_vlm(source)
    torch.manual_seed(seed_for(settings["seed"], "warm-up"))
    # the replayed pretraining examples follow the toy base's own recipe (its lazy lists
    # included): the warm-up teaches the game and leaves the base's other habits as they were
    base = replace(toybase.BaseConfig(), steps=settings["steps"], lr=1e-3, batch_size=32)
    example = partial(warmup_example, players=settings["players"], rounds=settings["rounds"],
                      difference=settings["difference"])
    toybase.pretrain(model, processor, world=toyworld.WorldConfig(), base=base,
                     seed=seed_for(settings["seed"], "warm-up-data"), example=example)
    with atomic_path(dest) as tmp:
        save_vlm(model, processor, tmp)
        with open(os.path.join(tmp, "warmup.json"), "w") as f:
            json.dump(settings, f, indent=1)
    log.info("game warm-up: %d steps in %.0f s -> %s", settings["steps"],
             time.perf_counter() - started, dest)


def warm_up(run, source, dest):
    """The embedded default's game-ready base at `dest` (rank 0 makes it once): the repository's
    embedded_game_base/ (checksums verified) when it was built with this run's settings (seed 0,
    the default game: 3000 steps take about 23 minutes on 2 cores), else `build_game_base`."""
    import toybase

    if distributed.is_main() and not os.path.isdir(dest):
        shipped = os.path.join(SHIPPED_GAME_BASE, "warmup.json")
        settings, same = warmup_settings(run.cfg, source), False
        if os.path.isfile(shipped):
            with open(shipped) as f:
                same = json.load(f) == settings
        if same:
            toybase.copy_verified(SHIPPED_GAME_BASE, dest)
            log.info("game base: the shipped %s (checksums verified)", SHIPPED_GAME_BASE)
        else:
            build_game_base(source, dest, settings)
    distributed.barrier()
    return dest


# ----------------------------------------------------------------------------
# Playing


@dataclass
class Played:
    """One step's games on this rank, played to the end."""
    games: list                   # `spy.Game`
    turns: list                   # per game, its `spy.Turn`s in speaking order
    clue_prompts: list            # the `Prompt` of each clue row
    clue_rollout: object          # `Rollout`: one row per clue, rounds x seats x games
    clue_owner: list              # (game, player) of each clue row
    vote_prompts: list            # the `Prompt` of each vote prompt
    vote_rollout: object          # `Rollout`: group_size rows per vote prompt
    vote_owner: list              # (game, voter) of each vote prompt (voter None: observer)
    votes: list                   # per vote prompt, its parsed samples (seat, spy.NA or None)
    clue_texts: list              # each clue row's decoded completion, for the game files


def play(run, policy, processor, tokens, games, images, step):
    """Play `games` (images[i]: game i's (original, edited) images): clue turns in seat order
    over the rounds, each turn of every game sampled together; then the votes."""
    settings = run.cfg.spy
    style, difference = settings.prompts, settings.difference
    clue_sampling = Sampling(settings.temperature, settings.top_p, settings.top_k,
                             settings.max_new_tokens)
    vote_sampling = Sampling(settings.temperature, settings.top_p, settings.top_k,
                             settings.vote_max_new_tokens)
    limits = run.limits(settings.rollout_batch_size)

    def seen(game, i, player):  # the image `player` of game i holds
        original, edited = images[i]
        if player != game.spy:
            return original
        return edited if settings.spy_image == "edited" else Image.new("RGB", edited.size,
                                                                       (255, 255, 255))

    turns = [[] for _ in games]
    clue_prompts, clue_parts, clue_owner, clue_texts = [], [], [], []
    with gathered(policy):
        for r in range(1, settings.rounds + 1):
            for k in range(1, games[0].players + 1):
                prompts = [encode_prompt(processor, seen(g, i, k), spy.clue_prompt_text(
                    g, k, r, turns[i], style=style, difference=difference))
                    for i, g in enumerate(games)]
                part = rollout(policy, prompts, group_size=1, sampling=clue_sampling,
                               tokens=tokens, limits=limits,
                               generator=run.generator("spy", step, "clue", r, k))
                for i, text in enumerate(decode(processor, part.completion_ids,
                                                part.completion_mask)):
                    reasoning, clue = spy.parse_clue(text)
                    turns[i].append(spy.Turn(k, r, reasoning, clue))
                    clue_owner.append((i, k))
                    clue_texts.append(text)
                clue_prompts += prompts
                clue_parts.append(part)
        vote_owner = [(i, voter) for i, g in enumerate(games)
                      for voter in (g.civilians() if settings.voters == "civilians" else [None])]
        vote_prompts = [encode_prompt(processor, images[i][0], spy.vote_prompt_text(
            games[i], voter, turns[i], style=style, difference=difference))
            for i, voter in vote_owner]
        vote_rollout = rollout(policy, vote_prompts, group_size=settings.group_size,
                               sampling=vote_sampling, tokens=tokens, limits=limits,
                               generator=run.generator("spy", step, "vote"))
    vote_texts = decode(processor, vote_rollout.completion_ids, vote_rollout.completion_mask)
    size = settings.group_size
    votes = [[spy.parse_vote(t, games[i].players) for t in vote_texts[j * size:(j + 1) * size]]
             for j, (i, _) in enumerate(vote_owner)]
    batches = [list(range(j * len(games), (j + 1) * len(games))) for j in range(len(clue_parts))]
    clue_rollout = concat_rollouts(clue_parts, tokens.pad_id, batches)
    return Played(games, turns, clue_prompts, clue_rollout, clue_owner, vote_prompts,
                  vote_rollout, vote_owner, votes, clue_texts)


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
    rewards = [spy.clue_rewards(spy.vote_counts(votes_by_game[i], g.players), g.spy,
                                beta=settings.beta, lam=settings.lam)
               for i, g in enumerate(games)]
    spy_sum = sum(r[g.spy] for r, g in zip(rewards, games))
    civilian_sum = sum(sum(r[k] for k in g.civilians()) / len(g.civilians())
                       for r, g in zip(rewards, games))
    flat = [(v, games[i].spy) for (i, _), samples in zip(played.vote_owner, played.votes)
            for v in samples]  # (vote, the spy) per vote sample, in row order
    vote_rewards = torch.tensor([spy.decision_reward(v, s) for v, s in flat])
    vote_adv = group_advantages(vote_rewards, settings.group_size)
    plural_right = 0
    for (i, _), samples in zip(played.vote_owner, played.votes):
        counts = {v: samples.count(v) for v in set(samples)}
        top = max(counts.values())
        plural_right += [v for v, c in counts.items() if c == top] == [games[i].spy]
    totals = distributed.all_reduce_sum([
        len(games), spy_sum, civilian_sum, len(flat), sum(v == s for v, s in flat),
        sum(v == spy.NA for v, _ in flat), sum(v is None for v, _ in flat),
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
    """(prompts, rollout, rewards, advantages) the update trains on: the active stage's samples
    only (phase_mask False, the released code: clue steps train the votes too). clue, vote:
    (rewards, advantages) of the clue rows and of the vote samples (`score`)."""
    if phase == spy.DECISION:
        return (played.vote_prompts, played.vote_rollout) + vote
    if phase_mask:
        return (played.clue_prompts, played.clue_rollout) + clue
    n, m = len(played.clue_prompts), len(played.vote_prompts)
    sampled = concat_rollouts([played.clue_rollout, played.vote_rollout], pad_id,
                              [list(range(n)), list(range(n, n + m))])
    return (played.clue_prompts + played.vote_prompts, sampled, torch.cat([clue[0], vote[0]]),
            torch.cat([clue[1], vote[1]]))


# ----------------------------------------------------------------------------
# Training


def readable_games(games, pairs, min_pixels, max_pixels):
    """(games, their (original, edited) images, how many were skipped): a game whose pair cannot
    be read is skipped, logged and counted, never fatal."""
    kept, images = [], []
    for game in games:
        try:
            images.append(tuple(load_image(p, min_pixels, max_pixels) for p in pairs[game.pair]))
            kept.append(game)
        except ValueError as error:
            log.warning("[spy] skipping the game on pair %d: %s", game.pair, error)
    return kept, images, len(games) - len(kept)


def _switch(settings):
    return spy.PhaseSwitch(rho=settings.ema_rho, acc_up=settings.acc_up,
                           na_down=settings.na_down, err_up=settings.err_up,
                           na_up=settings.na_up, k_min=settings.k_min,
                           patience=settings.patience, schedule=settings.schedule)


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
                     "votes": {str(voter): ["n/a" if v == spy.NA else v for v in samples]
                               for (j, voter), samples in zip(played.vote_owner, played.votes)
                               if j == i}})
    return rows


def train_game(run, pairs, *, start_path, out_path):
    """spy.steps updates of the game from start_path to a save_pretrained folder at out_path."""
    from visplay import draw

    settings = run.cfg.spy
    policy, processor = run.load_model(start_path, trainable=True)
    reference = None
    if settings.kl_coef > 0:
        reference, _ = run.load_model(start_path, trainable=False, park=True)
    optimizer = make_optimizer(policy, settings)
    tokens = special_tokens(processor, policy)
    baselines, switch = spy.RoleBaselines(settings.rae_alpha), _switch(settings)
    folder = run.path("checkpoints", os.path.basename(out_path))
    start, found = 0, checkpoint.latest(folder)
    if found is not None:
        start, path = found
        extra = checkpoint.load(path, policy, optimizer)["extra"]
        baselines.load_state_dict(extra["baselines"])
        switch.load_state_dict(extra["switch"])
        log.info("[spy] resumed from %s", path)
    run.restart_metrics(1, "spy", from_step=start)
    skipped = 0
    for step in range(start, settings.steps):
        started = time.perf_counter()
        order = draw(seed_for(run.cfg.seed, "spy-pairs", step), len(pairs),
                     settings.prompts_per_step)
        seats = random.Random(seed_for(run.cfg.seed, "spy-seats", step))
        games = my_part(spy.deal(seats, order, settings.civilians + 1),
                        blocks=settings.updates_per_step)
        kept, images, unreadable = readable_games(games, pairs, run.cfg.model.min_pixels,
                                                  run.cfg.model.max_pixels)
        skipped += unreadable
        if not kept:
            raise RuntimeError(f"no readable pair among step {step}'s games ({skipped} skipped)")
        with run.autocast():
            played = play(run, policy, processor, tokens, kept, images, step)
        seconds_playing = time.perf_counter() - started
        clue, vote, stats = score(played, baselines, settings)
        phase = switch.phase
        prompts, sampled, rewards, advantages = training_batch(
            played, phase, clue, vote, phase_mask=settings.phase_mask, pad_id=tokens.pad_id)
        metrics = train_step(policy, reference, optimizer, prompts=prompts, sampled=sampled,
                             rewards=rewards, tokens=tokens, cfg=settings, autocast=run.autocast,
                             on_device=run.on_device, advantages=advantages)
        next_phase = switch.observe(stats["plurality_acc"], stats["na_rate"])
        metrics.update(stats, iteration=1, stage="spy", step=step, phase=phase,
                       next_phase=next_phase, ema_acc=switch.acc, ema_na=switch.na,
                       skipped_pairs=skipped, seconds_playing=seconds_playing)
        run.log_metrics(metrics)
        rows = distributed.all_gather_list(_game_rows(played))
        if distributed.is_main():
            os.makedirs(run.path("games"), exist_ok=True)
            write_jsonl(run.path("games", f"step_{step:05d}.jsonl"), rows)
        log.info("[spy %d/%d %s] vote acc %.2f (plurality %.2f)  n/a %.2f  invalid votes %.2f "
                 "clues %.2f  kl %.4f  -> %s  time play %.1fs train %.1fs", step + 1,
                 settings.steps, phase, stats["vote_acc"], stats["plurality_acc"],
                 stats["na_rate"], stats["invalid_vote_rate"], stats["invalid_clue_rate"],
                 metrics["kl"], next_phase, seconds_playing, metrics["seconds_training"])
        done = step + 1
        if run.cfg.save_every and done % run.cfg.save_every == 0 and done < settings.steps:
            checkpoint.save(folder, done, policy, optimizer,
                            extra={"baselines": baselines.state_dict(),
                                   "switch": switch.state_dict()})
    run.export(policy, processor, out_path)
    checkpoint.remove(folder)


def run_game(cfg):
    """The whole Vision-Zero run: the base evaluated, the game trained, the result evaluated."""
    from visplay import evaluate_reasoner

    started = time.perf_counter()
    run = Run(cfg)
    settings = cfg.spy
    if settings.prompts_per_step % (settings.updates_per_step * distributed.world_size()):
        raise ConfigError(f"spy.prompts_per_step ({settings.prompts_per_step}) must be a multiple "
                          f"of updates_per_step x processes ({settings.updates_per_step} x "
                          f"{distributed.world_size()})")
    run.check_config()
    pairs = spy.read_pairs(settings.pairs if settings.pairs else toy_pairs(run))
    base = run.base
    if cfg.model.path is None and settings.warmup_steps:
        base = warm_up(run, run.base, run.path("embedded", "game_base"))
    log.info("vision-zero run %s: %d pairs, base %s, %d civilians + 1 spy, %d process(es)",
             run.dir, len(pairs), base, settings.civilians, distributed.world_size())
    if not os.path.exists(run.path("eval_v0.json")):
        evaluate_reasoner(run, 0, reasoner_path=base, out_path=run.path("eval_v0.json"))
        free_memory()
    if not os.path.exists(run.path("spy_v1")):
        train_game(run, pairs, start_path=base, out_path=run.path("spy_v1"))
        free_memory()
    if not os.path.exists(run.path("eval_v1.json")):
        evaluate_reasoner(run, 1, reasoner_path=run.path("spy_v1"),
                          out_path=run.path("eval_v1.json"))
    summaries = [eval_row(run.dir, 0), eval_row(run.dir, 1)]
    if distributed.is_main():
        write_jsonl(run.path("summary.jsonl"), summaries)
        log.info("done in %.1f s", time.perf_counter() - started)
        print(format_summary(summaries))
    return summaries


def main(argv=None):
    """`python vision_zero.py --rebuild`: build seed 0's game base again into embedded_game_base/
    with its checksums: the shipped toy base (embedded_base/, checksums verified) warmed up for
    configs/vision-zero.yaml's game, with one thread, as the shipped game base was."""
    import argparse
    import shutil

    import toybase
    from config import load_config

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rebuild", action="store_true", required=True)
    parser.add_argument("--out", default=SHIPPED_GAME_BASE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    cfg = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                   "vision-zero.yaml"), [f"seed={toybase.SHIPPED_SEED}"])
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    torch.set_num_threads(1)  # sums in the shipped game base's order
    source = args.out.rstrip("/") + ".toy_base"
    toybase.copy_verified(toybase.SHIPPED_BASE, source)
    build_game_base(source, args.out, warmup_settings(cfg, source))
    shutil.rmtree(source)
    toybase.write_checksums(args.out)


if __name__ == "__main__":
    main()
