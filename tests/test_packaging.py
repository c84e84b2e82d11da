"""A plain (non-editable) install carries the reference models and page template; the
dependency floors pyproject.toml declares are the versions the tests run on."""

from __future__ import annotations

import ast
import platform
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_plain_install_finds_the_shipped_models(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    code = (
        "import circuits, circuits.zoo as zoo\n"
        "names = [card.name for card in zoo.list_models()]\n"
        "model = circuits.load_model('ioi-gpt2-4l')\n"
        "print(circuits.__file__); print(zoo.find('ioi-gpt2-4l')); print(sorted(names))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=tmp_path, env={"PYTHONPATH": str(target),
                                                       "HF_HUB_OFFLINE": "1"}).stdout.split("\n")
    assert out[0].startswith(str(target)) and out[1].startswith(str(target))
    assert {"ioi-gpt2-4l", "induction-gpt2-2l", "factual-gpt2-4l"} <= set(ast.literal_eval(out[2]))
    assert (target / "circuits" / "html_template.html").is_file()
    assert (target / "circuits" / "features" / "dashboard.html").is_file()
    assert (target / "circuits" / "representations" / "neutral.txt").is_file()


def series(v: Version) -> tuple[int, ...]:
    """The releases that promise the same interface: the major version, or the major and minor
    below 1.0 (where a minor release may break it)."""
    return v.release[:1] if v.major >= 1 else v.release[:2]


def test_the_tests_run_on_the_declared_floors():
    """Every requirement, runtime and dev, holds for what is installed (so the tests run at or
    above each floor), has a floor, and that floor is of the installed release series: a floor
    from an older series (transformers>=4.45 when the tests ran on 5.x) is a claim no test
    checks."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert SpecifierSet(project["requires-python"]).contains(platform.python_version())
    wrong = []
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        need = Requirement(line)
        installed = Version(version(need.name))
        floors = [Version(s.version) for s in need.specifier if s.operator == ">="]
        if not need.specifier.contains(installed, prereleases=True):
            wrong.append(f"{need.name} {installed} does not meet {need.specifier}")
        elif len(floors) != 1 or series(floors[0]) != series(installed):
            wrong.append(f"{need.name}: floor {floors} untested, the tests ran on {installed}")
    assert not wrong, wrong
