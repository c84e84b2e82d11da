"""Edits measured as the editing papers measure them (CounterFact, Meng et al., 2022), before
and after: efficacy, paraphrase generalisation, neighbourhood specificity, fluency and the
loss on neutral text.

- efficacy: the new target's first token has a higher logit than the old one's after the
  edit prompt (the old target is the given true one, else the model's prediction before);
- paraphrase: the share of the paraphrase prompts where the same holds;
- neighbourhood: the share of the neighbour prompts (other subjects) whose top token is the
  one it was before the edit;
- fluency: generation entropy, the weighted mean of the bigram and trigram entropies (bits)
  of greedy continuations of the edit prompts and paraphrases (`ngram_entropy`); a model that
  repeats itself after an edit scores lower;
- neutral loss: next-token loss (nats) on neutral text
  (`circuits.representations.effects.NeutralMeter`).

`Evaluator` measures the unedited model once (old targets, neighbours' top tokens), then
measures the model as its weights are at each call, e.g. inside
`circuits.editing.edits.applied`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from circuits.editing.edits import Edit, target_ids
from circuits.editing.score import FactEdit
from circuits.errors import OptionError
from circuits.model import Model
from circuits.representations.effects import NeutralMeter
from circuits.tables import text_table
from circuits.task_tokens import prefix_ids

__all__ = ["ngram_entropy", "greedy", "EditScore", "Snapshot", "Evaluator", "EditEvaluation"]

_WORDS = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                  weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Generation entropy of one text: the mean over ``n`` of ``weight_n * H_n``, where
    ``H_n`` is the entropy (bits) of the frequencies of the text's word n-grams (words and
    punctuation marks), with ROME's weights 2/3 and 4/3 for bigrams and trigrams.

    A text too short for any n-gram of a size adds 0 for it.

    Examples
    --------
    >>> ngram_entropy("a a a a a")  # one bigram, one trigram: nothing varies
    0.0
    >>> round(ngram_entropy("a b a b"), 4)  # H2 of (2/3, 1/3), H3 of (1/2, 1/2) = 1 bit
    0.9728
    """
    words = _WORDS.findall(text)
    terms = []
    for n, weight in zip(ns, weights, strict=True):
        counts = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(weight * h)
    return sum(terms) / len(terms) + 0.0  # + 0.0: no negative zero


def greedy(model: Model, prompts: Sequence[str], tokens: int, batch_size: int = 32
           ) -> list[list[int]]:
    """Each prompt's token ids (after the model's BOS prefix) followed by `tokens` greedily
    generated ones (fewer where the context ends).

    The prompts run in right-padded batches, the whole sequence each step: a row's pad tokens
    come after its own, so under the causal mask they change nothing it reads.

    Examples
    --------
    >>> from circuits.representations.planted import planted_direction
    >>> model = planted_direction().model
    >>> out = greedy(model, ["the word is", "the word"], 2)
    >>> [len(ids) for ids in out]
    [5, 4]
    """
    tok, lead = model.tokenizer, prefix_ids(model.tokenizer)
    seqs = [lead + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    limit = model.context_length
    dev = model.device
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(map(len, chunk)) + tokens
        width = min(width, limit) if limit is not None else width
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=dev)
        for i, seq in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq, device=dev)
        ends = torch.tensor([len(s) for s in chunk], device=dev)  # [rows]: next position
        for _ in range(tokens):
            grow = ends < width
            if not bool(grow.any()):
                break
            used = int(ends.max())
            mask = (torch.arange(used, device=dev)[None, :] < ends[:, None]).long()
            with torch.no_grad():
                logits = model.hf(ids[:, :used], attention_mask=mask).logits  # [rows, pos, vocab]
            rows = torch.arange(len(chunk), device=dev)[grow]
            ids[rows, ends[grow]] = logits[rows, ends[grow] - 1].argmax(-1)
            ends = ends + grow.long()
        out += [row[:end].tolist() for row, end in zip(ids.cpu(), ends.tolist(), strict=True)]
    return out


@dataclass(frozen=True)
class EditScore:
    """One edit measured on the model as it is.

    Attributes
    ----------
    efficacy : bool
        The new target's first token beats the old one's after the edit prompt.
    p_new : float
        The probability of the new target's first token there.
    paraphrase : float or None
        The share of paraphrase prompts where the new target beats the old (None: none given).
    neighbourhood : float or None
        The share of neighbour prompts whose top token is unchanged (None: none given).
    """

    efficacy: bool
    p_new: float
    paraphrase: float | None
    neighbourhood: float | None


