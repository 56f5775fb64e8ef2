"""The embedded toy world: scenes and answers, splits, label-blindness of the loop, reward
directions."""

import os
import random
import re
import shutil

import numpy as np
import pytest
import torch

import visplay
from config import load_config
from data import read_jsonl, write_jsonl
from test_loop import tiny_overrides
from models.load import load_vlm
from models.tiny import train_tokenizer
from toyworld import base as toy_base
from toyworld import world as toy_world
from toyworld.world import (COLORS, FAMILIES, Scene, Thing, WorldConfig, make_question,
                            random_scene, render_shapes, true_answer, twin)

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
    # families the world does not ask (docs/toyworld.md): not its questions
    ("What color is the shape in row 2, column 2? A. red B. green C. blue D. yellow", None),
    ("Is the blue square left of the green triangle?", None),
    ("Are there more red objects than blue objects?", "yes"),
    ("Are there more green objects than blue objects?", "no"),  # 1 vs 1
    ("What is the meaning of this?", None),
    # the compositional counts
    ("How many objects are red or blue?", "4"),
    ("How many objects are circles or squares?", "4"),
    ("How many objects are red or circles?", "3"),
    ("How many objects are green or triangles?", "1"),
    ("How many objects are not red?", "2"),
    ("How many objects are not squares?", "3"),
    ("How many objects are red but not circles?", "1"),
    ("How many objects are squares but not red?", "1"),
    ("How many objects are circles but not red?", "0"),
    ("How many objects are not red or blue?", None),   # not in the language
    ("How many objects are circles or red?", None),    # colours come first
    ("How many objects are red or red?", None),
])
def test_true_answer_by_hand(question, answer):
    assert true_answer(HAND, question) == answer


@pytest.mark.parametrize("question, family", [
    ("How many objects are there?", "count_total"),
    ("How many red objects are there?", "count_color"),
    ("How many circles are there?", "count_shape"),
    ("How many red circles are there?", "count_color_shape"),
    ("Is there a blue square?", "exists"),
    ("Are there more red objects than blue objects?", "compare"),
    ("Is the blue square left of the green triangle?", None),
    ("How many objects are red or circles?", "count_or"),
    ("How many objects are not circles?", "count_not"),
    ("How many objects are circles but not red?", "count_but"),
    ("How many objects are not red or blue?", None),
])
def test_question_family_by_hand(question, family):
    assert toy_world.question_family(question) == family


def test_compositional_predicates_by_hand():
    """4 colours and 3 shapes: 6 colour pairs + 3 shape pairs + 12 colour-shape pairs joined by
    "or", 7 negations, 12 + 12 "but not"; every predicate appears in some generated question."""
    assert {f: len(toy_world.PREDICATES[f]) for f in toy_world.PREDICATES} == {
        "count_or": 21, "count_not": 7, "count_but": 24}
    rng = random.Random(0)
    scene = random_scene(rng, rows=4, cols=4, min_things=8, max_things=8)
    asked = {make_question(f, scene, rng).question for f in toy_world.PREDICATES
             for _ in range(2000)}
    assert len(asked) == 52 and "How many objects are yellow or triangles?" in asked


def test_pool_truth_answers_the_pools_own_questions():
    """The truth redrawn from the seed gives every pool question's family and answer."""
    truth = toy_world.pool_truth(3)
    for index, (_, q) in enumerate(toy_world.pool_questions(WorldConfig(), 3)):
        assert truth(index, q.question) == (q.family, q.answer)


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
            assert tuple(pixels[r * 28 + 14, c * 28 + 14]) == toy_world.cell_background(r, c)
        for t in scene.things:  # a cell's corner shows its background (squares span 0.9)
            assert tuple(pixels[t.row * 28, t.col * 28]) == toy_world.cell_background(t.row, t.col)


def test_cell_backgrounds_by_hand():
    """BACKGROUND (123, 117, 104), red + 32 per row and blue + 32 per column around the centre
    (rows/cols - 1) / 2 = 1.5: cell a1 (123 - 48, 117, 104 - 48) = (75, 117, 56); d4 (171, 117,
    152); b3 (123 - 16, 117, 104 + 16) = (107, 117, 120). All 16 differ from each other and from
    the object colours."""
    assert toy_world.cell_background(0, 0) == (75, 117, 56)
    assert toy_world.cell_background(3, 3) == (171, 117, 152)
    assert toy_world.cell_background(1, 2) == (107, 117, 120)
    assert toy_world.cell_name(1, 2) == "b3"
    backgrounds = {toy_world.cell_background(r, c) for r in range(4) for c in range(4)}
    assert len(backgrounds) == 16 and not backgrounds & set(COLORS.values())


