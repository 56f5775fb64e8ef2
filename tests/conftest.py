"""Shared fixtures: a tiny random Qwen2.5-VL on disk, synthetic images, a small labeled benchmark.

Everything is built offline in a temporary folder once per test session, in fp32 on CPU.
"""

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from data import write_jsonl  # noqa: E402
from models.tiny import build_tiny_vlm  # noqa: E402
from roles import QUESTIONER_INSTRUCTION, reasoner_text  # noqa: E402
from toyworld.world import LANGUAGES, make_question, questioner_target, random_scene  # noqa: E402


def tiny_corpus():
    """Texts of the toy world's language for the tiny tokenizer."""
    texts = [QUESTIONER_INSTRUCTION] * 20
    for seed in range(200):
        rng = random.Random(seed)
        q = make_question(LANGUAGES["basic"][seed % 4],
                          random_scene(rng, rows=4, cols=4, min_things=2, max_things=6), rng)
        texts += [reasoner_text(q.question), q.solution, questioner_target(q)]
    return texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised tiny Qwen2.5-VL (+ tokenizer, processor) saved with
    save_pretrained."""
    path = str(tmp_path_factory.mktemp("tiny") / "model")
    build_tiny_vlm(path, tiny_corpus(), seed=0, vocab_size=400, min_pixels=28 * 28,
                   max_pixels=28 * 28 * 16)
    return path


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """Twelve synthetic scene images of mixed sizes in a nested folder."""
    root = tmp_path_factory.mktemp("images")
    os.makedirs(root / "sub", exist_ok=True)
    rng = random.Random(0)
    for i in range(12):
        rows, cols = rng.choice([(2, 2), (3, 4), (4, 4)])
        scene = random_scene(rng, rows=rows, cols=cols, min_things=1, max_things=rows * cols // 2)
        scene.render().save(root / ("sub" if i % 2 else "") / f"{i:02d}.png")
    return str(root)


@pytest.fixture(scope="session")
def benchmark_file(tmp_path_factory):
    """A 16-item labeled benchmark JSONL in the project's schema, images next to it."""
    root = tmp_path_factory.mktemp("bench")
    rng = random.Random(1)
    rows = []
    for i in range(16):
        scene = random_scene(rng, rows=4, cols=4, min_things=2, max_things=6)
        q = make_question(LANGUAGES["basic"][i % 4], scene, rng)
        scene.render().save(root / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "question": q.question, "answer": q.answer,
                     "choices": q.choices, "category": q.family})
    path = str(root / "bench.jsonl")
    write_jsonl(path, rows)
    return path


@pytest.fixture(scope="session")
def format_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model after a short supervised run on both roles' formats (so it writes parsable
    questions and boxed answers often enough for every stage of the loop to have data)."""
    from models.load import load_vlm, save_vlm
    from toyworld.base import BaseConfig, pretrain
    from toyworld.world import WorldConfig

    model, processor = load_vlm(tiny_model_dir)
    pretrain(model, processor, world=WorldConfig(pretrain_decay=0.5),
             base=BaseConfig(steps=150, batch_size=8, lr=5e-3, freeze_vision=True,
                             questioner_share=0.5, lazy_share=0.0), seed=0)
    path = str(tmp_path_factory.mktemp("format") / "model")
    save_vlm(model, processor, path)
    return path
