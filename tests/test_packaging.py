"""A plain (non-editable) install carries the reference models and page template."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

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
