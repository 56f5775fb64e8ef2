"""Playing Vision-Zero's spy game: one model plays every seat of a batch of games (`play`: the
clue turns, `play_clues`, then the votes, `play_votes`), on image pairs read as they come
(`readable_games`). Training (`train.py`) and the held-out games (`heldout.py`) both play here.
"""

import logging
from dataclasses import dataclass

from PIL import Image

from data import load_image
from distributed import gathered
from models.inputs import encode_prompt
from sampler import Sampling, concat_rollouts, decode, rollout
from vision_zero import rules

log = logging.getLogger("visplay")


@dataclass
class Played:
    """One step's games on this rank, played to the end."""
    games: list                   # `rules.Game`
    turns: list                   # per game, its `rules.Turn`s in speaking order
    clue_prompts: list            # the `Prompt` of each clue row
    clue_rollout: object          # `Rollout`: one row per clue, rounds x seats x games
    clue_owner: list              # (game, player) of each clue row
    vote_prompts: list            # the `Prompt` of each vote prompt
    vote_rollout: object          # `Rollout`: group_size rows per vote prompt
    vote_owner: list              # (game, voter) of each vote prompt (voter None: observer)
    votes: list                   # per vote prompt, its parsed samples (seat, rules.NA or None)
    clue_texts: list              # each clue row's decoded completion, for the game files


def play(run, policy, processor, tokens, games, images, step):
    """Play `games` (images[i]: game i's (original, edited) images): clue turns in seat order
    over the rounds, each turn of every game sampled together; then the votes."""
    settings = run.cfg.spy
    with gathered(policy):
        turns, clue_prompts, clue_parts, clue_owner, clue_texts = play_clues(
            run, policy, processor, tokens, games, images, ("spy", step))
        vote_owner, vote_prompts, vote_rollout, votes = play_votes(
            run, policy, processor, tokens, games, images, turns,
            group_size=settings.group_size, generator=run.generator("spy", step, "vote"))
    batches = [list(range(j * len(games), (j + 1) * len(games))) for j in range(len(clue_parts))]
    clue_rollout = concat_rollouts(clue_parts, tokens.pad_id, batches)
    return Played(games, turns, clue_prompts, clue_rollout, clue_owner, vote_prompts,
                  vote_rollout, vote_owner, votes, clue_texts)


def play_clues(run, policy, processor, tokens, games, images, stream):
    """Every clue turn of `games`, sampled (turn k of every game together; the generator of
    round r, seat k: run.generator(*stream, "clue", r, k)). Returns (turns per game, the clue
    prompts, one `Rollout` per turn, (game, player) per clue row, each row's text)."""
    settings = run.cfg.spy
    sampling = Sampling(settings.temperature, settings.top_p, settings.top_k,
                        settings.max_new_tokens)
    limits = run.limits(settings.rollout_batch_size)

    def seen(game, i, player):  # the image `player` of game i holds
        original, edited = images[i]
        if player != game.spy:
            return original
        return edited if settings.spy_image == "edited" else Image.new("RGB", edited.size,
                                                                       (255, 255, 255))

    turns = [[] for _ in games]
    clue_prompts, clue_parts, clue_owner, clue_texts = [], [], [], []
    for r in range(1, settings.rounds + 1):
        for k in range(1, games[0].players + 1):
            prompts = [encode_prompt(processor, seen(g, i, k), rules.clue_prompt_text(
                g, k, r, turns[i], style=settings.prompts, difference=settings.difference))
                for i, g in enumerate(games)]
            part = rollout(policy, prompts, group_size=1, sampling=sampling, tokens=tokens,
                           limits=limits, generator=run.generator(*stream, "clue", r, k))
            for i, text in enumerate(decode(processor, part.completion_ids,
                                            part.completion_mask)):
                reasoning, clue = rules.parse_clue(text)
                turns[i].append(rules.Turn(k, r, reasoning, clue))
                clue_owner.append((i, k))
                clue_texts.append(text)
            clue_prompts += prompts
            clue_parts.append(part)
    return turns, clue_prompts, clue_parts, clue_owner, clue_texts


def play_votes(run, policy, processor, tokens, games, images, turns, *, group_size,
               generator=None):
    """Every vote of `games` after `turns`: group_size samples per civilian (or per observer
    prompt, spy.voters observer); generator None: one greedy vote each. Returns ((game, voter)
    per vote prompt, the prompts, their `Rollout`, the parsed samples per prompt)."""
    settings = run.cfg.spy
    sampling = Sampling(settings.temperature, settings.top_p, settings.top_k,
                        settings.vote_max_new_tokens)
    if generator is None:
        sampling = Sampling(0.0, 1.0, 0, settings.vote_max_new_tokens)
    vote_owner = [(i, voter) for i, g in enumerate(games)
                  for voter in (g.civilians() if settings.voters == "civilians" else [None])]
    vote_prompts = [encode_prompt(processor, images[i][0], rules.vote_prompt_text(
        games[i], voter, turns[i], style=settings.prompts, difference=settings.difference))
        for i, voter in vote_owner]
    vote_rollout = rollout(policy, vote_prompts, group_size=group_size, sampling=sampling,
                           tokens=tokens, limits=run.limits(settings.rollout_batch_size),
                           generator=generator)
    texts = decode(processor, vote_rollout.completion_ids, vote_rollout.completion_mask)
    size = group_size
    votes = [[rules.parse_vote(t, games[i].players) for t in texts[j * size:(j + 1) * size]]
             for j, (i, _) in enumerate(vote_owner)]
    return vote_owner, vote_prompts, vote_rollout, votes


def readable_games(games, pairs, min_pixels, max_pixels, warned=None):
    """(games, their (original, edited) images, how many were skipped): a game whose pair cannot
    be read is skipped, logged and counted, never fatal. A pair whose two images differ in size
    is played (each image is resized on its own) with a warning, once per pair when `warned` (a
    set of pair indices) is given."""
    kept, images = [], []
    for game in games:
        try:
            pair = tuple(load_image(p, min_pixels, max_pixels) for p in pairs[game.pair])
        except ValueError as error:
            log.warning("[spy] skipping the game on pair %d: %s", game.pair, error)
            continue
        if pair[0].size != pair[1].size and game.pair not in (warned or set()):
            log.warning("[spy] pair %d: its images differ in size (%dx%d and %dx%d after "
                        "resizing): the spy's picture differs in more than its edit",
                        game.pair, *pair[0].size, *pair[1].size)
            if warned is not None:
                warned.add(game.pair)
        images.append(pair)
        kept.append(game)
    return kept, images, len(games) - len(kept)
