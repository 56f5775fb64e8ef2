"""The embedded default's world: shape scenes, questions with exact answers, and their splits.

No pretrained VLM can be downloaded here, so the project brings its own small world (and, in
`base.py`, its own small base model):
- Scenes: coloured shapes on a grid, one shape per cell and no two alike, drawn by `render_shapes`
  with 28-pixel cells, so each cell is exactly one merged vision token of Qwen2.5-VL (patch 14,
  merge 2); each cell's background is tinted by its position.
- Question families with answers computed from the scene: counting (by colour, by shape, in
  total), existence (absent objects included: the hallucination probe) and comparisons, as
  numerical and yes/no questions; the compositional language (`LANGUAGES`) adds counts under
  combined filters ("red or circles", "not red", "red but not circles").
  The reasoner's chains list the things involved, one token each, in any order, then give the
  answer in \\boxed{}.
- Splits from disjoint seeds: pretraining scenes (few objects), the unlabeled pool that self-play
  sees (more objects: the new domain), and a labeled held-out benchmark of the new domain.

Labels exist ONLY for pretraining and for the benchmark: the self-play loop reads the pool's image
folder and never a label file (none is written for the pool). The spy game's embedded default
plays on pool scenes and their edited twins (`twin`, `write_toy_pairs`).
"""

import os
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from data import write_jsonl

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
# Three more families were measured and left out (docs/toyworld.md): "spatial" ("Is the red
# circle left of the blue square?": naming where a named thing is, 2 of 50 chains right after 2500
# pretraining steps), "attribute" ("What color is the shape in row 2, column 3?": 68% on
# base-domain scenes, 26% on the pool's after 4000 steps) and "count_both" ("How many red
# circles?": 0 or 1 since no two things are alike, an existence question).
# The question languages (`WorldConfig.language`): "basic", five families; "compositional" adds
# counts under combined filters ("How many objects are red or circles?", "... not red?", "... red
# but not circles?"), where the questioner has more to choose from (docs/toyworld.md).
LANGUAGES = {
    "basic": ("count_color", "count_shape", "count_total", "exists", "compare"),
    "compositional": ("count_color", "count_shape", "count_total", "count_or", "count_not",
                      "count_but", "exists", "compare"),
}
FAMILIES = LANGUAGES["compositional"]  # every family the templates parse, in table order
COMPOSITIONAL = ("count_or", "count_not", "count_but")  # the combined-filter counts (PREDICATES)
COLOR_NAMES = tuple(COLORS)
# The image processor's normalisation mean (CLIP's) as a colour: empty cells normalise to ~0, so the
# vision features carry the objects rather than a large constant from the background.
BACKGROUND = (123, 117, 104)
# Each cell's background is tinted by its position (red by row, blue by column, +-48 around
# BACKGROUND): the cell a vision token shows is in its features, so the model can name cells
# (a transformer with relative rope positions alone cannot tell where an image token is).
TINT = 32
ROW_LETTERS = "abcdefgh"
# The fraction of its 28-pixel cell a shape spans: big squares, medium triangles, small circles, so
# a shape shows in the amount of colour in its cell as well as in its outline (a tiny model from
# scratch learns that in minutes; outlines alone take it far longer).
SHAPE_SCALE = {"square": 0.9, "triangle": 1.0, "circle": 0.6}


def cell_name(row, col):
    """A cell's name, one token of the base's tokenizer: row letter, column number ("b3")."""
    return f"{ROW_LETTERS[row]}{col + 1}"


def world_tokens(world):
    """Words the base's tokenizer keeps as one token each, with their leading space: every
    thing's name (" red circle"), so a list "red: red circle red square." continues with one
    token per thing and stops with one token; and every cell's name (" b3"), which the dropped
    positional families used (kept, with the tinted cells, so a positional family can return
    without a new tokenizer)."""
    from tokenizers import AddedToken

    words = [f"{colour} {shape}" for colour in COLOR_NAMES for shape in SHAPES]
    words += [cell_name(r, c) for r in range(world.rows) for c in range(world.cols)]
    return [AddedToken(" " + word, normalized=False) for word in words]


