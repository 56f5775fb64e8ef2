"""The embedded default's world: shape scenes, questions with exact answers, and a tiny base VLM.

No pretrained VLM can be downloaded here, so the project brings its own small world:
- Scenes: coloured shapes on a grid, one shape per cell, drawn by `render_shapes` with 28-pixel
  cells, so each cell is exactly one merged vision token of Qwen2.5-VL (patch 14, merge 2).
- Question families with answers computed from the scene: counting (by colour, shape, both, total),
  existence (absent objects included: the hallucination probe), the attribute at a position,
  spatial relations and comparisons, as multiple choice (yes/no, A-D) and numerical questions.
- Splits from disjoint seeds: pretraining scenes (few objects), the unlabeled pool that self-play
  sees (more objects: the new domain), and a labeled held-out benchmark of the new domain.
- The base: a tiny Qwen2.5-VL with its own tokenizer, "pretrained" by a short supervised run on
  both roles' formats (answers with a short chain and \\boxed{}; questions in tags) so it behaves
  like a weak instruction-tuned VLM.

Labels exist ONLY for pretraining and for the benchmark: the self-play loop reads the pool's image
folder and never a label file (none is written for the pool).
"""

import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from answers import OPTION_LETTERS
from data import atomic_path, write_jsonl
from grpo import completion_logprobs
from roles import QUESTIONER_INSTRUCTION, questioner_prompt, reasoner_prompt, reasoner_text
from sampler import special_tokens
from vlm import build_tiny_vlm, save_vlm

log = logging.getLogger("visplay")

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
FAMILIES = ("count_color", "count_shape", "count_both", "count_total", "exists", "attribute",
            "spatial", "compare")
COLOR_NAMES = tuple(COLORS)
# The image processor's normalisation mean (CLIP's) as a colour: empty cells normalise to ~0, so the
# vision features carry the objects rather than a large constant from the background.
BACKGROUND = (123, 117, 104)
# The fraction of its 28-pixel cell a shape spans: big squares, medium triangles, small circles, so
# a shape shows in the amount of colour in its cell as well as in its outline (a tiny model from
# scratch learns that in minutes; outlines alone take it far longer).
SHAPE_SCALE = {"square": 0.9, "triangle": 1.0, "circle": 0.6}


def render_shapes(objects, *, rows, cols, cell=28, background=(245, 245, 245)):
    """Draw objects on a rows x cols grid of `cell`-pixel cells.

    objects: iterable of (shape, colour, row, col, scale) with shape in SHAPES, colour in COLORS,
    scale in (0, 1] the fraction of the cell the shape spans. Returns a PIL RGB image.
    """
    image = Image.new("RGB", (cols * cell, rows * cell), background)
    draw = ImageDraw.Draw(image)
    for shape, colour, row, col, scale in objects:
        half = cell * scale / 2
        cx, cy = col * cell + cell / 2, row * cell + cell / 2
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        fill = COLORS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
        else:
            raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")
    return image


@dataclass(frozen=True)
class Thing:
    shape: str
    color: str
    row: int                      # 0-based grid cell
    col: int

    @property
    def name(self):
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    rows: int
    cols: int
    things: list

    def render(self):
        objects = [(t.shape, t.color, t.row, t.col, SHAPE_SCALE[t.shape]) for t in self.things]
        return render_shapes(objects, rows=self.rows, cols=self.cols, background=BACKGROUND)


def random_scene(rng, *, rows, cols, min_things, max_things):
    """A scene with a uniform number of things in [min_things, max_things] on distinct cells."""
    count = rng.randint(min_things, max_things)
    cells = rng.sample([(r, c) for r in range(rows) for c in range(cols)], count)
    things = [Thing(rng.choice(SHAPES), rng.choice(COLOR_NAMES), r, c) for r, c in sorted(cells)]
    return Scene(rows, cols, things)


@dataclass
class Question:
    family: str
    type: str                     # the questioner's type tag: multiple choice | numerical
    question: str
    answer: str
    choices: list | None
    solution: str                 # the reasoner's target: a short chain, then \boxed{answer}


def _listing(things):
    """The things named in reading order (row by row, left to right)."""
    return ", ".join(t.name for t in things) if things else "none"


def _count(family, scene, rng):
    color, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
    if family == "count_color":
        match, what = [t for t in scene.things if t.color == color], f"{color} objects"
    elif family == "count_shape":
        match, what = [t for t in scene.things if t.shape == shape], f"{shape}s"
    elif family == "count_both":
        match = [t for t in scene.things if t.color == color and t.shape == shape]
        what = f"{color} {shape}s"
    else:
        match, what = scene.things, "objects"
    n = str(len(match))
    return Question(family, "numerical", f"How many {what} are there?", n, None,
                    f"Found: {_listing(match)}. \\boxed{{{n}}}")