@dataclass(frozen=True)
class Snapshot:
    """Every edit measured on one state of the model, and the model-wide figures.

    Attributes
    ----------
    edits : tuple of EditScore
    fluency : float
        Mean generation entropy of the greedy continuations (`ngram_entropy`).
    neutral_loss : float
        Next-token loss on the neutral text (nats).
    """

    edits: tuple[EditScore, ...]
    fluency: float
    neutral_loss: float

    @property
    def efficacy(self) -> float:
        """The share of edits whose new target beats the old."""
        return sum(e.efficacy for e in self.edits) / len(self.edits)

    @property
    def paraphrase(self) -> float | None:
        """The mean paraphrase score over the edits that have paraphrases."""
        return _mean([e.paraphrase for e in self.edits])

    @property
    def neighbourhood(self) -> float | None:
        """The mean neighbourhood score over the edits that have neighbours."""
        return _mean([e.neighbourhood for e in self.edits])

    def to_dict(self) -> dict[str, Any]:
        """The averages, the model-wide figures and each edit's scores."""
        return {"efficacy": self.efficacy, "paraphrase": self.paraphrase,
                "neighbourhood": self.neighbourhood, "fluency": self.fluency,
                "neutral_loss": self.neutral_loss,
                "edits": [{"efficacy": e.efficacy, "p_new": e.p_new,
                           "paraphrase": e.paraphrase, "neighbourhood": e.neighbourhood}
                          for e in self.edits]}


