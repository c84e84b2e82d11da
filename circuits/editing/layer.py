"""Where to edit: the layers an edit may change, checked before any work, and the layer causal
tracing finds the subject recalled at (ROME's choice) or the range around it (MEMIT's).

ROME edits the MLP whose output at the subject's last token, restored in a subject-noised run,
gives back the most of the model's answer (Meng et al., 2022, Figure 1: the "early site").
`choose_layer` traces the edit prompts with `circuits.reading.tracing.causal_trace` and takes
that MLP; `memit_layers` takes the layers up to it (MEMIT spreads its change over the MLPs that
carry the recall, ending at the peak).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from circuits.editing.edits import Edit, check_edits
from circuits.errors import OptionError
from circuits.example import Example
from circuits.model import Model
from circuits.nodes import NodeSites

__all__ = ["LAST_SUBJECT", "check_layers", "choose_layer", "memit_layers", "layer_effects"]

# the causal trace's row for the subject's last token (a one-token subject is its own last)
LAST_SUBJECT = "last subject token"


def check_layers(model: Model, layers: Sequence[int]) -> list[int]:
    """The layers, sorted without repeats; one line when one is out of range or there are none.

    Examples
    --------
    >>> from circuits.testing import tiny_model
    >>> check_layers(tiny_model("gpt2"), [1, 0, 1])
    [0, 1]
    >>> check_layers(tiny_model("gpt2"), [5])
    Traceback (most recent call last):
    ...
    circuits.errors.OptionError: layer 5 is out of range; tiny-gpt2 has layers 0 to 1
    """
    n = NodeSites.of(model).n_layers
    if not layers:
        raise OptionError("no layers given; pass the layer (or range of layers) to edit")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise OptionError(f"layer {layer} is out of range; {model.name} has layers 0 to "
                              f"{n - 1}")
    return sorted(set(layers))


def layer_effects(model: Model, edits: Sequence[Edit], samples: int = 10, seed: int = 0,
                  most: int = 20) -> torch.Tensor:
    """The mean indirect effect ``[n_layers]`` of restoring each MLP (one layer at a time) at
    the subject's last token of the edit prompts, on the model's current answer to each.

    At most `most` prompts are traced, drawn with a seeded ``random.Random`` (a trace costs
    ``samples`` runs per prompt and layer; the peak of 20 prompts' mean is already clear).

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> edit = Edit("Big Ben", "The landmark Big Ben is located in the city of", "Rome")
    >>> layer_effects(model, [edit], samples=3).shape
    torch.Size([4])
    """
    from circuits.reading.tracing import causal_trace

    check_edits(model, edits)
    chosen = list(edits) if len(edits) <= most else random.Random(seed).sample(list(edits), most)
    examples = [_traced(model, edit) for edit in chosen]
    trace = causal_trace(model, examples, samples=samples, window=1, kinds=("mlp",), seed=seed)
    if LAST_SUBJECT in trace.labels:
        row = trace.labels.index(LAST_SUBJECT)
    else:  # one prompt: a row per token, the subject's marked with "*"
        row = max(i for i, label in enumerate(trace.labels) if label.endswith("*"))
    return trace.single["mlp"][:, row].float()


def choose_layer(model: Model, edits: Sequence[Edit], samples: int = 10, seed: int = 0) -> int:
    """ROME's layer for `edits`: the MLP whose restoration at the subject's last token gives
    back the most of the answer (`layer_effects`, ROME's 10 noise samples by default). The
    last layer is never chosen: its MLP output at the subject reaches no later token.

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> edit = Edit("Big Ben", "The landmark Big Ben is located in the city of", "Rome")
    >>> choose_layer(model, [edit])
    0
    """
    effects = layer_effects(model, edits, samples, seed)
    return int(effects[:-1].argmax()) if len(effects) > 1 else 0


def memit_layers(model: Model, edits: Sequence[Edit], samples: int = 10, seed: int = 0,
                 span: int | None = None) -> list[int]:
    """MEMIT's layers for `edits`: `span` layers ending at `choose_layer`'s (fewer where that
    is one of the first layers); `span` defaults to a quarter of the layers, at least 2.

    Examples
    --------
    >>> from circuits import load_model
    >>> model = load_model("factual-gpt2-4l")
    >>> edit = Edit("Big Ben", "The landmark Big Ben is located in the city of", "Rome")
    >>> memit_layers(model, [edit])  # this model's peak is its first layer
    [0]
    """
    n = NodeSites.of(model).n_layers
    span = max(2, n // 4) if span is None else span
    peak = choose_layer(model, edits, samples, seed)
    return list(range(max(0, peak - span + 1), peak + 1))


def _traced(model: Model, edit: Edit) -> Example:
    """The edit prompt as a causal-tracing example whose answer is the model's own."""
    with torch.no_grad():
        top = int(model.hf(model.tokenize([edit.prompt])).logits[0, -1].argmax())
    answer = model.tokenizer.decode([top])
    # tracing reads only the clean prompt; the corrupted one must merely differ from it and
    # have its token length
    tok = model.tokenizer
    length = len(tok(edit.prompt, add_special_tokens=False)["input_ids"])
    for other in (edit.prompt[0].swapcase() + edit.prompt[1:],
                  edit.prompt[:-1] + edit.prompt[-1].swapcase(), edit.prompt[::-1]):
        if other != edit.prompt and len(tok(other, add_special_tokens=False)["input_ids"]) \
                == length:
            return Example(edit.prompt, other, (answer,), meta={"subject": edit.subject})
    raise OptionError(f"could not trace {edit.prompt!r} to choose the layer; give the layer to "
                      "edit (--layer)")
