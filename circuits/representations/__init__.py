"""What hidden states encode, and changing them: probes, steering vectors and concept erasure.

- `labels`: texts with a class label each and where to read them (`labeled_set`: a JSONL file
  or a built-in label set such as ``ioi``, ``factual`` and ``years``).
- `activations`: the residual stream at chosen layers and positions of those texts.
- `probe` and `probe_report`: linear and MLP probes per layer, with control tasks and
  selectivity.
- `steer` and `steer_report`: steering directions from contrastive pairs, applied with a scale,
  and their price over a sweep, with generations.
- `erase` and `erase_report`: concept erasure with LEACE, checked by probes, and its cost.
- `effects`: what an edit of the residual does to a task's metric, the next-token
  distribution and the loss on neutral text (shared by steering and erasure).
- `planted`: a small model with a direction planted by construction, for tests and examples.

Layer ``L`` means the residual stream after decoder layer ``L`` (the site ``resid.L`` of
`circuits.features.sites`). scikit-learn and concept-erasure are imported by the functions that
use them, not here.

Examples
--------
>>> from circuits.representations import planted_direction, hidden_states, fit_probe
>>> p = planted_direction()
>>> x, y = hidden_states(p.model, p.labeled, [1])[0], p.labeled.y
>>> probe = fit_probe(x[:150], y[:150], x[150:], y[150:])
>>> probe.accuracy > 0.9, float(probe.direction @ p.direction) > 0.9
(True, True)
"""

from .activations import hidden_states
from .effects import NeutralMeter, TaskMeter
from .erase import Eraser, erasing, fit_eraser
from .erase_report import Erasure, erase_concept
from .labels import LABEL_SETS, Labeled, labeled_set, read_labeled
from .planted import planted_direction
from .probe import ProbeFit, fit_probe
from .probe_report import ProbeResult, load_probe, probe_layers
from .steer import Direction, find_direction, read_contrast
from .steer_report import SteerSweep, generate, side_by_side, steering_sweep

__all__ = ["LABEL_SETS", "Direction", "Eraser", "Erasure", "Labeled", "NeutralMeter",
           "ProbeFit", "ProbeResult", "SteerSweep", "TaskMeter", "erase_concept", "erasing",
           "find_direction", "fit_eraser", "fit_probe", "generate", "hidden_states",
           "labeled_set", "load_probe", "planted_direction", "probe_layers", "read_contrast",
           "read_labeled", "side_by_side", "steering_sweep"]