def cell_background(row, col, rows=4, cols=4):
    """The background colour of a cell: BACKGROUND tinted by the cell's position."""
    r, _, b = BACKGROUND
    return (round(r + TINT * (row - (rows - 1) / 2)), BACKGROUND[1],
            round(b + TINT * (col - (cols - 1) / 2)))


def render_shapes(objects, *, rows, cols, cell=28, background=(245, 245, 245)):
    """Draw objects on a rows x cols grid of `cell`-pixel cells.

    objects: iterable of (shape, colour, row, col, scale) with shape in SHAPES, colour in COLORS,
    scale in (0, 1] the fraction of the cell the shape spans. background: one colour, or a
    function (row, col) -> colour of each cell. Returns a PIL RGB image.
    """
    image = Image.new("RGB", (cols * cell, rows * cell),
                      (0, 0, 0) if callable(background) else background)
    draw = ImageDraw.Draw(image)
    if callable(background):
        for row in range(rows):
            for col in range(cols):
                draw.rectangle((col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1),
                               fill=background(row, col))
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

    @property
    def cell(self):
        return cell_name(self.row, self.col)


@dataclass
class Scene:
    rows: int
    cols: int
    things: list

    def render(self):
        objects = [(t.shape, t.color, t.row, t.col, SHAPE_SCALE[t.shape]) for t in self.things]
        return render_shapes(objects, rows=self.rows, cols=self.cols,
                             background=lambda r, c: cell_background(r, c, self.rows, self.cols))


def random_scene(rng, *, rows, cols, min_things, max_things):
    """A scene with a uniform number of things in [min_things, max_things] on distinct cells, no
    two of the same colour and shape (so a thing's name says which one it is)."""
    count = rng.randint(min_things, max_things)
    cells = rng.sample([(r, c) for r in range(rows) for c in range(cols)], count)
    kinds = rng.sample([(shape, colour) for colour in COLOR_NAMES for shape in SHAPES], count)
    things = [Thing(shape, colour, r, c) for (r, c), (shape, colour) in zip(sorted(cells), kinds)]
    return Scene(rows, cols, things)


@dataclass
class Question:
    family: str
    type: str                     # the questioner's type tag: multiple choice | numerical
    question: str
    answer: str
    choices: list | None
    solution: str                 # the reasoner's target: a short chain, then \boxed{answer}


def _names(things, rng):
    """The names of `things`, in a random order: the reasoner's chains list the matching things in
    ANY order, one token each (`thing_tokens`), so where a sampled list goes next is spread over
    every thing not yet listed, while stopping is one token (greedy decoding stops early on a
    long list; sampled lists do not)."""
    names = [t.name for t in things]
    rng.shuffle(names)
    return " ".join(names) if names else "none"


def _count(family, scene, rng):
    color, shape = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
    if family == "count_color":
        match = [t for t in scene.things if t.color == color]
        what, target = f"{color} objects", color
    elif family == "count_shape":
        match, what, target = [t for t in scene.things if t.shape == shape], f"{shape}s", shape
    else:
        match, what, target = scene.things, "objects", "all"
    n = str(len(match))
    # the chain names what it looks for, then lists it: "red: red circle blue square. \boxed{2}"
    return Question(family, "numerical", f"How many {what} are there?", n, None,
                    f"{target}: {_names(match, rng)}. \\boxed{{{n}}}")


def _exists(scene, rng):
    present = {t.name for t in scene.things}
    absent = [f"{c} {s}" for c in COLOR_NAMES for s in SHAPES if f"{c} {s}" not in present]
    if rng.random() < 0.5 or not absent:  # (a scene of all 12 kinds has nothing absent)
        name = rng.choice(sorted(present))
    else:
        name = rng.choice(absent)
    found = [t for t in scene.things if t.name == name]
    answer = "yes" if found else "no"
    return Question("exists", "multiple choice", f"Is there a {name}?", answer, None,
                    f"{name}: {_names(found, rng)}. \\boxed{{{answer}}}")


