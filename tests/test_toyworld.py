"""The embedded toy world: scenes and answers, splits, label-blindness of the loop, reward
directions."""

import os
import random
import shutil

import numpy as np
import pytest
import torch

import toyworld
import visplay
from config import load_config
from data import read_jsonl, write_jsonl
from test_loop import tiny_overrides
from toyworld import (COLORS, FAMILIES, Scene, Thing, WorldConfig, make_question, random_scene,
                      render_shapes, true_answer)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scene_of(*things):
    return Scene(4, 4, [Thing(shape, color, row, col) for shape, color, row, col in things])


# A scene worked out by hand:      col 0          col 1          col 2          col 3
#                          row 0   red circle     .              blue square    .
#                          row 1   .              red square     .              .
#                          row 2   green triangle .              .              red circle
#                          row 3   .              .              .              .
HAND = scene_of(("circle", "red", 0, 0), ("square", "blue", 0, 2), ("square", "red", 1, 1),
                ("triangle", "green", 2, 0), ("circle", "red", 2, 3))


@pytest.mark.parametrize("question, answer", [
    ("How many objects are there?", "5"),
    ("How many red objects are there?", "3"),
    ("How many circles are there?", "2"),
    ("How many red circles are there?", "2"),
    ("How many yellow triangles are there?", "0"),
    ("Is there a blue square?", "yes"),
    ("Is there a blue circle?", "no"),
    ("What color is the shape in row 2, column 2? A. red B. green C. blue D. yellow", "A"),
    ("What color is the shape in row 3, column 1? A. red B. green C. blue D. yellow", "B"),
    # empty cell
    ("What color is the shape in row 4, column 4? A. red B. green C. blue D. yellow", None),
    ("Is the blue square left of the green triangle?", "no"),
    ("Is the green triangle left of the blue square?", "yes"),
    ("Is the blue square above the green triangle?", "yes"),
    ("Is the red circle above the blue square?", None),  # two red circles: not determined
    ("Are there more red objects than blue objects?", "yes"),
    ("Are there more green objects than blue objects?", "no"),  # 1 vs 1
    ("What is the meaning of this?", None),
])
def test_true_answer_by_hand(question, answer):
    assert true_answer(HAND, question) == answer


def test_every_family_answers_what_the_scene_says():
    """Each generated question's answer equals the answer recomputed from the question text."""
    rng = random.Random(0)
    for _ in range(300):
        scene = random_scene(rng, rows=4, cols=4, min_things=1, max_things=8)
        for family in FAMILIES:
            q = make_question(family, scene, rng)
            if q is None:
                continue
            assert q.family == family and q.answer == true_answer(scene, q.question), q
            assert q.solution.endswith(f"\\boxed{{{q.answer}}}")


def test_scenes_put_one_object_per_cell_and_render_it():
    rng = random.Random(1)
    for _ in range(50):
        scene = random_scene(rng, rows=4, cols=4, min_things=4, max_things=8)
        cells = [(t.row, t.col) for t in scene.things]
        assert 4 <= len(cells) <= 8 and len(set(cells)) == len(cells)
        pixels = np.asarray(scene.render())
        assert pixels.shape == (112, 112, 3)
        for t in scene.things:  # the centre of a cell shows its object's colour
            assert tuple(pixels[t.row * 28 + 14, t.col * 28 + 14]) == COLORS[t.color]
        empty = {(r, c) for r in range(4) for c in range(4)} - set(cells)
        for r, c in empty:
            assert tuple(pixels[r * 28 + 14, c * 28 + 14]) == toyworld.BACKGROUND


def test_benchmark_is_balanced_and_splits_are_disjoint(tmp_path):
    world = WorldConfig(pool_images=64, benchmark_items=160)
    path = toyworld.write_benchmark(str(tmp_path / "bench"), world, seed=0)
    rows = read_jsonl(path)
    counts = {f: sum(r["category"] == f for r in rows) for f in FAMILIES}
    assert len(rows) == 160 and max(counts.values()) - min(counts.values()) <= 4, counts
    toyworld.write_pool(str(tmp_path / "pool"), world, seed=0)
    pool_files = sorted(os.listdir(tmp_path / "pool"))
    # images only
    assert len(pool_files) == 64 and all(name.endswith(".png") for name in pool_files)
    # the splits come from separate seed streams: no scene appears in two of them
    key = lambda scene: tuple((t.shape, t.color, t.row, t.col) for t in scene.things)  # noqa: E731
    pool = {key(s) for s in toyworld.scenes(1, 64, rows=4, cols=4, things=world.shifted_things)}
    bench = {key(s) for s in toyworld.scenes(2, 160, rows=4, cols=4, things=world.shifted_things)}
    rng = random.Random(0)
    pretraining = {key(toyworld.pretraining_scene(rng, world)) for _ in range(2000)}
    assert (len(pool) == 64 and not pool & bench and not pool & pretraining
            and not bench & pretraining)
    # and the pool's files are those scenes (so the check above is about the files the loop reads)
    first = np.asarray(
        toyworld.scenes(1, 1, rows=4, cols=4, things=world.shifted_things)[0].render())
    from PIL import Image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pool" / pool_files[0]).convert("RGB")),
                          first)


