"""circuits: causal circuit discovery for Hugging Face transformer language models.

The pipeline is a handful of verbs: `load_model`, define or pick a `Task`, `score` its edges with
a method, `select` a circuit, `evaluate` it, then render or export it.
"""

from .api import discover, score
from .batch import Batch
from .circuit import Circuit, circuit_from_edges, prune, select
from .engine import Engine, Trace
from .errors import (
    BehaviorError,
    CircuitFileError,
    CircuitsError,
    DependencyError,
    ModelLoadError,
    OptionError,
    TaskError,
    UnsupportedModelError,
)
from .evaluate import (
    MIB_FRACTIONS,
    Behavior,
    Curve,
    Evaluation,
    behavior,
    cmd,
    cpr,
    evaluate,
    faithfulness_curve,
    fine_fractions,
    smallest_faithful,
)
from .graph import Edge, Graph, Node
from .io import export, load_circuit, save_circuit
from .methods import available as available_methods
from .metrics import Metric, get_metric
from .model import Model, load_model
from .recovery import pr_curve, precision_recall, roc_auc
from .scores import Scores
from .setup import Setup
from .task import Example, Task, get_task, list_tasks
from .version import __version__ as __version__

__all__ = [
    "MIB_FRACTIONS",
    "Batch",
    "Behavior",
    "BehaviorError",
    "Circuit",
    "CircuitFileError",
    "CircuitsError",
    "Curve",
    "DependencyError",
    "Edge",
    "Engine",
    "Evaluation",
    "Example",
    "Graph",
    "Metric",
    "Model",
    "ModelLoadError",
    "Node",
    "OptionError",
    "Scores",
    "Setup",
    "Task",
    "TaskError",
    "Trace",
    "UnsupportedModelError",
    "__version__",
    "available_methods",
    "behavior",
    "circuit_from_edges",
    "cmd",
    "cpr",
    "discover",
    "evaluate",
    "export",
    "faithfulness_curve",
    "fine_fractions",
    "get_metric",
    "get_task",
    "list_tasks",
    "load_circuit",
    "load_model",
    "pr_curve",
    "precision_recall",
    "prune",
    "roc_auc",
    "save_circuit",
    "score",
    "select",
    "smallest_faithful",
]
