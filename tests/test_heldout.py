"""vision_zero/heldout.py: the held-out games are fixed by the seed and apart from the pool, and
their scores count votes as worked out by hand."""

import json
import random

from run import seed_for
from toyworld.world import WorldConfig, pool_scenes, scenes
from vision_zero import heldout
from vision_zero import rules
from vision_zero.rules import NA, Game


def test_heldout_games_cycle_the_pairs_and_draw_seats_from_the_seed():
    games = heldout.heldout_games(3, pair_count=2, games=5, players=4)
    assert [g.pair for g in games] == [0, 1, 0, 1, 0]
    rng = random.Random(seed_for(3, "heldout-seats"))  # the same stream, drawn by hand
    assert [g.spy for g in games] == [rng.randint(1, 4) for _ in range(5)]
    assert games == heldout.heldout_games(3, 2, 5, 4)
    assert [g.spy for g in heldout.heldout_games(4, 2, 40, 4)] != \
        [g.spy for g in heldout.heldout_games(3, 2, 40, 4)]


def test_vote_tally_by_hand():
    games = [Game(0, 2, 3), Game(1, 3, 3)]
    # game 0 (spy 2): voter 1 votes 2 (right), voter 3 votes n/a; game 1 (spy 3): voter 1 votes
    # 2 (wrong), voter 2 votes None (invalid), 3 (right) in a second sample
    owner = [(0, 1), (0, 3), (1, 1), (1, 2)]
    votes = [[2], [NA], [2], [None, 3]]
    assert rules.vote_tally(games, owner, votes) == [5, 2, 1, 1]
    assert heldout._shares([5, 2, 1, 1]) == {"votes": 5, "vote_acc": 0.4, "na_rate": 0.2,
                                             "invalid_rate": 0.2}


def test_the_printed_line(tmp_path):
    for name, frozen, own in (("v0", 0.25, 0.5), ("v1", 0.375, 0.625)):
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "games": 512, "frozen_clues": {"vote_acc": frozen}, "own_clues": {"vote_acc": own}}))
    assert heldout.heldout_line(tmp_path / "v0.json", tmp_path / "v1.json") == (
        "held-out games (512): vote accuracy 25.0 -> 37.5 on the start's frozen clues, "
        "50.0 -> 62.5 on the model's own")


def test_heldout_scenes_are_not_pool_scenes():
    def key(scene):
        return tuple(sorted((t.row, t.col, t.shape, t.color) for t in scene.things))

    world = WorldConfig()
    held = [key(scene) for scene in scenes(0 + heldout.HELDOUT_SCENE_SEED, 512, rows=world.rows,
                                           cols=world.cols, things=world.shifted_things)]
    pool = {key(scene) for scene in pool_scenes(world, 0)}
    assert len(held) == 512 and not pool & set(held)
    assert {len(k) for k in held} == set(range(world.shifted_things[0],
                                               world.shifted_things[1] + 1))