def test_the_loop_never_reads_labels(tmp_path, format_model_dir, image_dir, benchmark_file):
    """Two runs whose benchmark answers differ (true vs poisoned) write identical training
    artifacts: the answers reach evaluation and nothing else. The pool folder holds images and no
    label file."""
    poisoned = tmp_path / "poisoned"
    shutil.copytree(os.path.dirname(benchmark_file), poisoned)
    rows = read_jsonl(benchmark_file)
    write_jsonl(str(poisoned / os.path.basename(benchmark_file)),
                [{**r, "answer": "B" if r["choices"] else "99"} for r in rows])
    runs = {}
    for name, bench in (("true", benchmark_file),
                        ("poisoned", str(poisoned / os.path.basename(benchmark_file)))):
        run_dir = str(tmp_path / name)
        runs[name] = visplay.run_loop(
            load_config(os.path.join(ROOT, "config.yaml"),
                        tiny_overrides(run_dir, format_model_dir, image_dir, bench)))
    for artifact in ("questions_v1.jsonl", "labeled_v1.jsonl", "kept_v1.jsonl"):
        assert (open(tmp_path / "true" / artifact).read()
                == open(tmp_path / "poisoned" / artifact).read())
    from safetensors.torch import load_file
    for checkpoint in ("questioner_v1", "reasoner_v1"):
        a = load_file(str(tmp_path / "true" / checkpoint / "model.safetensors"))
        b = load_file(str(tmp_path / "poisoned" / checkpoint / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (runs["true"][1]["eval"]["tiny"]["accuracy"]
            != runs["poisoned"][1]["eval"]["tiny"]["accuracy"])
    assert not [n for n in os.listdir(image_dir) if not os.path.isdir(os.path.join(image_dir, n))
                and not n.endswith(".png")]


# ----------------------------------------------------------------------------
# render_shapes


def test_render_shapes_colours_at_cell_centres():
    background = (245, 245, 245)
    objects = [("circle", "red", 0, 0, 0.8), ("square", "blue", 1, 2, 0.5),
               ("triangle", "green", 0, 2, 0.9), ("circle", "yellow", 1, 1, 1.0)]
    image = render_shapes(objects, rows=2, cols=3, cell=28)
    assert image.mode == "RGB" and image.size == (84, 56)
    # centre of cell (row r, col c) is (28c + 14, 28r + 14)
    assert image.getpixel((14, 14)) == COLORS["red"]
    assert image.getpixel((70, 42)) == COLORS["blue"]
    assert image.getpixel((70, 14)) == COLORS["green"]
    assert image.getpixel((42, 42)) == COLORS["yellow"]
    # empty cells and cell corners are background
    assert image.getpixel((42, 14)) == background
    assert image.getpixel((14, 42)) == background
    for corner in [(0, 0), (27, 27), (0, 55), (83, 0), (83, 55), (56, 28)]:
        assert image.getpixel(corner) == background, corner
    # the square at scale 0.5 spans 14 pixels: x from 70 - 7 = 63 to 70 + 7 - 1 = 76
    assert image.getpixel((63, 42)) == COLORS["blue"] and image.getpixel((76, 42)) == COLORS["blue"]
    assert image.getpixel((62, 42)) == background and image.getpixel((77, 42)) == background
    assert image.getpixel((70, 35)) == COLORS["blue"] and image.getpixel((70, 34)) == background


def test_render_shapes_custom_background_and_cell():
    image = render_shapes([("square", "red", 0, 1, 0.5)], rows=1, cols=2, cell=40,
                          background=(0, 0, 0))
    assert image.size == (80, 40)
    assert image.getpixel((60, 20)) == COLORS["red"]
    assert image.getpixel((20, 20)) == (0, 0, 0)
    assert image.getpixel((79, 39)) == (0, 0, 0)


def test_render_shapes_unknown_shape_or_colour():
    with pytest.raises(ValueError, match="hexagon"):
        render_shapes([("hexagon", "red", 0, 0, 0.5)], rows=1, cols=1)
    with pytest.raises((KeyError, ValueError), match="purple"):
        render_shapes([("circle", "purple", 0, 0, 0.5)], rows=1, cols=1)
