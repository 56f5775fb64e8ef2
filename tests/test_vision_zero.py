"""Vision-Zero's run path: who sees what in a played game, the phase mask, exact resume."""

import json
import os
import random
from types import SimpleNamespace

import pytest
import torch

import checkpoint
from config import load_config
from data import read_pairs
from grpo import Learner, make_optimizer, train_step
from models.inputs import special_tokens
from models.load import load_vlm
from sampler import Limits, Rollout
from test_distributed import run_cli, sigkill_when_written
from toyworld import base as toy_base
from toyworld import world as toy_world
from vision_zero import play as playing
from vision_zero import rules as spy
from vision_zero import train as game
from vision_zero import warmup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rng = random.Random(0)
    scenes = [toy_world.random_scene(rng, rows=4, cols=4, min_things=3, max_things=6)
              for _ in range(6)]
    return toy_world.write_toy_pairs(str(tmp_path_factory.mktemp("pairs")), scenes, seed=1)


def _fake_run(overrides):
    cfg = load_config(os.path.join(ROOT, "configs", "vision-zero.yaml"), overrides)
    return SimpleNamespace(cfg=cfg, limits=lambda n: Limits(n),
                           generator=lambda *parts: torch.Generator().manual_seed(0))


def test_who_sees_what_in_a_played_game(pairs_file, monkeypatch):
    """Scripted players (the sampler replaced): the spy's clue prompts hold image B, everyone
    else's and every vote's image A; a speaker sees every earlier clue, of this round and the
    last, and its own earlier reasoning, never another player's; votes see no reasoning; only
    civilians vote, group_size samples each."""
    run = _fake_run(["spy.civilians=3", "spy.rounds=2", "spy.group_size=2", "spy.prompts=paper"])
    prompts, texts = [], {}

    def encode(processor, image, text):
        prompts.append(SimpleNamespace(image=image, text=text))
        return prompts[-1]

    def fake_rollout(model, batch, *, group_size, generator, **_):
        call = len(texts)
        texts[call] = batch
        rows = len(batch) * group_size
        return Rollout(torch.arange(len(batch)).repeat_interleave(group_size),
                       torch.full((rows, 1), call), torch.ones(rows, 1), torch.zeros(rows, 1))

    def fake_decode(processor, ids, mask):
        call = int(ids[0, 0])
        if call < 8:  # clue turns: round r, seat k, in order
            r, k = divmod(call, 4)
            return [f"secret-{i}-{k + 1}-{r + 1} \\boxed{{clue-{i}-{k + 1}-{r + 1}}}"
                    for i in range(len(texts[call]))]
        return [f"\\boxed{{{1 + j % 4}}}" for j in range(ids.shape[0])]

    monkeypatch.setattr(playing, "encode_prompt", encode)
    monkeypatch.setattr(playing, "rollout", fake_rollout)
    monkeypatch.setattr(playing, "decode", fake_decode)
    from data import load_image

    pairs = read_pairs(pairs_file)
    images = [tuple(load_image(p, 784, 12544) for p in pairs[i]) for i in (0, 1)]
    games = [spy.Game(0, 2, 4), spy.Game(1, 4, 4)]
    played = playing.play(run, torch.nn.Linear(1, 1), None, SimpleNamespace(pad_id=0),
                       games, images, step=0)

    clue_prompts = prompts[:16]  # 2 rounds x 4 seats x 2 games, turn by turn
    for n, prompt in enumerate(clue_prompts):
        (r, k), i = divmod(n // 2, 4), n % 2
        r, k = r + 1, k + 1
        expected = images[i][1] if k == games[i].spy else images[i][0]
        assert prompt.image.tobytes() == expected.tobytes(), (r, k, i)
        for rr in (1, 2):
            for kk in range(1, 5):
                spoken = (rr, kk) < (r, k)
                assert (f"clue-{i}-{kk}-{rr}" in prompt.text) == spoken, (r, k, i, rr, kk)
                own = kk == k and spoken
                assert (f"secret-{i}-{kk}-{rr}" in prompt.text) == own, (r, k, i, rr, kk)
        assert f"clue-{1 - i}-" not in prompt.text  # nothing from another game
    votes = prompts[16:]
    assert [v for (_, v) in played.vote_owner] == [1, 3, 4, 1, 2, 3]
    for (i, voter), prompt in zip(played.vote_owner, votes):
        assert prompt.image.tobytes() == images[i][0].tobytes()
        assert "secret" not in prompt.text
        assert all(f"clue-{i}-{k}-{r}" in prompt.text for k in range(1, 5) for r in (1, 2))
        assert f"PLAYER {voter} " in prompt.text
    assert played.clue_rollout.completion_ids.shape[0] == 16
    assert played.vote_rollout.completion_ids.shape[0] == 6 * 2
    assert [t.clue for t in played.turns[1]][:2] == ["clue-1-1-1", "clue-1-2-1"]
    assert played.votes == [[1, 2], [3, 4]] * 3  # the scripted boxes, 2 samples per voter


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_only_the_active_stage_gets_gradients(format_model_dir, pairs_file):
    """One real game step on the tiny model; then the update of each stage with the other
    stage's advantages changed arbitrarily: the weights come out bitwise the same. With the
    released code's mask (phase_mask False) a clue step's weights do depend on the votes."""
    run = _fake_run(["spy.civilians=2", "spy.rounds=1", "spy.group_size=2",
                     "spy.max_new_tokens=6", "spy.vote_max_new_tokens=6", "spy.lr=1e-2",
                     "spy.micro_batch_size=4", "spy.kl_coef=0"])
    settings = run.cfg.spy
    model, processor = load_vlm(format_model_dir)
    tokens = special_tokens(processor, model)
    from data import load_image

    pairs = read_pairs(pairs_file)
    images = [tuple(load_image(p, 784, 12544) for p in pairs[i]) for i in (0, 1)]
    played = playing.play(run, model, processor, tokens, [spy.Game(0, 1, 3),
                                                       spy.Game(1, 3, 3)], images, step=0)
    clue, vote, stats = game.score(played, spy.RoleBaselines(0.95), settings)
    assert len(clue[1]) == 2 * 3 and len(vote[1]) == 2 * 2 * 2
    assert 0 <= stats["vote_acc"] <= 1 and stats["games"] == 2

    def update(phase, clue, vote, phase_mask=True):
        policy, _ = load_vlm(format_model_dir)
        batch = game.training_batch(played, phase, clue, vote, phase_mask=phase_mask,
                                    pad_id=tokens.pad_id)
        train_step(Learner(policy, make_optimizer(policy, settings), None, tokens), batch,
                   settings)
        return _params(policy)

    def other(pair):  # the same rows with other advantages (all nonzero)
        return pair[0], torch.linspace(-2.0, 3.0, len(pair[1]))

    clue = (clue[0], torch.linspace(1.0, -1.0, len(clue[1])))  # nonzero: the clues do train
    before = _params(load_vlm(format_model_dir)[0])
    for phase, base, changed in ((spy.CLUE, update(spy.CLUE, clue, vote),
                                  update(spy.CLUE, clue, other(vote))),
                                 (spy.DECISION, update(spy.DECISION, clue, other(vote)),
                                  update(spy.DECISION, other(clue), other(vote)))):
        assert any(not torch.equal(a, b) for a, b in zip(base, before)), phase  # it trained
        assert all(torch.equal(a, b) for a, b in zip(base, changed)), phase
    leaky = update(spy.CLUE, clue, vote, phase_mask=False)
    leaky_changed = update(spy.CLUE, clue, other(vote), phase_mask=False)
    assert any(not torch.equal(a, b) for a, b in zip(leaky, leaky_changed))


def _overrides(run_dir, model_dir, pairs, benchmark_file):
    return [f"run_dir={run_dir}", f"model.path={model_dir}", f"spy.pairs={pairs}",
            f"eval.benchmarks={{tiny: {benchmark_file}}}", "eval.max_new_tokens=8",
            "eval.samples=0", "save_every=1", "spy.steps=5", "spy.prompts_per_step=2",
            "spy.civilians=2", "spy.group_size=2", "spy.max_new_tokens=6",
            "spy.vote_max_new_tokens=6", "spy.micro_batch_size=8", "spy.lr=1e-3",
            "spy.k_min=1", "spy.patience=2", "spy.ema_rho=0.5", "spy.heldout_games=3",
            f"spy.heldout_pairs={pairs}"]


def _run_cli(overrides):
    return run_cli(overrides, config=os.path.join("configs", "vision-zero.yaml"))


def test_sigkill_mid_game_then_resume_equals_uninterrupted_run(format_model_dir, pairs_file,
                                                               benchmark_file, tmp_path):
    """SIGKILL the game's training once its step-3 checkpoint exists (the stage switch has
    moved: patience 2); the rerun resumes from it with the switch and the role baselines, and
    ends with bitwise the weights, games and metrics of an uninterrupted run."""
    from safetensors.torch import load_file

    clean, killed = str(tmp_path / "clean"), str(tmp_path / "killed")
    done = _run_cli(_overrides(clean, format_model_dir, pairs_file, benchmark_file))
    process = _run_cli(_overrides(killed, format_model_dir, pairs_file, benchmark_file))
    sigkill_when_written(process, os.path.join(killed, "checkpoints", "spy_v1", "step_000003"))
    assert not os.path.exists(os.path.join(killed, "spy_v1"))
    _, newest = checkpoint.latest(os.path.join(killed, "checkpoints", "spy_v1"))
    with open(os.path.join(newest, "meta.json")) as f:
        extra = json.load(f)["extra"]  # the game's state travels with the weights
    assert set(extra) == {"baselines", "switch"} and extra["switch"]["dwell"] >= 0
    assert done.wait() == 0, done.stderr.read().decode()[-2000:]
    resumed = _run_cli(_overrides(killed, format_model_dir, pairs_file, benchmark_file))
    assert resumed.wait() == 0, resumed.stderr.read().decode()[-2000:]
    assert "[spy] resumed from" in resumed.stderr.read().decode()
    a, b = (load_file(os.path.join(d, "spy_v1", "model.safetensors")) for d in (clean, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for step in range(5):
        name = os.path.join("games", f"step_{step:05d}.jsonl")
        assert open(os.path.join(clean, name)).read() == open(os.path.join(killed, name)).read()

    def phases(folder):
        from data import read_jsonl

        return [(r["step"], r["phase"], r["baseline_spy"]) for r in
                read_jsonl(os.path.join(folder, "metrics.jsonl"))]
    assert phases(clean) == phases(killed)
    assert {p for _, p, _ in phases(clean)} == {"decision", "clue"}
    for name in ("heldout_clues.jsonl", "heldout_v0.json", "heldout_v1.json"):
        assert open(os.path.join(clean, name)).read() == open(os.path.join(killed, name)).read()
    assert not os.path.exists(os.path.join(killed, "checkpoints", "spy_v1"))


def test_an_unreadable_pair_is_skipped_and_counted(pairs_file, tmp_path):
    pairs = read_pairs(pairs_file)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    pairs[1] = (pairs[1][0], str(broken))
    games = [spy.Game(0, 1, 3), spy.Game(1, 2, 3), spy.Game(2, 3, 3)]
    kept, images, skipped = playing.readable_games(games, pairs, 784, 12544)
    assert kept == [games[0], games[2]] and skipped == 1 and len(images) == 2


def test_bad_pairs_are_refused_before_any_work(tiny_model_dir, benchmark_file, tmp_path,
                                               pairs_file):
    from config import ConfigError
    from run import check_sources

    base = ["method=vision-zero", f"model.path={tiny_model_dir}",
            f"eval.benchmarks={{tiny: {benchmark_file}}}"]
    with pytest.raises(ConfigError, match="^spy.pairs: a game on model.path needs"):
        check_sources(load_config(None, base))
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"original": "a.png", "edited": "b.png"}\n{"original": 3}\n')
    with pytest.raises(ConfigError, match=r"^spy.pairs: .*pairs.jsonl:2: expected string"):
        check_sources(load_config(None, base + [f"spy.pairs={bad}"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigError, match="^spy.pairs: .*lists no pairs"):
        check_sources(load_config(None, base + [f"spy.pairs={empty}"]))
    held = base + [f"spy.pairs={pairs_file}", "spy.heldout_games=8"]
    with pytest.raises(ConfigError, match="^spy.heldout_pairs: held-out games on model.path"):
        check_sources(load_config(None, held))
    with pytest.raises(ConfigError, match="^spy.heldout_pairs: .*lists no pairs"):
        check_sources(load_config(None, held + [f"spy.heldout_pairs={empty}"]))
    check_sources(load_config(None, held + [f"spy.heldout_pairs={pairs_file}"]))


def test_the_shipped_game_base_is_the_default_games_and_verifies(tmp_path):
    """configs/vision-zero.yaml's game (seed 0) on the shipped toy base is the one
    embedded_game_base/ was warmed up for, so the embedded run copies it (checksums verified)
    instead of a 23-minute warm-up; another toy base's weights would not match."""
    cfg = load_config(os.path.join(ROOT, "configs", "vision-zero.yaml"))
    with open(os.path.join(warmup.SHIPPED_GAME_BASE, "warmup.json")) as f:
        recorded = json.load(f)
    assert recorded == warmup.warmup_settings(cfg, toy_base.SHIPPED_BASE)
    listed = toy_base.read_checksums(toy_base.SHIPPED_BASE)
    assert recorded["source_weights"] == listed["model.safetensors"]
    other = tmp_path / "other_base"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"other weights")
    assert warmup.warmup_settings(cfg, str(other)) != recorded
    toy_base.copy_verified(warmup.SHIPPED_GAME_BASE, str(tmp_path / "copy"))
    assert os.path.isfile(tmp_path / "copy" / "model.safetensors")


def _two_games():
    """Two played games as `score` reads them (no model): 3 players, 1 round, 2 votes each."""
    games = [spy.Game(0, 2, 3), spy.Game(1, 3, 3)]
    votes = [[[2, 2], [2, spy.NA]], [[1, 3], [None, 1]]]  # game 0: voters 1, 3; game 1: 1, 2
    return [SimpleNamespace(games=[g], turns=[[spy.Turn(k, 1, "", "x") for k in (1, 2, 3)]],
                            clue_owner=[(0, k) for k in (1, 2, 3)],
                            vote_owner=[(0, v) for v in g.civilians()], votes=votes[i])
            for i, g in enumerate(games)]


def _score_worker(folder):
    import distributed

    cfg = load_config(os.path.join(ROOT, "configs", "vision-zero.yaml"), ["spy.group_size=2"])
    baselines = spy.RoleBaselines(0.95)
    clue, vote, stats = game.score(_two_games()[distributed.rank()], baselines, cfg.spy)
    torch.save({"clue": clue, "vote": vote, "stats": stats, "baselines": baselines.state_dict()},
               os.path.join(folder, f"score{distributed.rank()}.pt"))


def test_scoring_over_two_processes_equals_one(tmp_path):
    """Each of 2 gloo ranks scores one game: the role baselines and the step's statistics are
    those of one process scoring both games; each rank's advantages are its games' rows."""
    from test_distributed import spawn_two

    spawn_two(_score_worker, str(tmp_path))
    cfg = load_config(os.path.join(ROOT, "configs", "vision-zero.yaml"), ["spy.group_size=2"])
    a, b = _two_games()
    both = SimpleNamespace(games=a.games + b.games, turns=a.turns + b.turns,
                           clue_owner=a.clue_owner + [(1, k) for _, k in b.clue_owner],
                           vote_owner=a.vote_owner + [(1, v) for _, v in b.vote_owner],
                           votes=a.votes + b.votes)
    baselines = spy.RoleBaselines(0.95)
    clue, vote, stats = game.score(both, baselines, cfg.spy)
    ranks = [torch.load(tmp_path / f"score{r}.pt", weights_only=False) for r in (0, 1)]
    for r in ranks:
        assert r["baselines"] == pytest.approx(baselines.state_dict())
        assert r["stats"] == pytest.approx(stats)
    assert torch.allclose(torch.cat([r["clue"][1] for r in ranks]), clue[1])
    assert torch.allclose(torch.cat([r["vote"][1] for r in ranks]), vote[1])
    # by hand: game 0 spy 2 gets 1 + 0.5 votes, civilians 0; game 1 spy 3 gets 0.5, civilian 1 gets
    # 0.5 + 0.5 (one invalid sample counts for nobody)
    assert stats["vote_acc"] == pytest.approx(4 / 8) and stats["na_rate"] == pytest.approx(1 / 8)
    assert stats["clue_reward_spy"] == pytest.approx((-0.1 * 1.5 - 0.1 * (0.5 - 0.5)) / 2)