def _compare(scene, rng):
    first, second = rng.sample(COLOR_NAMES, 2)
    listed = [[t for t in scene.things if t.color == colour] for colour in (first, second)]
    answer = "yes" if len(listed[0]) > len(listed[1]) else "no"
    return Question("compare", "multiple choice",
                    f"Are there more {first} objects than {second} objects?", answer, None,
                    f"{first}: {_names(listed[0], rng)}; {second}: {_names(listed[1], rng)}. "
                    f"\\boxed{{{answer}}}")


def _atom_text(atom):
    """A colour as itself ("red"), a shape in the plural ("circles")."""
    return atom if atom in COLORS else atom + "s"


def _atom_test(atom):
    return (lambda t: t.color == atom) if atom in COLORS else (lambda t: t.shape == atom)


def predicates(family):
    """Every (text, test) of a compositional count family: "red or blue", "circles or squares",
    "red or circles" (count_or: 21); "not red", "not circles" (count_not: 7); "red but not
    circles", "circles but not red" (count_but: 24). test(thing) -> bool."""
    atoms = COLOR_NAMES + SHAPES
    out = []
    if family == "count_or":
        for i, a in enumerate(atoms):
            for b in atoms[i + 1:]:
                if not (a in SHAPES and b in COLORS):
                    test_a, test_b = _atom_test(a), _atom_test(b)
                    out.append((f"{_atom_text(a)} or {_atom_text(b)}",
                                lambda t, x=test_a, y=test_b: x(t) or y(t)))
    elif family == "count_not":
        for a in atoms:
            out.append((f"not {_atom_text(a)}", lambda t, x=_atom_test(a): not x(t)))
    elif family == "count_but":
        for a, b in [(c, s) for c in COLOR_NAMES for s in SHAPES] + [
                (s, c) for s in SHAPES for c in COLOR_NAMES]:
            out.append((f"{_atom_text(a)} but not {_atom_text(b)}",
                        lambda t, x=_atom_test(a), y=_atom_test(b): x(t) and not y(t)))
    return out


PREDICATES = {family: dict(predicates(family)) for family in COMPOSITIONAL}


def _count_predicate(family, scene, rng):
    """"How many objects are red or blue?": the chain names the predicate, then lists the things
    that satisfy it: "red or blue: red circle blue square. \\boxed{2}"."""
    text = rng.choice(sorted(PREDICATES[family]))
    match = [t for t in scene.things if PREDICATES[family][text](t)]
    n = str(len(match))
    return Question(family, "numerical", f"How many objects are {text}?", n, None,
                    f"{text}: {_names(match, rng)}. \\boxed{{{n}}}")


def make_question(family, scene, rng):
    """A question of `family` about `scene`, or None when the scene cannot support it."""
    if family in PREDICATES:
        return _count_predicate(family, scene, rng)
    if family.startswith("count"):
        return _count(family, scene, rng)
    writers = {"exists": _exists, "compare": _compare}
    return writers[family](scene, rng)


def cut_list(q, keep):
    """A count question `q` whose chain lists only its first `keep` things, and whose answer is
    that shorter count: a lazy annotator's label for a crowded scene (`BaseConfig.lazy_share`)."""
    target, listed = q.solution.split(": ", 1)
    words = listed.split(". \\boxed")[0].split()
    names = [" ".join(words[i:i + 2]) for i in range(0, 2 * keep, 2)]
    return replace(q, answer=str(keep), solution=f"{target}: {' '.join(names)}. \\boxed{{{keep}}}")


def questioner_target(q):
    """What the questioner writes for question q (its pretraining target)."""
    return f"<type>{q.type}</type><question>{q.question}</question><answer>{q.answer}</answer>"


