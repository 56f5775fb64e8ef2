"""The rewards of the real stages push the right way: a few questioner GRPO steps (the stage's own
reward: uncertainty of the frozen reasoner - diversity penalty, -1 when unparsable) raise the
questioner's reward, and a few reasoner steps raise its agreement with the silver labels. The same
runs with the advantage's sign flipped move the other way, so a broken reward sign or advantage
cannot pass."""

import os

import pytest
import torch

import grpo
import visplay
from config import load_config
from data import load_image, read_jsonl, write_jsonl
from models.inputs import special_tokens
from models.load import load_vlm
from rewards import reasoner_reward
from roles import reasoner_prompt
from run import Run
from sampler import Limits, Sampling, decode, rollout
from test_loop import tiny_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["questioner.prompts_per_step=4", "questioner.group_size=6", "questioner.updates_per_step=1",
        "questioner.micro_batch_size=24", "questioner.answer_samples=4", "questioner.kl_coef=0",
        "reasoner.prompts_per_step=4", "reasoner.group_size=6", "reasoner.updates_per_step=1",
        "reasoner.micro_batch_size=24", "reasoner.kl_coef=0", "save_every=0"]


def make_run(tmp_path, name, model_dir, image_dir, benchmark_file, extra):
    overrides = tiny_overrides(str(tmp_path / name), model_dir, image_dir,
                               benchmark_file) + FAST + extra
    return Run(load_config(os.path.join(ROOT, "config.yaml"), overrides))


def rewards(run, stage):
    return [m["reward_mean"] for m in read_jsonl(run.metrics_path) if m["stage"] == stage]


def flipped(monkeypatch):
    original = grpo.group_advantages
    monkeypatch.setattr(grpo, "group_advantages", lambda *a, **k: -original(*a, **k))


@pytest.mark.parametrize("sign", [1, -1])
def test_questioner_reward_moves_with_the_advantage(tmp_path, monkeypatch, format_model_dir,
                                                    image_dir, benchmark_file, sign):
    if sign < 0:
        flipped(monkeypatch)
    run = make_run(tmp_path, "q", format_model_dir, image_dir, benchmark_file,
                   ["questioner.steps=10", "questioner.lr=2e-3"])
    visplay.train_questioner(run, 1, questioner_path=format_model_dir,
                             reasoner_path=format_model_dir, out_path=run.path("questioner_v1"))
    r = rewards(run, "questioner")
    # the last three steps' mean vs the first step (before any update)
    change = sum(r[-3:]) / 3 - r[0]
    assert change > 0.2 if sign > 0 else change < -0.1, r


def agreement(model_dir, kept, samples=48):
    """Mean reasoner reward (0.9 * matches silver + 0.1 * boxed) of `samples` sampled answers per
    question."""
    model, processor = load_vlm(model_dir)
    prompts = [reasoner_prompt(processor, load_image(r["image"], 784, 12544), r["question"])
               for r in kept]
    tokens = special_tokens(processor, model)
    result = rollout(model, prompts, group_size=samples, sampling=Sampling(1.0, 1.0, 0, 12),
                     tokens=tokens, limits=Limits(8), generator=torch.Generator().manual_seed(1))
    texts = decode(processor, result.completion_ids, result.completion_mask)
    return sum(reasoner_reward(t, kept[p]["silver_answer"], None, accuracy_weight=0.9,
                               format_weight=0.1)
               for t, p in zip(texts, result.prompt_index.tolist())) / len(texts)


@pytest.mark.parametrize("sign", [1, -1])
def test_reasoner_agreement_moves_with_the_advantage(tmp_path, monkeypatch, format_model_dir,
                                                     image_dir, benchmark_file, sign):
    if sign < 0:
        flipped(monkeypatch)
    # silver labels of 4 questions on pool images: a fixed target the stage's reward
    # measures agreement with
    images = sorted(os.path.join(d, f) for d, _, fs in os.walk(image_dir) for f in fs)[:4]
    kept = [{"image": path, "question": question, "choices": None, "silver_answer": answer,
             "confidence": 0.5}
            for path, (question, answer) in zip(images,
                                                [("How many objects are there?", "3"),
                                                 ("How many red objects are there?", "1"),
                                                 ("How many circles are there?", "2"),
                                                 ("How many blue objects are there?", "1")])]
    run = make_run(tmp_path, "s", format_model_dir, image_dir, benchmark_file,
                   ["reasoner.steps=16", "reasoner.lr=1e-3"])
    write_jsonl(run.path("kept_v1.jsonl"), kept)
    visplay.train_reasoner(run, 1, reasoner_path=format_model_dir,
                           kept_path=run.path("kept_v1.jsonl"), out_path=run.path("reasoner_v1"))
    before, after = agreement(format_model_dir, kept), agreement(run.path("reasoner_v1"), kept)
    assert (after - before) * sign > 0.1, (before, after)
