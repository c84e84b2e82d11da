"""circuits: causal circuit discovery for Hugging Face transformer language models.

The pipeline is a handful of verbs: `load_model`, define or pick a task, `score` its edges with
a method, select a circuit, `evaluate` it, render or export it.
"""

from .batch import Batch
from .engine import Engine, Trace
from .errors import (
    CircuitFileError,
    CircuitsError,
    ModelLoadError,
    OptionError,
    TaskError,
    UnsupportedModelError,
)
from .graph import Edge, Graph, Node
from .model import Model, load_model
from .scores import Scores

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "CircuitFileError",
    "CircuitsError",
    "Edge",
    "Engine",
    "Graph",
    "Model",
    "ModelLoadError",
    "Node",
    "OptionError",
    "Scores",
    "TaskError",
    "Trace",
    "UnsupportedModelError",
    "load_model",
    "__version__",
]
