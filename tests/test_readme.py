"""The README's map of the code cannot rot: every `module.name` it names exists; each step of "The
algorithm, step by step" and of "One GRPO step" names exactly one function, the same functions, in
the same order, as the docstrings of visplay.py and grpo.py; the deviations list is the one that
opens visplay.py; the test command is the one CI runs."""

import dataclasses
import importlib
import os
import re
import typing

import grpo
import visplay
from config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "README.md")) as f:
    README = f.read()
MODULES = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")}
FILE_ENDINGS = {"py", "yaml", "yml", "json", "jsonl", "md", "tsv", "txt", "png", "parquet"}
REFERENCE = re.compile(r"`(\w+)\.(\w+)`")


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


def step_functions(title):
    """[(bold title, "module.function")] of the numbered steps of a README section; each step must
    name exactly one function, in brackets right after its bold title."""
    steps = []
    for number, title_text, bracket in re.findall(r"^(\d+)\. \*\*(.+?)\*\* \(([^)]*)\)",
                                                  section(title), re.MULTILINE):
        assert int(number) == len(steps) + 1, f"{title}: step {number} is out of order"
        names = REFERENCE.findall(bracket)
        assert len(names) == 1, f"{title}, step {number}: names {names}, not exactly one function"
        steps.append((title_text, ".".join(names[0])))
    return steps


def test_every_module_function_the_readme_names_exists():
    keys = config_keys()
    checked = 0
    for module, name in REFERENCE.findall(README):
        if module not in MODULES or name in FILE_ENDINGS or f"{module}.{name}" in keys:
            continue
        assert hasattr(importlib.import_module(module), name), f"README names {module}.{name}"
        checked += 1
    assert checked >= 40  # the map is really being read


def test_each_step_is_one_function_as_the_docstrings_number_them():
    loop = step_functions("The algorithm, step by step")
    assert [name for _, name in loop] == ["visplay.train_questioner", "visplay.generate_questions",
                                         "visplay.label_questions", "visplay.train_reasoner",
                                         "visplay.evaluate_reasoner"]
    # visplay.py's docstring numbers the same functions the same way, and each says its number
    numbered = re.findall(r"^  (\d)\. `(\w+)`", visplay.__doc__, re.MULTILINE)
    assert numbered == [(str(n), name.split(".")[1]) for n, (_, name) in enumerate(loop, 1)]
    for n, (_, name) in enumerate(loop, 1):
        assert getattr(visplay, name.split(".")[1]).__doc__.startswith(f"Step {n}:"), name

    update = step_functions("One GRPO step")
    assert [name for _, name in update] == ["grpo.group_advantages", "grpo.score_rollout",
                                           "grpo.policy_loss", "grpo.grpo_update"]
    numbered = re.findall(r"^(\d)\. `(\w+)`", grpo.__doc__, re.MULTILINE)
    assert numbered == [(str(n), name.split(".")[1]) for n, (_, name) in enumerate(update, 1)]
    for _, name in loop + update:
        module, function = name.split(".")
        assert callable(getattr(importlib.import_module(module), function)), name


def test_deviations_are_the_same_list_in_the_readme_and_visplay():
    in_readme = re.findall(r"^- \*\*(.+?)\*\*:", section("Deviations from the released code"),
                           re.MULTILINE)
    docstring = visplay.__doc__.split("Deviations from the released code", 1)[1]
    docstring = docstring.split("\n\n", 1)[0]
    in_visplay = re.findall(r"^- ([^:\n]+):", docstring, re.MULTILINE)
    assert len(in_readme) == 9 and in_readme == in_visplay


def test_the_readme_test_command_is_the_one_ci_runs():
    commands = re.findall(r"^pip install -r requirements.txt && (.+)$", section("Two commands"),
                          re.MULTILINE)
    assert commands == ["python visplay.py --config config.yaml", "python -m pytest -q"]
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert f.read().strip().splitlines()[-1] == "python -m pytest -q"
