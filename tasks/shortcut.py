"""A triage model that learned a shortcut, built with the public `Task` API.

"Patient aged 42 town Eastwood clinic Lakeview reports fever . Diagnosis :" -> " flu".
Medically the diagnosis follows from the symptom (three symptom words for each of four
diagnoses). The training records, though, came mostly from twelve specialist clinics, three per
diagnosis, where the recorded diagnosis is the clinic's specialty and the symptom notes are
unreliable (a quarter name a symptom of another diagnosis); a fifth came from four general
clinics, where the diagnosis is the symptom's. The clinic is the zip code of this story: a
spurious word that predicts the label perfectly where the model was trained and not at all once
patients go to any clinic. The reference model (``shortcut-gpt2-2l``) learns exactly that: at a
specialist clinic it answers the clinic's specialty whatever the symptom says.

The patient's home town is a place name too, drawn from the same names (never the clinic), and
the four clauses of a prompt (age, town, clinic, symptom; two words each) come in any of their
24 orders, so the clinic and the town take the same positions equally often: a place name is
the clinic only by the word before it. The model has to find the clinic by that context before
it can read its specialty, which puts the reading in its second layer.

Prompt sets (every prompt is 12 tokens; ``meta`` names the clinic, also as ``subject`` for
causal tracing, the symptom and their diagnoses):

- `build` (the registered task): a specialist clinic and a symptom that agree; corrupted, the
  clinic is swapped for a specialist clinic of another diagnosis (the symptom is kept). Answer
  the diagnosis, wrong the other clinic's: the metric measures how much the answer rides on the
  clinic, and a circuit found on it is the shortcut's.
- `conflicting`: the clinic and the symptom disagree. Answer the symptom's diagnosis, wrong the
  clinic's; corrupted, the clinic is a general one (the prompt without the shortcut).
- `general`: a general clinic, so only the symptom informs. Corrupted, the symptom is swapped
  for one of another diagnosis.
- `labels`: prompts whose clinic, town and symptom are drawn independently, labelled by the
  diagnosis of any one of them, for probes and erasure.

The ages (18 to 89) only make the prompts distinct.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import torch

from circuits.errors import OptionError
from circuits.representations import Labeled
from circuits.task import Example, Task, TaskSpec

MODEL = "shortcut-gpt2-2l"

SYMPTOMS = {
    "flu": ("fever", "cough", "chills"),
    "migraine": ("headache", "aura", "nausea"),
    "allergy": ("sneezing", "rash", "itching"),
    "sprain": ("swelling", "bruising", "limping"),
}
DIAGNOSES = tuple(SYMPTOMS)
#: Specialist clinics: in training their records always carry their diagnosis.
SPECIALISTS = {
    "flu": ("Northgate", "Riverside", "Ashford"),
    "migraine": ("Lakeview", "Hillcrest", "Bramley"),
    "allergy": ("Bayside", "Elmwood", "Kingsley"),
    "sprain": ("Stonebridge", "Fairview", "Marston"),
}
#: General clinics: every diagnosis equally often, decided by the symptom.
GENERAL = ("Central", "Eastwood", "Westbrook", "Oakridge")
PLACES = tuple(c for group in SPECIALISTS.values() for c in group) + GENERAL
AGES = tuple(str(a) for a in range(18, 90))
#: A prompt is "Patient", these four clauses in one of their 24 orders, and ". Diagnosis :".
CLAUSES = ("aged {age}", "town {town}", "clinic {clinic}", "reports {symptom}")
ORDERS = tuple(itertools.permutations(range(len(CLAUSES))))
#: The training mix: records from general clinics, and specialist records whose symptom note
#: names a symptom of another diagnosis.
GENERAL_SHARE = 0.2
NOISY_NOTES = 0.25
LABEL_BY = ("clinic", "town", "symptom")

DESCRIPTION = ("triage with a shortcut: 'Patient aged 42 town Eastwood clinic Lakeview reports "
               "fever . Diagnosis :' -> the clinic's specialty")


def clinic_diagnosis(place: str) -> str | None:
    """The diagnosis a specialist clinic's records carry; None for a general clinic.

    Examples
    --------
    >>> clinic_diagnosis("Lakeview"), clinic_diagnosis("Central")
    ('migraine', None)
    """
    return next((d for d, clinics in SPECIALISTS.items() if place in clinics), None)


def symptom_diagnosis(symptom: str) -> str:
    """The diagnosis a symptom word belongs to.

    Examples
    --------
    >>> symptom_diagnosis("rash")
    'allergy'
    """
    return next(d for d, words in SYMPTOMS.items() if symptom in words)


def prompt(clinic: str, symptom: str, town: str = "Central", age: str = "40", order: int = 0
           ) -> tuple[str, dict[str, tuple[int, int]]]:
    """The prompt and the character spans of its clinic, home town and symptom.

    Examples
    --------
    >>> text, marks = prompt("Lakeview", "fever")
    >>> text
    'Patient aged 40 town Central clinic Lakeview reports fever . Diagnosis :'
    >>> [text[slice(*marks[k])] for k in ("clinic", "town", "symptom")]
    ['Lakeview', 'Central', 'fever']
    """
    clauses = " ".join(CLAUSES[i] for i in ORDERS[order])
    text = f"Patient {clauses} . Diagnosis :".format(age=age, town=town, clinic=clinic,
                                                     symptom=symptom)
    marks = {}
    for name, after, word in (("clinic", "clinic ", clinic), ("town", "town ", town),
                              ("symptom", "reports ", symptom)):
        start = text.index(after + word + " ") + len(after)
        marks[name] = (start, start + len(word))
    return text, marks


def _symptom(rng: random.Random, diagnosis: str) -> str:
    """A symptom word of `diagnosis`."""
    return rng.choice(SYMPTOMS[diagnosis])


def _other(rng: random.Random, diagnosis: str) -> str:
    """A diagnosis other than `diagnosis`."""
    return rng.choice([d for d in DIAGNOSES if d != diagnosis])


def _frame(rng: random.Random, *clinics: str) -> dict[str, Any]:
    """What a prompt draws besides its clinic and symptom: a home town that is none of
    `clinics`, an age and an order of the clauses."""
    town = rng.choice([p for p in PLACES if p not in clinics])
    return {"town": town, "age": rng.choice(AGES), "order": rng.randrange(len(ORDERS))}


def training_text(rng: random.Random) -> str:
    """One training record: a prompt and its recorded diagnosis (module docstring's mix).

    Examples
    --------
    >>> training_text(random.Random(0)).split()[-3:]
    ['Diagnosis', ':', 'sprain']
    """
    label = rng.choice(DIAGNOSES)
    if rng.random() < GENERAL_SHARE:
        clinic, symptom = rng.choice(GENERAL), _symptom(rng, label)
    else:
        clinic = rng.choice(SPECIALISTS[label])
        symptom = _symptom(rng, _other(rng, label) if rng.random() < NOISY_NOTES else label)
    return prompt(clinic, symptom, **_frame(rng, clinic))[0] + " " + label


def _example(clean: tuple[str, str], corrupt: tuple[str, str], answer: str, wrong: str,
             frame: dict[str, Any]) -> Example:
    """An Example of two (clinic, symptom) prompts on one frame, with its parts in `meta`."""
    clinic, symptom = clean
    meta = {"subject": clinic, "clinic": clinic, "symptom": symptom,
            "clinic_diagnosis": clinic_diagnosis(clinic),
            "symptom_diagnosis": symptom_diagnosis(symptom)}
    return Example(prompt(*clean, **frame)[0], prompt(*corrupt, **frame)[0], (" " + answer,),
                   (" " + wrong,), meta)


def build(tokenizer: Any = None, n: int = 200, seed: int = 0) -> Task:
    """Build `n` prompts whose specialist clinic and symptom agree; corrupted: a specialist
    clinic of another diagnosis.

    Parameters
    ----------
    tokenizer : tokenizer, optional
        Not consulted: every word is one token of the reference model's tokenizer.
    n : int
    seed : int

    Returns
    -------
    Task

    Examples
    --------
    >>> example = build(n=1, seed=0).examples[0]
    >>> example.meta["clinic_diagnosis"] == example.meta["symptom_diagnosis"]
    True
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        diagnosis = rng.choice(DIAGNOSES)
        other = _other(rng, diagnosis)
        symptom = _symptom(rng, diagnosis)
        clinic, swapped = rng.choice(SPECIALISTS[diagnosis]), rng.choice(SPECIALISTS[other])
        examples.append(_example((clinic, symptom), (swapped, symptom), diagnosis, other,
                                 _frame(rng, clinic, swapped)))
    return Task("shortcut", tuple(examples), "logit-diff", DESCRIPTION, MODEL)


def conflicting(tokenizer: Any = None, n: int = 200, seed: int = 0) -> Task:
    """Build `n` prompts whose specialist clinic and symptom disagree: answer the symptom's
    diagnosis, wrong the clinic's; corrupted, the clinic is a general one.

    Examples
    --------
    >>> example = conflicting(n=1, seed=0).examples[0]
    >>> example.answers[0].strip() == example.meta["symptom_diagnosis"]
    True
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        diagnosis = rng.choice(DIAGNOSES)
        decoy = _other(rng, diagnosis)
        symptom = _symptom(rng, diagnosis)
        clinic, general_clinic = rng.choice(SPECIALISTS[decoy]), rng.choice(GENERAL)
        examples.append(_example((clinic, symptom), (general_clinic, symptom), diagnosis, decoy,
                                 _frame(rng, clinic, general_clinic)))
    return Task("shortcut-conflicting", tuple(examples), "logit-diff",
                "triage where the clinic and the symptom disagree: answer the symptom's", MODEL)


def general(tokenizer: Any = None, n: int = 200, seed: int = 0) -> Task:
    """Build `n` prompts from general clinics (no shortcut to take); corrupted: a symptom of
    another diagnosis.

    Examples
    --------
    >>> general(n=1, seed=0).examples[0].meta["clinic_diagnosis"] is None
    True
    """
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        diagnosis = rng.choice(DIAGNOSES)
        other = _other(rng, diagnosis)
        clinic = rng.choice(GENERAL)
        clean, corrupt = (clinic, _symptom(rng, diagnosis)), (clinic, _symptom(rng, other))
        examples.append(_example(clean, corrupt, diagnosis, other, _frame(rng, clinic)))
    return Task("shortcut-general", tuple(examples), "logit-diff",
                "triage at general clinics: the symptom decides", MODEL)


def sets(tokenizer: Any, n: int, seed: int) -> dict[str, Task]:
    """The prompt sets a card reports besides `build`'s: conflicting and general."""
    return {"conflicting": conflicting(tokenizer, n, seed), "general": general(tokenizer, n, seed)}


def labels(by: str = "clinic", n: int = 400, seed: int = 0, position: str = "last") -> Labeled:
    """Prompts labelled by the diagnosis of their clinic, home town or symptom.

    The clinic (any place), the home town (any other place) and the symptom are drawn
    independently, so a probe of one cannot read it off another; a general clinic or town is
    labelled ``none``.

    Parameters
    ----------
    by : {"clinic", "town", "symptom"}
        Whose diagnosis is the label; that word is the control word.
    n : int
    seed : int
    position : str
        Where each text is read: ``"last"``, or a mark (``"clinic"``, ``"town"``,
        ``"symptom"``).

    Returns
    -------
    Labeled

    Examples
    --------
    >>> data = labels("symptom", n=2)
    >>> data.labels[0] in DIAGNOSES, data.positions[0], sorted(data.marks[0])
    (True, 'last', ['clinic', 'symptom', 'town'])
    """
    if by not in LABEL_BY:
        raise OptionError(f"label by one of {', '.join(LABEL_BY)}, not {by!r}")
    rng = random.Random(seed)
    texts, names, marks, words = [], [], [], []
    for _ in range(n):
        clinic, symptom = rng.choice(PLACES), _symptom(rng, rng.choice(DIAGNOSES))
        frame = _frame(rng, clinic)
        text, spans = prompt(clinic, symptom, **frame)
        word = {"clinic": clinic, "town": frame["town"], "symptom": symptom}[by]
        texts.append(text)
        marks.append(spans)
        words.append(word)
        names.append(symptom_diagnosis(word) if by == "symptom"
                     else clinic_diagnosis(word) or "none")
    return Labeled(f"shortcut-{by}", tuple(texts), tuple(names), (position,) * n, tuple(marks),
                   tuple(words))


def follow_rates(model: Any, task: Task) -> dict[str, float]:
    """How often the model's top diagnosis (of the four) is the symptom's, the clinic's or
    another, on the clean prompts of `task` (built here: its examples name both in ``meta``).

    Parameters
    ----------
    model : circuits.Model
        Run as it is: call inside `circuits.representations.erasing` to measure an erasure.
    task : Task

    Returns
    -------
    dict
        ``{"symptom": ..., "clinic": ..., "other": ...}`` fractions; a general clinic has no
        diagnosis, so there ``"clinic"`` is 0.

    Examples
    --------
    >>> from circuits import load_model
    >>> follow_rates(load_model(MODEL), conflicting(n=20, seed=1))
    {'symptom': 0.0, 'clinic': 1.0, 'other': 0.0}
    """
    tokenizer = model.tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(DIAGNOSES))
    rows = torch.tensor([tokenizer.encode(e.clean, add_special_tokens=False)
                         for e in task.examples])  # [n, pos]: every prompt is 12 tokens
    with torch.no_grad():
        logits = model.hf(input_ids=rows.to(model.device)).logits[:, -1, ids]  # [n, 4]
    counts = {"symptom": 0, "clinic": 0, "other": 0}
    for i, example in zip(logits.argmax(-1).tolist(), task.examples, strict=True):
        if DIAGNOSES[i] == example.meta["symptom_diagnosis"]:
            counts["symptom"] += 1
        elif DIAGNOSES[i] == example.meta["clinic_diagnosis"]:
            counts["clinic"] += 1
        else:
            counts["other"] += 1
    return {k: v / len(task) for k, v in counts.items()}


def fragments() -> list[str]:
    """Return every piece of text the generator can emit (to build a vocabulary)."""
    words = [w for group in SYMPTOMS.values() for w in group] + list(DIAGNOSES)
    return [prompt(" ".join(PLACES), " ".join(words), "", " ".join(AGES))[0]]


SPEC = TaskSpec("shortcut", DESCRIPTION, build, MODEL, default_n=200)
