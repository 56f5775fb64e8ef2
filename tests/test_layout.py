"""The layout keeps its promises: imports run one way (no module imports a module that imports it
back, lazy imports included), readers of files and rules modules import no model code, and the top
level holds at most 16 modules."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED = {"tests", "docs", "runs", "__pycache__"}  # folders that hold no project module
# Modules that read files or state rules: they must work without the model code (models/) and
# without loading torch or transformers.
NO_MODEL_CODE = ["answers", "benchmark_files", "config", "data", "guard", "rewards", "summary",
                 "toyworld.world", "vision_zero.rules"]


def project_modules():
    """{dotted module name: file path} of every .py file of the project (packages by folder)."""
    modules = {}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED and not d.startswith(".")
                         and "venv" not in d]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
    return modules


def import_graph(modules):
    """{module: set of project modules it imports}, from every import statement of its file,
    those inside functions (lazy imports) included. `from a import b` is an edge to module a.b
    when that is a module, else to a."""
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:  # a.b.function -> a.b -> a
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph):
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def reachable(graph, module):
    seen, todo = set(), [module]
    while todo:
        for target in graph[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_cycle_finder_finds_cycles_of_any_length():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_reads_lazy_and_from_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "leaf.py").write_text("import os\n")
    (tmp_path / "top.py").write_text("def f():\n    from pkg import leaf\n"
                                     "    from pkg.leaf import x\n")
    modules = {"pkg": str(tmp_path / "pkg" / "__init__.py"),
               "pkg.leaf": str(tmp_path / "pkg" / "leaf.py"), "top": str(tmp_path / "top.py")}
    assert import_graph(modules) == {"pkg": set(), "pkg.leaf": set(), "top": {"pkg.leaf"}}


def test_imports_run_one_way():
    graph = import_graph(project_modules())
    assert {"visplay", "grpo", "models.families", "vision_zero.train", "toyworld.base"} <= set(
        graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_file_readers_and_rules_import_no_model_code():
    graph = import_graph(project_modules())
    for module in NO_MODEL_CODE:
        models = sorted(m for m in reachable(graph, module) if m.split(".")[0] == "models")
        assert not models, f"{module} imports model code: {models}"
    # and none of them loads torch or transformers when imported
    code = ("import sys\n" + "".join(f"import {m}\n" for m in NO_MODEL_CODE)
            + "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_the_game_rules_do_not_depend_on_the_toy_world():
    graph = import_graph(project_modules())
    assert not [m for m in reachable(graph, "vision_zero.rules") if m.startswith("toyworld")]


def test_the_top_level_is_the_architecture():
    top = sorted(name for name in os.listdir(ROOT) if name.endswith(".py"))
    assert len(top) <= 16, top
    for module in ("visplay", "grpo", "rewards", "roles", "data", "eval"):
        assert f"{module}.py" in top