def _exists(scene, rng):
    present = {t.name for t in scene.things}
    if rng.random() < 0.5:
        name = rng.choice(sorted(present))
    else:
        absent = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES if f"{c} {s}" not in present]
        name = rng.choice(absent)
    found = [t for t in scene.things if t.name == name]
    answer = "yes" if found else "no"
    return Question("exists", "multiple choice", f"Is there a {name}?", answer, None,
                    f"Found: {_listing(found)}. \\boxed{{{answer}}}")


def _attribute(scene, rng):
    thing = rng.choice(scene.things)
    options = list(COLOR_NAMES)
    letter = OPTION_LETTERS[options.index(thing.color)]
    listed = " ".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(options))
    where = f"row {thing.row + 1}, column {thing.col + 1}"
    return Question("attribute", "multiple choice", f"What color is the shape in {where}? {listed}",
                    letter, options, f"At {where}: {thing.name}. \\boxed{{{letter}}}")


def _spatial(scene, rng):
    names = [t.name for t in scene.things]
    unique = [t for t in scene.things if names.count(t.name) == 1]
    if len(unique) < 2:
        return None
    a, b = rng.sample(unique, 2)
    if rng.random() < 0.5:
        relation, holds = "left of", a.col < b.col
        detail = f"column {a.col + 1}, {b.name} in column {b.col + 1}"
    else:
        relation, holds = "above", a.row < b.row
        detail = f"row {a.row + 1}, {b.name} in row {b.row + 1}"
    answer = "yes" if holds else "no"
    return Question("spatial", "multiple choice", f"Is the {a.name} {relation} the {b.name}?",
                    answer, None, f"{a.name} in {detail}. \\boxed{{{answer}}}")


def _compare(scene, rng):
    first, second = rng.sample(COLOR_NAMES, 2)
    n1 = sum(t.color == first for t in scene.things)
    n2 = sum(t.color == second for t in scene.things)
    answer = "yes" if n1 > n2 else "no"
    return Question("compare", "multiple choice",
                    f"Are there more {first} objects than {second} objects?", answer, None,
                    f"{first}: {n1}, {second}: {n2}. \\boxed{{{answer}}}")


def make_question(family, scene, rng):
    """A question of `family` about `scene`, or None when the scene cannot support it."""
    if family.startswith("count"):
        return _count(family, scene, rng)
    writers = {"exists": _exists, "attribute": _attribute, "spatial": _spatial, "compare": _compare}
    return writers[family](scene, rng)


def questioner_target(q):
    """What the questioner writes for question q (its pretraining target)."""
    return f"<type>{q.type}</type><question>{q.question}</question><answer>{q.answer}</answer>"


@dataclass
class WorldConfig:
    rows: int = 4
    cols: int = 4
    pretrain_decay: float = 0.6         # base domain: P(n objects) ~ decay**n, n = 1..max_things
    max_things: int = 8
    shifted_things: tuple = (4, 8)      # the unlabeled pool and the benchmark: uniform, more
    pool_images: int = 512
    benchmark_items: int = 1024


def pretraining_scene(rng, world):
    """A base-domain scene: mostly one to three objects, rarely many."""
    weights = [world.pretrain_decay ** k for k in range(world.max_things)]
    n = rng.choices(range(1, world.max_things + 1), weights=weights)[0]
    return random_scene(rng, rows=world.rows, cols=world.cols, min_things=n, max_things=n)


def scenes(seed, count, *, rows, cols, things):
    """`count` scenes from one seed: each split has its own seed, so the splits never share a
    scene stream."""
    rng = random.Random(seed)
    return [random_scene(rng, rows=rows, cols=cols, min_things=things[0], max_things=things[1])
            for _ in range(count)]


def balanced_questions(scene_list, seed, per_scene=1):
    """Questions balanced over FAMILIES: each scene gets the family asked least so far (ties in
    FAMILIES order); a scene that cannot host it (e.g. no two unique objects for spatial) gets the
    next least."""
    rng = random.Random(seed)
    out, counts = [], {family: 0 for family in FAMILIES}
    for scene in scene_list:
        for _ in range(per_scene):
            q = None
            for family in sorted(FAMILIES, key=lambda f: (counts[f], FAMILIES.index(f))):
                q = make_question(family, scene, rng)
                if q is not None:
                    counts[family] += 1
                    break
            out.append((scene, q))
    return out


