"""The versions requirements.txt states: its exact lock lies inside its supported range, and the
torch and transformers running the tests lie inside it too (so a suite that passes is evidence
for the range it runs on: tested at both ends, the lock and torch 2.11 with transformers 5.17)."""

import os

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REQUIREMENTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "requirements.txt")


def _requirements():
    """({package: SpecifierSet} of the `# supported:` line, {package: pinned version})."""
    supported, pinned = {}, {}
    with open(REQUIREMENTS) as f:
        for line in f:
            line = line.strip()
            if line.startswith("# supported:"):
                for part in line.removeprefix("# supported:").split():
                    name = part[:min(part.index(c) for c in "<>=!~" if c in part)]
                    supported[name] = SpecifierSet(part[len(name):])
            elif "==" in line and not line.startswith("#"):
                name, version = line.split("==")
                pinned[name] = Version(version)
    return supported, pinned


def test_the_supported_line_names_torch_and_transformers_with_both_ends():
    supported, _ = _requirements()
    assert set(supported) == {"torch", "transformers"}
    for spec in supported.values():
        assert {s.operator for s in spec} == {">=", "<"}


def test_the_lock_lies_inside_the_supported_range():
    supported, pinned = _requirements()
    assert {"torch", "transformers"} <= set(pinned)
    for name, spec in supported.items():
        assert pinned[name] in spec, f"{name}=={pinned[name]} outside {spec}"


@pytest.mark.parametrize("name, version", [("torch", torch.__version__),
                                           ("transformers", transformers.__version__)])
def test_the_running_versions_lie_inside_the_supported_range(name, version):
    supported, _ = _requirements()
    assert Version(Version(version).base_version) in supported[name], (
        f"{name} {version} is outside requirements.txt's supported range {supported[name]}")