# Hand scene without repeated kinds (`random_scene` never repeats a colour and shape):
#      col 0: a1 red circle, b1 green square;  col 1: a2 red square;  col 2: c3 blue triangle;
#      col 3: d4 red triangle
UNIQUE = scene_of(("circle", "red", 0, 0), ("square", "green", 1, 0), ("square", "red", 0, 1),
                  ("triangle", "blue", 2, 2), ("triangle", "red", 3, 3))


def listed(text):
    """The things a list names ("red circle blue square" -> ["red circle", "blue square"])."""
    words = text.split()
    return [" ".join(words[i:i + 2]) for i in range(0, len(words), 2)] if words != ["none"] else []


def test_chains_list_exactly_the_matching_things_in_random_orders():
    """A counting chain lists the matching things (each once, any order) then their number; the
    order varies between draws (so the base learns that any order is right); "none" when nothing
    matches. Compare lists both colours."""
    orders = set()
    for seed in range(30):
        q = make_question("count_color", UNIQUE, random.Random(seed))
        colour = q.question.split()[2]
        assert q.solution.startswith(f"{colour}: ")  # what it looks for, then the list
        names = listed(q.solution.removeprefix(f"{colour}: ").split(".")[0])
        expected = sorted(t.name for t in UNIQUE.things if t.color == colour)
        assert sorted(names) == expected and q.answer == str(len(expected))
        if colour == "red":
            orders.add(tuple(names))
    assert len(orders) > 1  # red has 3 things: several orders were drawn
    q = make_question("compare", UNIQUE, random.Random(5))
    first, second = q.question.split()[3], q.question.split()[6]
    lists = dict(part.split(": ") for part in q.solution.split(". ")[0].split("; "))
    for colour in (first, second):
        assert sorted(listed(lists[colour])) == sorted(t.name for t in UNIQUE.things
                                                       if t.color == colour)


def test_scenes_never_repeat_a_colour_and_shape():
    rng = random.Random(3)
    for _ in range(200):
        scene = random_scene(rng, rows=4, cols=4, min_things=1, max_things=8)
        names = [t.name for t in scene.things]
        assert len(set(names)) == len(names)


def test_thing_and_cell_names_are_one_token_each_with_their_space():
    """The base's tokenizer: ' red circle' and ' b3' are one token each, so a list continues with
    one token per thing and stops with one; decoding gives the text back."""
    tokenizer = train_tokenizer(toy_base.corpus(0, count=400), 400,
                                toy_world.world_tokens(WorldConfig()))
    text = "Found: red circle blue square yellow triangle. \\boxed{3} Cell b3: red circle."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    names = {" red circle", " blue square", " yellow triangle", " b3"}
    assert [p for p in pieces if p in names] == [" red circle", " blue square",
                                                 " yellow triangle", " b3", " red circle"]
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize("language, families", [("basic", 5), ("compositional", 8)])
def test_benchmark_is_balanced_and_splits_are_disjoint(tmp_path, language, families):
    world = WorldConfig(pool_images=64, benchmark_items=160, language=language)
    path = toy_world.write_benchmark(str(tmp_path / "bench"), world, seed=0)
    rows = read_jsonl(path)
    counts = {f: sum(r["category"] == f for r in rows) for f in FAMILIES}
    asked = {f for f, n in counts.items() if n}
    assert len(rows) == 160 and asked == set(world.families) and len(asked) == families
    assert max(counts[f] for f in asked) - min(counts[f] for f in asked) <= 4, counts
    toy_world.write_pool(str(tmp_path / "pool"), world, seed=0)
    pool_files = sorted(os.listdir(tmp_path / "pool"))
    # images only
    assert len(pool_files) == 64 and all(name.endswith(".png") for name in pool_files)
    # the splits come from separate seed streams: no scene appears in two of them
    key = lambda scene: tuple((t.shape, t.color, t.row, t.col) for t in scene.things)  # noqa: E731
    pool = {key(s) for s in toy_world.scenes(1, 64, rows=4, cols=4, things=world.shifted_things)}
    bench = {key(s) for s in toy_world.scenes(2, 160, rows=4, cols=4, things=world.shifted_things)}
    rng = random.Random(0)
    pretraining = {key(toy_world.pretraining_scene(rng, world)) for _ in range(2000)}
    assert (len(pool) == 64 and not pool & bench and not pool & pretraining
            and not bench & pretraining)
    # and the pool's files are those scenes (so the check above is about the files the loop reads)
    first = np.asarray(
        toy_world.scenes(1, 1, rows=4, cols=4, things=world.shifted_things)[0].render())
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