def _mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None (None when all are)."""
    given = [v for v in values if v is not None]
    return sum(given) / len(given) if given else None


class Evaluator:
    """Measures edits on a model: the unedited model once, at construction, then the model as
    its weights are at each call.

    Parameters
    ----------
    model : Model
    cases : sequence of FactEdit
        The edits with their paraphrases, neighbours and (optional) old targets.
    neutral : sequence of str, optional
        Neutral text for the loss (default: the package's sample of English).
    tokens : int
        New tokens each fluency continuation has (fewer where the context ends first).
    batch_size : int
    names : sequence of str, optional
        Where each edit came from, for messages (default: ``edit 1``, ``edit 2``, ...).

    Raises
    ------
    OptionError
        The model already predicts an edit's new target where no old target is given (the
        edit changes nothing to measure), or the neutral text is too short.

    Examples
    --------
    >>> from circuits import load_model
    >>> from circuits.editing.edit_files import parse_fact
    >>> model = load_model("factual-gpt2-4l")
    >>> case = parse_fact("Big Ben | The landmark Big Ben is located in the city of | Rome")
    >>> meter = Evaluator(model, [case], tokens=4)
    >>> model.tokenizer.decode(meter.old[0])  # the prediction before the edit
    'London'
    >>> meter.before.efficacy
    0.0
    """

    def __init__(self, model: Model, cases: Sequence[FactEdit],
                 neutral: Sequence[str] | None = None, tokens: int = 20, batch_size: int = 32,
                 names: Sequence[str] | None = None):
        self.model, self.cases = model, list(cases)
        self.tokens, self.batch_size = tokens, batch_size
        self.new = [target_ids(model, c.edit)[0] for c in self.cases]
        top = self._top([c.edit.prompt for c in self.cases])
        names = names or [f"edit {i}" for i in range(1, len(self.cases) + 1)]
        self.old = []
        for case, new, predicted, where in zip(self.cases, self.new, top, names, strict=True):
            if case.old is not None:
                self.old.append(target_ids(model, Edit(case.edit.subject, case.edit.prompt,
                                                       case.old))[0])
            elif predicted == new:
                raise OptionError(f"{where}: the model already predicts "
                                  f"{case.edit.target!r} after {case.edit.prompt!r}; give the "
                                  "true target as \"old\" or choose another new target")
            else:
                self.old.append(predicted)
        self.neighbours = [self._top(c.neighbours) for c in self.cases]
        self.meter = NeutralMeter(model, neutral)
        self.before = self()

    def __call__(self) -> Snapshot:
        """Every edit and the model-wide figures, measured with the weights as they are now."""
        scores = []
        for case, new, old, kept in zip(self.cases, self.new, self.old, self.neighbours,
                                        strict=True):
            logits = self._last_logits([case.edit.prompt, *case.paraphrases])  # [1 + p, vocab]
            beats = (logits[:, new] > logits[:, old]).tolist()
            p_new = float(logits[0].softmax(-1)[new])
            now = self._top(case.neighbours)
            scores.append(EditScore(
                bool(beats[0]), p_new, _share(beats[1:]),
                _share([a == b for a, b in zip(now, kept, strict=True)])))
        texts = [p for c in self.cases for p in (c.edit.prompt, *c.paraphrases)]
        fluency = sum(ngram_entropy(t) for t in self._continue(texts)) / len(texts)
        return Snapshot(tuple(scores), fluency, self.meter(None).loss)

    def _continue(self, prompts: list[str]) -> list[str]:
        """Each prompt with its greedy continuation (`greedy`), as text."""
        tok, lead = self.model.tokenizer, len(prefix_ids(self.model.tokenizer))
        return [tok.decode(ids[lead:], skip_special_tokens=True)
                for ids in greedy(self.model, prompts, self.tokens, self.batch_size)]

    def _top(self, prompts: Sequence[str]) -> list[int]:
        """The top next token after each prompt."""
        return self._last_logits(prompts).argmax(-1).tolist() if prompts else []

    def _last_logits(self, prompts: Sequence[str]) -> Tensor:
        """The next-token logits ``[prompts, vocab]`` after each prompt (right-padded batches)."""
        tok, lead = self.model.tokenizer, prefix_ids(self.model.tokenizer)
        seqs = [lead + tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        out = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            width = max(map(len, chunk))
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, seq in enumerate(chunk):
                ids[i, :len(seq)], mask[i, :len(seq)] = torch.tensor(seq), 1
            ids, mask = ids.to(self.model.device), mask.to(self.model.device)
            with torch.no_grad():
                logits = self.model.hf(ids, attention_mask=mask).logits.float()
            last = torch.tensor([len(s) - 1 for s in chunk], device=ids.device)
            out.append(logits[torch.arange(len(chunk), device=ids.device), last].cpu())
        return torch.cat(out)


def _share(flags: Sequence[bool]) -> float | None:
    """The share of true flags (None for none)."""
    return sum(flags) / len(flags) if flags else None


@dataclass(frozen=True)
class EditEvaluation:
    """The edits measured before and after.

    Attributes
    ----------
    cases : tuple of FactEdit
    before, after : Snapshot
    """

    cases: tuple[FactEdit, ...]
    before: Snapshot
    after: Snapshot

    def summary(self) -> str:
        """The averages before and after, as a text table."""
        rows = []
        for name, what in (("efficacy", "new target beats the old on the edit prompt"),
                           ("paraphrase", "... on the paraphrases"),
                           ("neighbourhood", "neighbour prompts keep their top token")):
            b, a = getattr(self.before, name), getattr(self.after, name)
            rows.append([name, _percent(b), _percent(a), what])
        rows.append(["fluency", f"{self.before.fluency:.3f}", f"{self.after.fluency:.3f}",
                     "generation entropy (bits; lower: repetitive)"])
        rows.append(["neutral loss", f"{self.before.neutral_loss:.4f}",
                     f"{self.after.neutral_loss:.4f}", "next-token loss on neutral text (nats)"])
        return text_table(rows, header=("measure", "before", "after", "what"))

    def table(self) -> str:
        """Each edit before and after, as a text table."""
        rows = []
        for i, (case, b, a) in enumerate(zip(self.cases, self.before.edits, self.after.edits,
                                             strict=True), 1):
            rows.append([str(i), _clip(case.edit.subject), _clip(case.edit.target),
                         f"{_yes(b.efficacy)} -> {_yes(a.efficacy)}",
                         f"{b.p_new:.3f} -> {a.p_new:.3f}",
                         f"{_percent(b.paraphrase)} -> {_percent(a.paraphrase)}",
                         _percent(a.neighbourhood)])
        return text_table(rows, header=("#", "subject", "new target", "efficacy", "p(new)",
                                        "paraphrase", "neighbourhood"))

    def to_dict(self) -> dict[str, Any]:
        """Before and after, for JSON."""
        return {"before": self.before.to_dict(), "after": self.after.to_dict()}


def _percent(value: float | None) -> str:
    """A share as a percentage, or a dash for none."""
    return "-" if value is None else f"{100 * value:.0f}%"


def _yes(flag: bool) -> str:
    """yes or no."""
    return "yes" if flag else "no"


def _clip(text: str, width: int = 24) -> str:
    """`text` cut to `width` characters with an ellipsis."""
    return text if len(text) <= width else text[:width - 1] + "…"
