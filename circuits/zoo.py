"""The model zoo: small reference models shipped with the built-in tasks.

Each model lives in ``circuits/tasks/models/<name>/`` of the installed package (config.json,
model.safetensors, tokenizer.json, card.json) and loads offline with
``transformers.AutoModelForCausalLM.from_pretrained(folder)``. ``card.json`` records how the
model was trained and what it scores on held-out prompts of its task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path


@dataclass(frozen=True)
class ModelCard:
    """What a shipped reference model is and how well it does its task.

    Attributes
    ----------
    name : str
        Zoo name, e.g. ``"ioi-gpt2-4l"``.
    task : str
        The built-in task it was trained on.
    layers, heads, width : int
        Transformer shape.
    params : int
        Number of parameters.
    size_mb : float
        Size of the model folder in MiB.
    accuracy : float
        Fraction of held-out prompts whose answer logit beats every wrong token's.
    logit_diff : float
        Mean logit difference on the held-out prompts.
    path : pathlib.Path
        The model folder.
    """

    name: str
    task: str
    layers: int
    heads: int
    width: int
    params: int
    size_mb: float
    accuracy: float
    logit_diff: float
    path: Path

    def line(self) -> str:
        """Return a one-line summary, name first (what ``circuits models`` prints)."""
        return (
            f"{self.name}  task={self.task}  {self.layers}L {self.heads}H d={self.width}  "
            f"{self.params / 1e6:.2f}M params  {self.size_mb:.1f} MB  "
            f"heldout acc={self.accuracy:.1%}  logit diff={self.logit_diff:.2f}"
        )


def models_dir() -> Path:
    """Return the folder holding the shipped models (inside the installed package).

    Returns
    -------
    pathlib.Path
    """
    return Path(str(resources.files("circuits.tasks").joinpath("models")))


def find(name: str) -> Path | None:
    """Return the folder of the shipped model called `name`, or None if there is none.

    Parameters
    ----------
    name : str
        A zoo name such as ``"ioi-gpt2-4l"``, or a task name such as ``"ioi"`` (its
        reference model).

    Returns
    -------
    pathlib.Path or None

    Examples
    --------
    >>> find("ioi").name
    'ioi-gpt2-4l'
    >>> find("no-such-model") is None
    True
    """
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    folder = models_dir() / name
    if (folder / "config.json").is_file():
        return folder
    for card in list_models():
        if card.task == name:
            return card.path
    return None


def list_models() -> list[ModelCard]:
    """Return the card of every shipped model, sorted by name.

    Returns
    -------
    list of ModelCard

    Examples
    --------
    >>> [card.name for card in list_models()]
    ['factual-gpt2-4l', 'induction-gpt2-2l', 'ioi-gpt2-4l', 'shortcut-gpt2-2l']
    """
    root = models_dir()
    if not root.is_dir():
        return []
    cards = []
    for path in sorted(root.glob("*/card.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        cards.append(
            ModelCard(
                name=record["name"],
                task=record["task"],
                layers=record["layers"],
                heads=record["heads"],
                width=record["width"],
                params=record["params"],
                size_mb=record["size_mb"],
                accuracy=record["heldout_accuracy"],
                logit_diff=record["heldout_logit_diff"],
                path=path.parent,
            )
        )
    return cards
