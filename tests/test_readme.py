"""The README's map of the code cannot rot: every `module.name` or `folder.module.name` that the
README and docs/ name exists (a reference into a project module is never skipped); each step of
"The algorithm, step by step" and of "One GRPO step" names exactly one function, the same
functions, in the same order, as the docstrings of visplay.py and grpo.py; the deviations list is
the one that opens visplay.py; the test command is the one CI runs; the README is a ten-minute
read and every link stays inside the repository."""

import dataclasses
import importlib
import os
import re
import typing

import grpo
import visplay
from config import Config
from test_layout import project_modules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", name)
                              for name in os.listdir(os.path.join(ROOT, "docs"))
                              if name.endswith(".md"))
TEXTS = {}
for name in DOCS:
    with open(os.path.join(ROOT, name)) as f:
        TEXTS[name] = f.read()
README = TEXTS["README.md"]
MODULES = set(project_modules())
# the last part of every module inside a folder ("inputs" for models.inputs): written alone, it
# would be a reference the map could not check
SHORT_NAMES = {m.rpartition(".")[2] for m in MODULES if "." in m} - MODULES
FILE_ENDINGS = {"py", "yaml", "yml", "json", "jsonl", "md", "tsv", "txt", "png", "parquet"}
REFERENCE = re.compile(r"`([A-Za-z_]\w*(?:\.\w+)+)`")


def section(title):
    """The README's text under the heading `title`, up to the next heading."""
    match = re.search(rf"^#+ {re.escape(title)}\n", README, re.MULTILINE)
    assert match, f"the README has no section {title!r}"
    rest = README[match.end():]
    end = re.search(r"^#+ ", rest, re.MULTILINE)
    return rest[:end.start()] if end else rest


def config_keys():
    """"section.key" of every config knob (`data.images` is a key, not a function)."""
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)
                if dataclasses.is_dataclass(hints[f.name])]
    return {f"{name}.{field.name}"
            for name in sections for field in dataclasses.fields(hints[name])}


def resolve(reference):
    """The object a dotted reference names: the longest prefix that is a project module, then
    attributes. None when the reference does not start with a project module."""
    parts = reference.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in MODULES:
            target = importlib.import_module(module)
            for attribute in parts[cut:]:
                assert hasattr(target, attribute), f"{reference}: {attribute!r} does not exist"
                target = getattr(target, attribute)
            return target
    return None


def step_functions(title):
    """[(bold title, "module.function")] of the numbered steps of a README section; each step must
    name exactly one function, in brackets right after its bold title."""
    steps = []
    for number, title_text, bracket in re.findall(r"^(\d+)\. \*\*(.+?)\*\* \(([^)]*)\)",
                                                  section(title), re.MULTILINE):
        assert int(number) == len(steps) + 1, f"{title}: step {number} is out of order"
        names = REFERENCE.findall(bracket)
        assert len(names) == 1, f"{title}, step {number}: names {names}, not exactly one function"
        assert callable(resolve(names[0])), names[0]
        steps.append((title_text, names[0]))
    return steps


def test_resolve_follows_packages():
    assert resolve("models.inputs.collate_groups") is importlib.import_module(
        "models.inputs").collate_groups
    assert resolve("run.Run.open_stage") is importlib.import_module("run").Run.open_stage
    assert resolve("torch.compile") is None
    try:
        resolve("models.inputs.no_such_function")
    except AssertionError as error:
        assert "no_such_function" in str(error)
    else:
        raise AssertionError("a missing name resolved")


def test_every_module_function_the_docs_name_exists():
    keys = config_keys()
    checked, short = 0, []
    for name, text in TEXTS.items():
        for reference in REFERENCE.findall(text):
            first, _, last = reference.partition(".")
            if reference in keys or reference.rpartition(".")[2] in FILE_ENDINGS:
                continue
            if first in SHORT_NAMES:
                short.append(f"{name}: {reference}")
            if resolve(reference) is not None:
                checked += 1
    assert not short, f"write the folder too (models.inputs.collate, not inputs.collate): {short}"
    assert checked >= 60  # the map is really being read


def test_each_step_is_one_function_as_the_docstrings_number_them():
    loop = step_functions("The algorithm, step by step")
    assert [name for _, name in loop] == ["visplay.train_questioner", "visplay.generate_questions",
                                         "visplay.label_questions", "visplay.train_reasoner",
                                         "eval.evaluate_reasoner"]
    # visplay.py's docstring numbers the same functions the same way, and each says its number
    numbered = re.findall(r"^  (\d)\. `(\w+)`", visplay.__doc__, re.MULTILINE)
    assert numbered == [(str(n), name.rpartition(".")[2]) for n, (_, name) in enumerate(loop, 1)]
    for n, (_, name) in enumerate(loop, 1):
        assert resolve(name).__doc__.startswith(f"Step {n}:"), name

    update = step_functions("One GRPO step")
    assert [name for _, name in update] == ["grpo.group_advantages", "grpo.score_rollout",
                                           "grpo.policy_loss", "grpo.grpo_update"]
    numbered = re.findall(r"^(\d)\. `(\w+)`", grpo.__doc__, re.MULTILINE)
    assert numbered == [(str(n), name.rpartition(".")[2]) for n, (_, name) in enumerate(update, 1)]


def test_deviations_are_the_same_list_in_the_readme_and_visplay():
    in_readme = re.findall(r"^- \*\*(.+?)\*\*:", section("Deviations from the released code"),
                           re.MULTILINE)
    docstring = visplay.__doc__.split("Deviations from the released code", 1)[1]
    docstring = docstring.split("\n\n", 1)[0]
    in_visplay = re.findall(r"^- ([^:\n]+):", docstring, re.MULTILINE)
    assert len(in_readme) == 11 and in_readme == in_visplay


def test_the_readme_test_command_is_the_one_ci_runs():
    commands = re.findall(r"^pip install -r requirements.txt && (.+)$", section("Two commands"),
                          re.MULTILINE)
    assert commands == ["python visplay.py --config config.yaml", "python -m pytest -q"]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert f.read().strip().splitlines()[-1] == "python -m pytest -q"


def test_the_readme_is_a_ten_minute_read_and_links_stay_inside():
    assert len(README.splitlines()) <= 300
    for name, text in TEXTS.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            assert not re.match(r"[a-z]+:", target), f"{name} links outside: {target}"
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(name),
                                                 target.split("#")[0]))
            assert path.startswith(ROOT + os.sep) and os.path.exists(path), f"{name}: {target}"