# ----------------------------------------------------------------------------
# The shipped base: copied only when every file matches its checksum


def test_shipped_base_is_copied_only_when_every_checksum_matches(tmp_path):
    source = tmp_path / "shipped"
    source.mkdir()
    (source / "config.json").write_text('{"a": 1}')
    (source / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    toy_base.write_checksums(str(source))
    import hashlib  # the digest of the 8 bytes '{"a": 1}', by hashlib directly

    digest = hashlib.sha256(b'{"a": 1}').hexdigest()
    assert (source / "SHA256SUMS").read_text().splitlines()[0] == f"{digest}  config.json"
    toy_base.copy_verified(str(source), str(tmp_path / "copy"))
    assert sorted(os.listdir(tmp_path / "copy")) == ["config.json", "model.safetensors"]
    assert (tmp_path / "copy" / "model.safetensors").read_bytes() == bytes(range(256)) * 8

    (source / "model.safetensors").write_bytes(bytes(range(256)) * 7)  # changed
    with pytest.raises(ValueError, match="model.safetensors does not match its checksum"):
        toy_base.copy_verified(str(source), str(tmp_path / "copy2"))
    assert not (tmp_path / "copy2").exists()  # nothing half-copied
    (source / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors is missing"):
        toy_base.copy_verified(str(source), str(tmp_path / "copy3"))
    (source / "SHA256SUMS").unlink()
    with pytest.raises(ValueError, match="SHA256SUMS is missing"):
        toy_base.copy_verified(str(source), str(tmp_path / "copy4"))


def test_the_shipped_base_verifies_and_loads(tmp_path):
    """toyworld/embedded_base/ (seed 0's base, built by `python -m toyworld.base --rebuild`)
    matches its checksums, loads with its own tokenizer, and that tokenizer keeps thing and cell
    names whole."""
    dest = str(tmp_path / "base")
    toy_base.copy_verified(toy_base.SHIPPED_BASE, dest)
    model, processor = load_vlm(dest)
    assert model.config.text_config.vocab_size >= len(processor.tokenizer)
    pieces = processor.tokenizer.tokenize("Found: red circle b3.")
    assert " red circle" in pieces and " b3" in pieces


def test_an_embedded_world_is_refused_for_another_seed_or_language(tmp_path):
    """RUN/embedded/world.json records what the world was built for; a run asking for another
    seed or language stops before building anything."""
    folder = tmp_path / "embedded"
    folder.mkdir()
    (folder / "world.json").write_text('{"seed": 0, "language": "basic"}')
    for seed, language in ((0, "compositional"), (1, "basic")):
        with pytest.raises(ValueError, match="world.json: this world was built for"):
            toy_base.build_embedded(str(folder), seed, language)
    assert os.listdir(folder) == ["world.json"]


def test_each_recipe_draws_its_families_by_its_weights():
    """Family shares of 3000 pretraining examples (30% the questioner's) against the shares the
    weights give, worked out by hand, within about three standard errors: basic, both roles:
    count_total 0.7 / 4.7 = 14.9%; compositional, the reasoner's count_total 1.5 / (1.5 + 3 x 0.6
    + 4) = 20.5%, the questioner's long-list families (count_total, count_or, count_not)
    3 x 0.15 / (0.45 + 5) = 8.3%."""
    _, processor = load_vlm(toy_base.SHIPPED_BASE)

    def shares(language):
        world, recipe = WorldConfig(language=language), toy_base.RECIPES[language]
        rng, asked, answered = random.Random(5), [], []
        for _ in range(3000):
            prompt, target = toy_base.pretraining_example(rng, processor, world, recipe)
            text = processor.tokenizer.decode(target, skip_special_tokens=True)
            written = re.search(r"<question>(.*?)</question>", text)
            if written:  # the questioner's <type>...<question>...<answer>...
                asked.append(toy_world.question_family(written.group(1)))
            else:  # the reasoner's chain: its family from the prompt's question
                shown = processor.tokenizer.decode(prompt.input_ids, skip_special_tokens=True)
                answered.append(toy_world.question_family(
                    re.search(r"(How many|Is there|Are there)[^?]*\?", shown).group(0)))
        return asked, answered

    asked, answered = shares("basic")
    assert 0.125 < answered.count("count_total") / len(answered) < 0.175
    assert 0.11 < asked.count("count_total") / len(asked) < 0.19
    assert set(asked) == set(answered) == set(toy_world.LANGUAGES["basic"])
    asked, answered = shares("compositional")
    assert 0.175 < answered.count("count_total") / len(answered) < 0.235
    long = sum(f in ("count_total", "count_or", "count_not") for f in asked) / len(asked)
    assert 0.05 < long < 0.12 and set(asked) == set(toy_world.LANGUAGES["compositional"])


def test_cut_list_by_hand():
    """A lazy annotator's label: the chain keeps its first `keep` things and the count matches."""
    q = toy_world.Question("count_total", "numerical", "How many objects are there?", "5", None,
                           "all: red circle blue square red square green triangle red circle. "
                           "\\boxed{5}")
    cut = toy_world.cut_list(q, 3)
    assert cut.solution == "all: red circle blue square red square. \\boxed{3}"
    assert (cut.answer, cut.question, cut.family) == ("3", q.question, "count_total")


def test_lazy_share_cuts_only_crowded_count_lists():
    """With lazy_share 1 every reasoner count chain of more than lazy_after things stops there
    (and its count says so); with 0 the same draws keep their long lists. Other families and the
    questioner's targets are never cut."""
    _, processor = load_vlm(toy_base.SHIPPED_BASE)
    world = WorldConfig()
    pattern = r"^(\w+): (.*)\. \\boxed\{(\d+)\}"

    def count_chains(share):
        rng, chains = random.Random(3), []
        for _ in range(600):
            _, target = toy_base.pretraining_example(
                rng, processor, world, toy_base.BaseConfig(lazy_share=share, lazy_after=3))
            text = processor.tokenizer.decode(target, skip_special_tokens=True)
            match = re.match(pattern, text)
            if match and match.group(2) != "none":
                chains.append((len(match.group(2).split()) // 2, int(match.group(3))))
        return chains

    lazy, full = count_chains(1.0), count_chains(0.0)
    assert all(listed == count for listed, count in lazy + full)  # the count matches the list
    assert max(count for _, count in lazy) == 3
    assert max(count for _, count in full) > 3


def test_twin_changes_two_things_in_shape_and_colour_in_place():
    for seed in range(200):
        rng = random.Random(seed)
        scene = random_scene(rng, rows=4, cols=4, min_things=2, max_things=8)
        edited = twin(scene, rng)
        pairs = list(zip(scene.things, edited.things))
        changed = [(a, b) for a, b in pairs if a != b]
        assert len(changed) == 2, seed
        assert all((a.row, a.col) == (b.row, b.col) for a, b in pairs)
        assert len({t.name for t in edited.things}) == len(edited.things)  # no two alike
        if len(scene.things) <= 4:  # room for both: shape AND colour change
            assert all(a.shape != b.shape and a.color != b.color for a, b in changed)


def test_difficulty_items_are_the_valid_questions_the_truth_answers():
    from toyworld.difficulty import accuracy, difficulty_items

    rows = [{"image_index": 0, "image": "a.png", "question": "How many objects are there?",
             "valid": True, "choices": None},
            {"image_index": 1, "image": "b.png", "question": "Is there a red circle?",
             "valid": True, "choices": None},
            {"image_index": 1, "image": "b.png", "question": "What is it?", "valid": True,
             "choices": None},
            {"image_index": 2, "image": "c.png", "question": "How many objects are there?",
             "valid": False, "choices": None}]
    truth = {(0, "How many objects are there?"): ("count_total", "4"),
             (1, "Is there a red circle?"): ("exists", "no"),
             (2, "How many objects are there?"): ("count_total", "2")}
    items = difficulty_items(rows, lambda i, q: truth.get((i, q), (None, None)))
    assert [(it.id, it.images, it.answer, it.category, it.answer_type) for it in items] == [
        ("0-0", ["a.png"], "4", "count_total", "integer"),
        ("1-1", ["b.png"], "no", "exists", "yes_no")]
    assert accuracy([{"correct": True}, {"correct": False}, {"correct": True}]) == 2 / 3
    assert accuracy([]) is None
