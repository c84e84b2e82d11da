"""Knowledge editing: write new facts into a model with ROME or MEMIT, and measure the edits as
the editing papers do.

- `edits`: an `Edit` (subject, prompt, new target), its checks, and putting weight changes in
  (`applied` for a block, `edited` for a copy).
- `rome` and `memit`: the weight changes that write one fact (a rank-one change of one MLP) or
  many at once (spread over a range of layers).
- `layer`: where to edit, from causal tracing of the edit prompts (`choose_layer`,
  `memit_layers`).
- `stats`: the MLP output projections and the key covariance, cached on disk by model
  fingerprint.
- `evaluate` and `score`: CounterFact's measures before and after (efficacy, paraphrase,
  neighbourhood, fluency, neutral loss); counterfactual edits of the factual task.
- `edit_files`, `folder`, `report`: edits from the command line or JSONL, the edited model's
  Hugging Face folder and its record.

Examples
--------
>>> import tempfile
>>> from circuits import load_model
>>> from circuits.editing import Edit, applied
>>> from circuits.editing.rome import rome
>>> from circuits.tasks.factual import sentences
>>> model = load_model("factual-gpt2-4l")
>>> prompt = "The landmark Big Ben is located in the city of"
>>> deltas = rome(model, Edit("Big Ben", prompt, "Rome"), 0, sentences(),
...               cache=tempfile.mkdtemp())
>>> with applied(model, deltas):
...     model.tokenizer.decode(model.hf(model.tokenize([prompt])).logits[0, -1].argmax())
'Rome'
"""

from .edits import Edit, applied, edited
from .evaluate import EditEvaluation, Evaluator
from .layer import choose_layer, memit_layers
from .rome import ValueOptions

# the functions `rome` and `memit` stay in their modules: bound here, they would hide the
# modules of the same name (``import circuits.editing.rome as m`` would give the function)
__all__ = ["Edit", "applied", "edited", "ValueOptions", "choose_layer", "memit_layers",
           "Evaluator", "EditEvaluation"]