def write_benchmark(folder, world, seed):
    """Labeled held-out benchmark of the shifted domain: images + benchmark.jsonl. Returns its
    path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    benchmark_scenes = scenes(seed + 2, world.benchmark_items, rows=world.rows, cols=world.cols,
                              things=world.shifted_things)
    items = balanced_questions(benchmark_scenes, seed + 3)
    rows = []
    for i, (scene, q) in enumerate(items):
        name = f"images/{i:05d}.png"
        scene.render().save(os.path.join(folder, name))
        rows.append({"id": f"toy-{i:05d}", "image": name, "question": q.question,
                     "answer": q.answer, "choices": q.choices, "category": q.family})
    path = os.path.join(folder, "benchmark.jsonl")
    write_jsonl(path, rows)
    return path


def write_pool(folder, world, seed):
    """The unlabeled pool: PNG files only (no labels are written anywhere)."""
    os.makedirs(folder, exist_ok=True)
    pool = scenes(seed + 1, world.pool_images, rows=world.rows, cols=world.cols,
                  things=world.shifted_things)
    for i, scene in enumerate(pool):
        scene.render().save(os.path.join(folder, f"{i:05d}.png"))
    return folder


def corpus(seed, count=4000):
    """Texts the tiny tokenizer is trained on: both roles' prompts and targets of the world."""
    world = WorldConfig()
    texts = [QUESTIONER_INSTRUCTION] * (count // 8)  # frequent enough to become a few tokens
    scene_list = scenes(seed + 7, count, rows=world.rows, cols=world.cols,
                        things=(1, world.max_things))
    for scene, q in balanced_questions(scene_list, seed + 8):
        texts += [reasoner_text(q.question), q.solution, questioner_target(q)]
    return texts


@dataclass
class BaseConfig:
    """How the tiny base is built and pretrained (supervised, on the base domain only)."""
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 64
    vision_depth: int = 2
    vocab_size: int = 640
    steps: int = 1500
    batch_size: int = 32
    lr: float = 2e-3
    questioner_share: float = 0.3      # examples teaching the questioner's format; the rest teach
                                       # the reasoner's
    direct_rate: float = 0.65          # reasoner targets that answer at once ("\boxed{3}") instead
                                       # of enumerating first ("Found: red circle, ... \boxed{3}")
    describe_weight: float = 3.0       # extra weight of count_total, whose chain names every object
    freeze_vision: bool = True         # keep the randomly initialised vision blocks fixed (their
                                       # features already separate colours and shapes); the merger
                                       # still learns


def _encode_target(processor, text):
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return tokenizer(text, add_special_tokens=False).input_ids + [end]


def pretraining_example(rng, processor, world, base):
    """One (prompt, target ids) pair on a fresh base-domain scene: a question written by the
    questioner, or an answer by the reasoner, direct or after enumerating (the base's two
    habits)."""
    scene = pretraining_scene(rng, world)
    weights = [base.describe_weight if f == "count_total" else 1.0 for f in FAMILIES]
    q = None
    while q is None:
        q = make_question(rng.choices(FAMILIES, weights)[0], scene, rng)
    image = scene.render()
    if rng.random() < base.questioner_share:
        return questioner_prompt(processor, image), _encode_target(processor, questioner_target(q))
    target = f"\\boxed{{{q.answer}}}" if rng.random() < base.direct_rate else q.solution
    return reasoner_prompt(processor, image, q.question), _encode_target(processor, target)


def pretrain(model, processor, *, world, base, seed):
    """Supervised next-token training (cross-entropy on the target tokens), a fresh batch each step.

    Uses `grpo.completion_logprobs`, the same forward the GRPO update uses. Returns the loss curve.
    """
    tokens = special_tokens(processor, model)
    if base.freeze_vision:
        for part in (model.model.visual.patch_embed, model.model.visual.blocks):
            part.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=base.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, base.lr, total_steps=base.steps,
                                                   pct_start=0.1)
    rng = random.Random(seed)
    losses = []
    model.train()
    for step in range(base.steps):
        batch = [pretraining_example(rng, processor, world, base) for _ in range(base.batch_size)]
        width = max(len(t) for _, t in batch)
        ids = torch.full((len(batch), width), tokens.pad_id)
        mask = torch.zeros((len(batch), width))
        for row, (_, target) in enumerate(batch):
            ids[row, :len(target)] = torch.tensor(target)
            mask[row, :len(target)] = 1
        logprobs, _ = completion_logprobs(model, [p for p, _ in batch], ids, mask, tokens=tokens)
        loss = -(logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == base.steps - 1:
            log.info("[pretrain %d/%d] loss %.3f", step + 1, base.steps, loss.item())
    model.eval()
    model.requires_grad_(True)
    return losses


def build_base(path, seed, world=None, base=None):
    """Build the tiny base (tokenizer, processor, model), pretrain it and save it atomically to
    `path`."""
    world, base = world or WorldConfig(), base or BaseConfig()
    started = time.perf_counter()
    scratch = path.rstrip("/") + ".init"
    model, processor = build_tiny_vlm(
        scratch, corpus(seed), seed=seed, vocab_size=base.vocab_size, min_pixels=28 * 28,
        max_pixels=world.rows * world.cols * 28 * 28, hidden_size=base.hidden_size,
        layers=base.layers, heads=base.heads, kv_heads=base.kv_heads,
        vision_hidden=base.vision_hidden, vision_depth=base.vision_depth)
    shutil.rmtree(scratch, ignore_errors=True)
    torch.manual_seed(seed)
    pretrain(model, processor, world=world, base=base, seed=seed)
    save_vlm(model, processor, path)
    log.info("base built and pretrained in %.0f s -> %s", time.perf_counter() - started, path)


def build_embedded(folder, seed):
    """The embedded default's files, built once per folder (each piece atomically, so a rerun
    reuses it).

    Returns {"base": model folder, "pool": unlabeled image folder, "benchmark": labeled JSONL}.
    """
    world = WorldConfig()
    os.makedirs(folder, exist_ok=True)
    paths = {"base": os.path.join(folder, "base"), "pool": os.path.join(folder, "pool"),
             "benchmark": os.path.join(folder, "benchmark", "benchmark.jsonl")}
    if not os.path.isdir(paths["pool"]):
        with atomic_path(paths["pool"]) as tmp:
            write_pool(tmp, world, seed)
    if not os.path.isdir(os.path.dirname(paths["benchmark"])):
        with atomic_path(os.path.dirname(paths["benchmark"])) as tmp:
            write_benchmark(tmp, world, seed)
    if not os.path.isdir(paths["base"]):
        build_base(paths["base"], seed, world)
    return paths


_QUESTION_PATTERNS = [
    (re.compile(r"^How many (?:(?P<color>\w+) )?(?P<what>objects|circles|squares|triangles) "
                r"are there\?$"), "count"),
    (re.compile(r"^Is there a (?P<color>\w+) (?P<shape>\w+)\?$"), "exists"),
    (re.compile(r"^What color is the shape in row (?P<row>\d+), column (?P<col>\d+)\?"),
     "attribute"),
    (re.compile(r"^Is the (?P<c1>\w+) (?P<s1>\w+) (?P<rel>left of|above) "
                r"the (?P<c2>\w+) (?P<s2>\w+)\?$"), "spatial"),
    (re.compile(r"^Are there more (?P<c1>\w+) objects than (?P<c2>\w+) objects\?$"), "compare"),
]


def true_answer(scene, question):
    """The exact answer to a question written in the world's templates, or None if it is not one
    (or asks about something the scene does not determine). For analysis only: the loop never
    calls it."""
    for pattern, kind in _QUESTION_PATTERNS:
        m = pattern.match(question.strip())
        if m is None:
            continue
        g = m.groupdict()
        things = scene.things
        if kind == "count":
            shape = None if g["what"] == "objects" else g["what"][:-1]
            if g["color"] not in (None, *COLOR_NAMES) or shape not in (None, *SHAPES):
                return None
            return str(sum((g["color"] is None or t.color == g["color"])
                           and (shape is None or t.shape == shape) for t in things))
        if kind == "exists":
            return "yes" if any(t.name == f"{g['color']} {g['shape']}" for t in things) else "no"
        if kind == "attribute":
            cell = [t for t in things if (t.row + 1, t.col + 1) == (int(g["row"]), int(g["col"]))]
            return OPTION_LETTERS[COLOR_NAMES.index(cell[0].color)] if cell else None
        if kind == "spatial":
            a = [t for t in things if t.name == f"{g['c1']} {g['s1']}"]
            b = [t for t in things if t.name == f"{g['c2']} {g['s2']}"]
            if len(a) != 1 or len(b) != 1:
                return None
            holds = a[0].col < b[0].col if g["rel"] == "left of" else a[0].row < b[0].row
            return "yes" if holds else "no"
        n1 = sum(t.color == g["c1"] for t in things)
        n2 = sum(t.color == g["c2"] for t in things)
        return "yes" if n1 > n2 else "no"
    return None