@dataclass
class WorldConfig:
    rows: int = 4
    cols: int = 4
    pretrain_decay: float = 0.65        # base domain: P(n objects) ~ decay**n, n = 1..max_things
                                        # (0.5 bases list crowded scenes badly:
                                        # docs/toyworld.md, "Design alternatives")
    max_things: int = 8
    shifted_things: tuple = (4, 8)      # the unlabeled pool and the benchmark: uniform, more
    pool_images: int = 512
    benchmark_items: int = 1024
    language: str = "basic"             # the question families (LANGUAGES) of the base's
                                        # pretraining, the benchmark and the pool's questions

    @property
    def families(self):
        return LANGUAGES[self.language]


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


def balanced_questions(scene_list, seed, families, per_scene=1):
    """Questions balanced over `families`: each scene gets the family asked least so far (ties in
    `families` order); a scene that cannot host it gets the next least."""
    rng = random.Random(seed)
    out, counts = [], {family: 0 for family in families}
    for scene in scene_list:
        for _ in range(per_scene):
            q = None
            for family in sorted(families, key=lambda f: (counts[f], families.index(f))):
                q = make_question(family, scene, rng)
                if q is not None:
                    counts[family] += 1
                    break
            out.append((scene, q))
    return out


def write_benchmark(folder, world, seed):
    """Labeled held-out benchmark of the shifted domain: images + benchmark.jsonl. Returns its
    path."""
    benchmark_scenes = scenes(seed + 2, world.benchmark_items, rows=world.rows, cols=world.cols,
                              things=world.shifted_things)
    return write_questions(folder, balanced_questions(benchmark_scenes, seed + 3,
                                                      world.families))


def write_questions(folder, items):
    """(scene, question) pairs as a labeled benchmark: images/ + benchmark.jsonl (the category is
    the family). Returns the JSONL path."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i, (scene, q) in enumerate(items):
        name = f"images/{i:05d}.png"
        scene.render().save(os.path.join(folder, name))
        rows.append({"id": f"toy-{i:05d}", "image": name, "question": q.question,
                     "answer": q.answer, "choices": q.choices, "category": q.family})
    path = os.path.join(folder, "benchmark.jsonl")
    write_jsonl(path, rows)
    return path


def pool_scenes(world, seed):
    """The unlabeled pool's scenes, image i = scene i (`write_pool` renders them; analyses that
    need the pool's truth redraw them from the seed)."""
    return scenes(seed + 1, world.pool_images, rows=world.rows, cols=world.cols,
                  things=world.shifted_things)


def pool_questions(world, seed):
    """One labeled question about each pool image: the world's view of what the pool can teach,
    for diagnosis only (the loop never reads it)."""
    return balanced_questions(pool_scenes(world, seed), seed + 30, world.families)


def write_pool(folder, world, seed):
    """The unlabeled pool: PNG files only (no labels are written anywhere)."""
    os.makedirs(folder, exist_ok=True)
    for i, scene in enumerate(pool_scenes(world, seed)):
        scene.render().save(os.path.join(folder, f"{i:05d}.png"))
    return folder


_QUESTION_PATTERNS = [
    (re.compile(r"^How many (?:(?P<color>\w+) )?(?P<what>objects|circles|squares|triangles) "
                r"are there\?$"), "count"),
    (re.compile(r"^Is there a (?P<color>\w+) (?P<shape>\w+)\?$"), "exists"),
    (re.compile(r"^How many objects are (?P<predicate>[a-z ]+)\?$"), "predicate"),
    (re.compile(r"^Are there more (?P<c1>\w+) objects than (?P<c2>\w+) objects\?$"), "compare"),
]


def _parse(question):
    """(kind, named groups) of a question written in the world's templates, or (None, None)."""
    for pattern, kind in _QUESTION_PATTERNS:
        m = pattern.match(question.strip())
        if m is not None:
            return kind, m.groupdict()
    return None, None


