"""Vision-Zero's held-out games: a fixed set of games on image pairs the training never sees,
played by the model before and after training, so that the game's own skill is measured apart
from the games it trained on (spy.heldout_games; docs/vision_zero.md, "Held-out games").

- The pairs: spy.heldout_pairs (a manifest), or for the embedded default fresh toy scenes drawn
  from their own seed (`toy_heldout_pairs`), apart from the pool's, the benchmark's and the
  warm-up's.
- The games: spy.heldout_games of them, the pairs in order (cycled), each spy's seat drawn from
  the config's seed (`heldout_games`).
- Frozen clues: the starting model plays every clue turn once, sampled as in training from its
  own stream; the transcripts go to RUN/heldout_clues.jsonl (`freeze_clues`).
- Each model (the start, spy_v1) then votes greedily, every civilian once, on the frozen clues,
  and on its own clues (sampled from one stream, the same for both models) (`measure`).

A vote is right when it names the spy; the scores are the share of civilian votes that are
right, "n/a" and invalid, in each setting (`rules.vote_tally`, summed over the ranks).
"""

import json
import logging
import os
import random

import distributed
from data import atomic_path, read_jsonl, read_pairs, write_json, write_jsonl
from distributed import gathered, my_part
from models.inputs import special_tokens
from run import seed_for
from toyworld.world import WorldConfig, scenes, write_toy_pairs
from vision_zero import rules
from vision_zero.play import play_clues, play_votes, readable_games

log = logging.getLogger("visplay")

HELDOUT_SCENE_SEED = 40  # seed + 40: the held-out scenes' stream (pool seed + 1, benchmark + 2)


def toy_heldout_pairs(run):
    """The embedded default's held-out pairs: spy.heldout_games fresh scenes like the pool's (the
    same sizes), each with its twin, written once under RUN/embedded/heldout_pairs. Returns the
    manifest."""
    folder = run.path("embedded", "heldout_pairs")
    if distributed.is_main() and not os.path.isdir(folder):
        world = WorldConfig()
        scene_list = scenes(run.cfg.seed + HELDOUT_SCENE_SEED, run.cfg.spy.heldout_games,
                            rows=world.rows, cols=world.cols, things=world.shifted_things)
        with atomic_path(folder) as tmp:
            write_toy_pairs(tmp, scene_list, seed_for(run.cfg.seed, "heldout-twins"))
    distributed.barrier()
    return os.path.join(folder, "pairs.jsonl")


def heldout_games(seed, pair_count, games, players):
    """The held-out games: pairs 0, 1, ... (cycled) and each spy's seat drawn from `seed`."""
    return rules.deal(random.Random(seed_for(seed, "heldout-seats")),
                      [i % pair_count for i in range(games)], players)


def _shares(counts):
    n, right, na, invalid = counts
    if not n:
        raise ValueError("no held-out game could be played: every pair was unreadable")
    return {"votes": int(n), "vote_acc": right / n, "na_rate": na / n, "invalid_rate": invalid / n}


def _my_games(run, pairs):
    """This rank's held-out games, their indices in the whole set, their images and how many
    were skipped (an unreadable pair: logged and counted, as in training)."""
    settings = run.cfg.spy
    mine = my_part(list(enumerate(heldout_games(run.cfg.seed, len(pairs), settings.heldout_games,
                                                settings.civilians + 1))))
    index = {id(game): n for n, game in mine}
    games, images, skipped = readable_games([game for _, game in mine], pairs,
                                            run.cfg.model.min_pixels, run.cfg.model.max_pixels)
    return games, [index[id(game)] for game in games], images, skipped


def freeze_clues(run, model_path, pairs, out_path):
    """The starting model's clues on every held-out game -> out_path (one row per game: its
    index, pair, spy and clues as [player, round, clue])."""
    model, processor = run.load_model(model_path, trainable=False)
    games, indices, images, _ = _my_games(run, pairs)
    with gathered(model):
        turns = play_clues(run, model, processor, special_tokens(processor, model), games,
                           images, ("heldout",))[0] if games else []
    rows = [{"game": n, "pair": g.pair, "spy": g.spy,
             "clues": [[t.player, t.round, t.clue] for t in game_turns]}
            for n, g, game_turns in zip(indices, games, turns)]
    everyone = distributed.all_gather_list(rows)
    if distributed.is_main():
        write_jsonl(out_path, sorted(everyone, key=lambda row: row["game"]))
    distributed.barrier()


def measure(run, model_path, pairs, clues_path, out_path):
    """Greedy votes of the model at model_path on the frozen clues and after its own clues ->
    out_path ({"games", "skipped_pairs", "frozen_clues": scores, "own_clues": scores})."""
    frozen = {row["game"]: row["clues"] for row in read_jsonl(clues_path)}
    model, processor = run.load_model(model_path, trainable=False)
    tokens = special_tokens(processor, model)
    games, indices, images, skipped = _my_games(run, pairs)
    counts = {}
    with gathered(model):
        frozen_turns = [[rules.Turn(player, r, "", clue) for player, r, clue in frozen[n]]
                        for n in indices]
        own_turns = play_clues(run, model, processor, tokens, games, images,
                               ("heldout-own",))[0] if games else []
        for name, turns in (("frozen_clues", frozen_turns), ("own_clues", own_turns)):
            owner, _, _, votes = play_votes(run, model, processor, tokens, games, images, turns,
                                            group_size=1) if games else ([], [], [], [])
            counts[name] = rules.vote_tally(games, owner, votes)
    played, skipped = distributed.all_reduce_sum([len(games), skipped])
    result = {"games": int(played), "skipped_pairs": int(skipped)}
    for name, values in counts.items():
        result[name] = _shares(distributed.all_reduce_sum(values))
    if distributed.is_main():
        write_json(out_path, result)
        log.info("[held-out games] %s: vote accuracy %.3f on the frozen clues, %.3f on its own "
                 "(%d games)", model_path, result["frozen_clues"]["vote_acc"],
                 result["own_clues"]["vote_acc"], result["games"])
    distributed.barrier()
    return result


def heldout_line(before_path, after_path):
    """The run's printed line: vote accuracy before -> after (the scores `measure` wrote), on the
    frozen clues and on the model's own."""
    with open(before_path) as f, open(after_path) as g:
        before, after = json.load(f), json.load(g)

    def pct(scores, name):
        return 100 * scores[name]["vote_acc"]

    return (f"held-out games ({before['games']}): vote accuracy {pct(before, 'frozen_clues'):.1f} "
            f"-> {pct(after, 'frozen_clues'):.1f} on the start's frozen clues, "
            f"{pct(before, 'own_clues'):.1f} -> {pct(after, 'own_clues'):.1f} on the model's own")


def read_heldout_pairs(run):
    """The held-out pairs of a run: spy.heldout_pairs, or the embedded default's toy ones."""
    settings = run.cfg.spy
    return read_pairs(settings.heldout_pairs if settings.heldout_pairs
                      else toy_heldout_pairs(run))
