"""Vision-Zero's embedded default: toy image pairs, and the toy base taught the game's format.

The toy base (`toyworld/base.py`) never saw a game, so before the game trains, a supervised
warm-up teaches it the compact prompts' format (`warm_up`: spy.warmup_steps steps of
`warmup_example`, scripted games on base-domain scenes). Seed 0's game base ships in
`embedded_game_base/` with its checksums and its `warmup.json` (the game's settings and the
SHA-256 of the toy base it started from); a run with other settings builds its own.

    python -m vision_zero.warmup --rebuild     # builds embedded_game_base/ again (one thread)
"""

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from functools import partial

import torch

import distributed
from config import load_config
from data import atomic_path
from models.inputs import encode_prompt
from models.load import load_vlm, save_vlm
from run import seed_for
from toyworld.base import (SHIPPED_BASE, SHIPPED_SEED, BaseConfig, copy_verified, encode_target,
                           pretrain, pretraining_example, sha256, write_checksums)
from toyworld.world import WorldConfig, pool_scenes, random_scene, twin, write_toy_pairs
from vision_zero import rules

log = logging.getLogger("visplay")


def toy_pairs(run):
    """The embedded default's image pairs: every pool scene and its twin (`world.twin`), written
    once under RUN/embedded/pairs. Returns the manifest."""
    folder = run.path("embedded", "pairs")
    if distributed.is_main() and not os.path.isdir(folder):
        with atomic_path(folder) as tmp:
            write_toy_pairs(tmp, pool_scenes(WorldConfig(), run.cfg.seed),
                            seed_for(run.cfg.seed, "twins"))
    distributed.barrier()
    return os.path.join(folder, "pairs.jsonl")


def warmup_example(rng, processor, world, base, *, players, rounds, difference):
    """One supervised pair in the game's compact format, on a fresh base-domain scene of 2-5
    things and its twin, with scripted players: each clue names a thing of the speaker's image
    not named before (the spy's may be a changed one); a civilian's vote checks every clue
    against its image as the base answers "Is there a red circle?" ("2 red circle: none", or
    "2 red circle: red circle" when it has one), then votes the first player whose clue its
    image lacks, or n/a. Three examples in ten are the base's own pretraining
    (`base.pretraining_example`), so it keeps answering."""
    if rng.random() < 0.3:
        return pretraining_example(rng, processor, world, base)
    scene = random_scene(rng, rows=world.rows, cols=world.cols, min_things=2, max_things=5)
    edited = twin(scene, rng)
    game = rules.Game(0, rng.randint(1, players), players)
    turns, named = [], set()
    speaker, when = rng.randint(1, players), rng.randint(1, rounds)
    for r in range(1, rounds + 1):
        for k in range(1, players + 1):
            things = (edited if k == game.spy else scene).things
            fresh = [t.name for t in things if t.name not in named] or [t.name for t in things]
            clue = rng.choice(fresh)
            if (r, k) == (when, speaker) and rng.random() < 0.5:
                image = (edited if k == game.spy else scene).render()
                text = rules.clue_prompt_text(game, k, r, turns, style="compact",
                                              difference=difference)
                return (encode_prompt(processor, image, text),
                        encode_target(processor, f"\\boxed{{{clue}}}"))
            named.add(clue)
            turns.append(rules.Turn(k, r, "", clue))
    voter = rng.choice(game.civilians())
    mine = {t.name for t in scene.things}
    odd = [t for t in turns if t.clue not in mine]
    checked = "; ".join(f"{t.player} {t.clue}: {t.clue if t.clue in mine else 'none'}"
                        for t in turns)
    target = f"{checked}. \\boxed{{{odd[0].player if odd else rules.NA}}}"
    text = rules.vote_prompt_text(game, voter, turns, style="compact", difference=difference)
    return encode_prompt(processor, scene.render(), text), encode_target(processor, target)


SHIPPED_GAME_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "embedded_game_base")


def warmup_settings(cfg, source):
    """What a game base depends on: the seed, the game's shape and the toy base it starts from
    (the SHA-256 of `source`'s weights, so a game base is never reused for another toy base)."""
    spy_cfg = cfg.spy
    return {"seed": cfg.seed, "steps": spy_cfg.warmup_steps, "players": spy_cfg.civilians + 1,
            "rounds": spy_cfg.rounds, "difference": spy_cfg.difference,
            "source_weights": sha256(os.path.join(source, "model.safetensors"))}


def build_game_base(source, dest, settings):
    """`source` (the toy base) after settings["steps"] supervised steps of `warmup_example`,
    saved atomically to `dest` with warmup.json (the settings)."""
    started = time.perf_counter()
    model, processor = load_vlm(source)
    torch.manual_seed(seed_for(settings["seed"], "warm-up"))
    # the replayed pretraining examples follow the toy base's own recipe (its lazy lists
    # included): the warm-up teaches the game and leaves the base's other habits as they were
    recipe = replace(BaseConfig(), steps=settings["steps"], lr=1e-3, batch_size=32)
    example = partial(warmup_example, players=settings["players"], rounds=settings["rounds"],
                      difference=settings["difference"])
    pretrain(model, processor, world=WorldConfig(), base=recipe,
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
    if distributed.is_main() and not os.path.isdir(dest):
        shipped = os.path.join(SHIPPED_GAME_BASE, "warmup.json")
        settings, same = warmup_settings(run.cfg, source), False
        if os.path.isfile(shipped):
            with open(shipped) as f:
                same = json.load(f) == settings
        if same:
            copy_verified(SHIPPED_GAME_BASE, dest)
            log.info("game base: the shipped %s (checksums verified)", SHIPPED_GAME_BASE)
        else:
            build_game_base(source, dest, settings)
    distributed.barrier()
    return dest


def main(argv=None):
    """`python -m vision_zero.warmup --rebuild`: build seed 0's game base again into
    embedded_game_base/ with its checksums: the shipped toy base (toyworld/embedded_base/,
    checksums verified) warmed up for configs/vision-zero.yaml's game, with one thread, as the
    shipped game base was."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--rebuild", action="store_true", required=True)
    parser.add_argument("--out", default=SHIPPED_GAME_BASE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "vision-zero.yaml"), [f"seed={SHIPPED_SEED}"])
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    torch.set_num_threads(1)  # sums in the shipped game base's order
    source = args.out.rstrip("/") + ".toy_base"
    copy_verified(SHIPPED_BASE, source)
    build_game_base(source, args.out, warmup_settings(cfg, source))
    shutil.rmtree(source)
    write_checksums(args.out)


if __name__ == "__main__":
    main()