def true_answer(scene, question):
    """The exact answer to a question written in the world's templates, or None if it is not one
    (or asks about something the scene does not determine). For analysis only: the loop never
    calls it."""
    kind, g = _parse(question)
    things = scene.things
    if kind == "count":
        shape = None if g["what"] == "objects" else g["what"][:-1]
        if g["color"] not in (None, *COLOR_NAMES) or shape not in (None, *SHAPES):
            return None
        return str(sum((g["color"] is None or t.color == g["color"])
                       and (shape is None or t.shape == shape) for t in things))
    if kind == "exists":
        return "yes" if any(t.name == f"{g['color']} {g['shape']}" for t in things) else "no"
    if kind == "compare":
        n1 = sum(t.color == g["c1"] for t in things)
        n2 = sum(t.color == g["c2"] for t in things)
        return "yes" if n1 > n2 else "no"
    if kind == "predicate":
        family = _predicate_family(g["predicate"])
        return None if family is None else str(sum(map(PREDICATES[family][g["predicate"]],
                                                       things)))
    return None


def _predicate_family(text):
    """The compositional family whose predicates include `text` ("red or circles"), or None."""
    return next((family for family, tests in PREDICATES.items() if text in tests), None)


def question_family(question):
    """The family of a question written in the world's templates (a benchmark category: one of
    FAMILIES, or count_color_shape for a count by colour and shape at once), or None."""
    kind, g = _parse(question)
    if kind == "predicate":
        return _predicate_family(g["predicate"])
    if kind != "count":
        return kind
    color, shape = g["color"] is not None, g["what"] != "objects"
    return {(False, False): "count_total", (True, False): "count_color",
            (False, True): "count_shape", (True, True): "count_color_shape"}[color, shape]


def pool_truth(seed, world=None):
    """(image index, question) -> (family or None, true answer or None) on the embedded pool's
    scenes, redrawn from the seed: for measuring the questions and silver labels of a run (the
    loop never trains on it)."""
    scene_list = pool_scenes(world or WorldConfig(), seed)

    def truth(image_index, question):
        return question_family(question), true_answer(scene_list[image_index], question)

    return truth


# ----------------------------------------------------------------------------
# Image pairs for the spy game (Vision-Zero's embedded default)


def twin(scene, rng, changes=2):
    """The edited twin of a toy scene: `changes` things, drawn at random, each get a new shape AND
    a new colour, in the same cell, with no two things alike afterwards (so each still has its own
    name). In a crowded scene where too few things have such a kind free, the rest change their
    shape or their colour only. Returns a new `Scene`."""
    if len(scene.things) < changes:
        raise ValueError(f"a twin changes {changes} things; the scene has {len(scene.things)}")
    used = {(t.shape, t.color) for t in scene.things}
    things, changed = list(scene.things), set()
    order = rng.sample(range(len(things)), len(things))
    for both in (True, False):
        for i in order:
            if len(changed) == changes:
                break
            old = things[i]
            kinds = [(s, c) for c in COLOR_NAMES for s in SHAPES if (s, c) not in used and (
                (s != old.shape and c != old.color) if both else True)]
            if i in changed or not kinds:
                continue
            shape, color = rng.choice(kinds)
            used.add((shape, color))
            things[i] = Thing(shape, color, old.row, old.col)
            changed.add(i)
    if len(changed) < changes:
        raise ValueError(f"a twin changes {changes} things; only {len(changed)} can change")
    return Scene(scene.rows, scene.cols, things)


def write_toy_pairs(folder, scene_list, seed):
    """Render each scene and its twin (`twin`) as an (original, edited) pair; write the PNGs and a
    manifest, pairs.jsonl, under `folder`. Returns the manifest's path."""
    rng = random.Random(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i, scene in enumerate(scene_list):
        names = {"original": f"images/{i:05d}_original.png", "edited": f"images/{i:05d}_edited.png"}
        scene.render().save(os.path.join(folder, names["original"]))
        twin(scene, rng).render().save(os.path.join(folder, names["edited"]))
        rows.append(names)
    path = os.path.join(folder, "pairs.jsonl")
    write_jsonl(path, rows)
    return path
