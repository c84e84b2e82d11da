"""Planted ground truth: models whose circuit is known by construction, with active distractors.

Three hand-set GPT-2 models, each a task and a shipped reference model of the same name:

- ``planted-induction``: a previous-token head feeds an induction head through its key;
- ``planted-ioi``: a duplicate-token head marks the repeated name, an inhibition head moves that
  name to the last position, and a name mover copies the name that is *not* inhibited;
- ``planted-mlp``: two heads move two digits to the last position, where an MLP looks up their
  sum modulo 5 (a function no linear read-out of the two digits computes) for the logits.

Every model also has distractor heads and MLPs. They are *active*: they attend, read tokens or
circuit signals that differ between clean and corrupted prompts, and write non-zero outputs.
They are *not causal*: they write into residual dimensions that nothing on the way to the logits
reads. A method that scores "how much a component does" instead of "how much the answer depends
on it" ranks them high; exact edge patching gives them exactly zero.

How the models stay exact (one-hot writes, LayerNorm gains set to the last bit, sharp
attention, AND neurons) is explained in `circuits.handset`, the canvas they are drawn on.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import OptionError
from .handset import BALLAST as BALLAST  # re-exported, as is LOGIT_SCALE: tests read them
from .handset import EOS, SHARP, UNK, Canvas, identity, same_pairs, shift_pairs
from .handset import LOGIT_SCALE as LOGIT_SCALE
from .model import Model
from .task import Example
from .zoo import models_dir

NAMES = ("planted-induction", "planted-ioi", "planted-mlp")


# -- planted-induction ---------------------------------------------------------------------------
IND_WORDS = ("ash", "bay", "cod", "dew", "elk", "fig", "gum", "hay", "ink", "jam")
IND_VOCAB = (EOS, UNK, *IND_WORDS)
IND_LENGTH = 8  # BOS, six distinct words, then a repeat of one of the first five

#: Circuit edges of ``planted-induction`` under resample ablation. The previous-token head's
#: query and key read only positions, which clean and corrupted prompts share, so those edges
#: carry nothing that differs; the induction head's key reads the previous-token head's block.
INDUCTION_EDGES = frozenset({
    "input->a0.h0<v>", "a0.h0->a1.h0<k>", "input->a1.h0<q>", "input->a1.h0<v>", "a1.h0->logits",
})


def _induction_model() -> Model:
    v = len(IND_VOCAB)
    c = Canvas(IND_VOCAB, IND_LENGTH, n_layers=2, n_heads=2, blocks={
        "PREV": v, "J0": v, "M0": 4, "OUT": v, "J1": 4, "M1": 3,
    })
    p = IND_LENGTH
    # a0.h0 previous-token head: position p attends to p - 1 and copies its token.
    c.head(0, 0, [("pairs", "POS", "POS", shift_pairs(p), SHARP)], ("TOK", "PREV", identity))
    # a0.h1 distractor: attends to itself and copies its token (differs clean vs corrupt).
    c.head(0, 1, [("pairs", "POS", "POS", same_pairs(range(p)), SHARP)], ("TOK", "J0", identity))
    # m0 distractor: a function of that copy.
    c.mlp(0, ["J0"], lambda j: j % 4, "M0")
    # a1.h0 induction head: the current token matches the key whose previous token is the
    # same; with no match it falls back to the first token. It copies the token found.
    c.head(1, 0, [("pairs", "TOK", "PREV", same_pairs(range(v)), SHARP),
                  ("const", "POS", [0], SHARP / 2)], ("TOK", "OUT", identity))
    # a1.h1 distractor: attends to itself and copies m0's output.
    c.head(1, 1, [("pairs", "POS", "POS", same_pairs(range(p)), SHARP)], ("M0", "J1", identity))
    # m1 distractor: reads the circuit's previous-token signal and a1.h1's output.
    c.mlp(1, ["PREV", "J1"], lambda a, b: (a + b) % 3, "M1")
    return c.build("planted-induction", "OUT")


def _induction_examples(rng: random.Random, n: int) -> list[Example]:
    def draw() -> tuple[list[str], int]:
        words = rng.sample(IND_WORDS, IND_LENGTH - 2)
        return words, rng.randint(0, IND_LENGTH - 4)  # repeat one of the first five

    out = []
    for _ in range(n):
        words, i = draw()
        other, j = draw()
        while (other, j) == (words, i):  # rare; a pair that patching cannot tell apart
            other, j = draw()
        clean = " ".join([EOS, *words, words[i]])
        corrupt = " ".join([EOS, *other, other[j]])
        answer = words[i + 1]
        wrong = tuple(" " + w for w in words if w != answer)
        out.append(Example(clean, corrupt, (" " + answer,), wrong))
    return out


# -- planted-ioi ---------------------------------------------------------------------------------
IOI_NAMES = ("Mary", "John", "Anna", "Paul", "Lucy", "Mark", "Rose", "Adam")
IOI_FILLERS = ("When", "and", "went", ",", "gave", "it", "to")
IOI_VOCAB = (EOS, UNK, *IOI_FILLERS, *IOI_NAMES)
IOI_TEMPLATE = "{eos} When {a} and {b} went , {s} gave it to"
IOI_LENGTH = 11  # positions: A at 2, B at 4, S at 7, "to" at 10

#: Circuit edges of ``planted-ioi``: the duplicate-token head's query and key (tokens), its
#: mark into the inhibition head's key, the inhibition head's value (the repeated name), its
#: output into the name mover's query, the mover's key and value (names), and the mover's
#: output into the logits. The duplicate head's value reads only positions (shared by clean
#: and corrupted prompts), so that edge is not part of the circuit.
IOI_EDGES = frozenset({
    "input->a0.h0<q>", "input->a0.h0<k>", "a0.h0->a1.h0<k>", "input->a1.h0<v>",
    "a1.h0->a2.h0<q>", "input->a2.h0<k>", "input->a2.h0<v>", "a2.h0->logits",
})


def _ioi_model() -> Model:
    v, p = len(IOI_VOCAB), IOI_LENGTH
    names = [IOI_VOCAB.index(w) for w in IOI_NAMES]
    c = Canvas(IOI_VOCAB, p, n_layers=3, n_heads=2, blocks={
        "DUP": p, "J0": v, "M0": 4, "INH": v, "J1": 4, "M1": 3, "MOVE": v, "J2": 3, "M2": 4,
    })
    # a0.h0 duplicate-token head: a name attends to an earlier copy of itself (its own
    # position is excluded), else to the first token; it writes the position it found.
    c.head(0, 0, [("pairs", "TOK", "TOK", same_pairs(names), SHARP),
                  ("pairs", "POS", "POS", same_pairs(range(p)), -SHARP),
                  ("const", "POS", [0], SHARP / 2)], ("POS", "DUP", identity))
    # a0.h1 distractor: previous-token copy.
    c.head(0, 1, [("pairs", "POS", "POS", shift_pairs(p), SHARP)], ("TOK", "J0", identity))
    # m0 distractor: a function of the current token.
    c.mlp(0, ["TOK"], lambda t: t % 4, "M0")
    # a1.h0 inhibition head: attends to the position marked as a duplicate (else the first
    # token) and moves the repeated name there into INH.
    c.head(1, 0, [("const", "DUP", list(range(1, p)), SHARP),
                  ("const", "POS", [0], SHARP / 2)], ("TOK", "INH", identity))
    # a1.h1 distractor: attends to the first name's position, copies m0's output there.
    c.head(1, 1, [("const", "POS", [2], SHARP), ("const", "POS", [0], SHARP / 2)],
           ("M0", "J1", identity))
    # m1 distractor: reads the duplicate mark and a1.h1's output.
    c.mlp(1, ["DUP", "J1"], lambda a, b: (a + b) % 3, "M1")
    # a2.h0 name mover: attends to names, except the inhibited one (-2 SHARP), with a tie-break
    # for the first name (SHARP / 2) so that it stays sharp when nothing is inhibited; copies
    # the name it attends to.
    c.head(2, 0, [("const", "TOK", names, SHARP),
                  ("pairs", "INH", "TOK", same_pairs(names), -2 * SHARP),
                  ("const", "POS", [2], SHARP / 2),
                  ("const", "POS", [0], SHARP / 2)], ("TOK", "MOVE", identity))
    # a2.h1 distractor: attends to itself, copies m1's output.
    c.head(2, 1, [("pairs", "POS", "POS", same_pairs(range(p)), SHARP)], ("M1", "J2", identity))
    # m2 distractor: reads the inhibited name and a2.h1's output.
    c.mlp(2, ["INH", "J2"], lambda a, b: (a + b) % 4, "M2")
    return c.build("planted-ioi", "MOVE")


def _ioi_examples(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        a, b = rng.sample(IOI_NAMES, 2)
        s, io = (a, b) if rng.random() < 0.5 else (b, a)
        # ABC corruption with three fresh names: no name repeats, so nothing is inhibited.
        x, y, z = rng.sample([w for w in IOI_NAMES if w not in (a, b)], 3)
        clean = IOI_TEMPLATE.format(eos=EOS, a=a, b=b, s=s)
        corrupt = IOI_TEMPLATE.format(eos=EOS, a=x, b=y, s=z)
        out.append(Example(clean, corrupt, (" " + io,), (" " + s,)))
    return out


# -- planted-mlp ---------------------------------------------------------------------------------
MLP_DIGITS = ("0", "1", "2", "3", "4")
MLP_VOCAB = (EOS, UNK, *MLP_DIGITS, "plus", "is")
MLP_LENGTH = 5  # BOS a plus b is

#: Circuit edges of ``planted-mlp``: the two mover heads' values (the digits), their outputs
#: into m0, and m0's output (the sum modulo 5) into the logits.
MLP_EDGES = frozenset({
    "input->a0.h0<v>", "input->a0.h1<v>", "a0.h0->m0", "a0.h1->m0", "m0->logits",
})


def _mlp_model() -> Model:
    v, p = len(MLP_VOCAB), MLP_LENGTH
    c = Canvas(MLP_VOCAB, p, n_layers=2, n_heads=3, blocks={
        "X": v, "Y": v, "J0": v, "ANS": v, "J1": v, "J2": v, "J3": v, "M1": 3,
    })
    first = MLP_VOCAB.index("0")

    def add(a: int, b: int) -> int:
        """The token of (a + b) mod 5 when both are digits; else the first token."""
        if first <= a < first + 5 and first <= b < first + 5:
            return first + (a + b - 2 * first) % 5
        return 0

    fallback = ("const", "POS", [0], SHARP / 2)
    # a0.h0 / a0.h1: the last position attends to position 1 / 3 and copies the digit there.
    c.head(0, 0, [("const", "POS", [1], SHARP), fallback], ("TOK", "X", identity))
    c.head(0, 1, [("const", "POS", [3], SHARP), fallback], ("TOK", "Y", identity))
    # a0.h2 distractor: previous-token copy.
    c.head(0, 2, [("pairs", "POS", "POS", shift_pairs(p), SHARP)], ("TOK", "J0", identity))
    # m0: the sum modulo 5 of the two digits, the answer the unembedding reads.
    c.mlp(0, ["X", "Y"], add, "ANS")
    # Layer 1 is all distractors: they read the circuit's blocks and write where no one looks.
    c.head(1, 0, [("const", "POS", [1], SHARP), fallback], ("X", "J1", identity))
    c.head(1, 1, [("pairs", "POS", "POS", same_pairs(range(p)), SHARP)], ("ANS", "J2", identity))
    c.head(1, 2, [("const", "POS", [2], SHARP), fallback], ("J0", "J3", identity))
    c.mlp(1, ["ANS", "J1"], lambda a, b: (a + 2 * b) % 3, "M1")
    return c.build("planted-mlp", "ANS")


def _mlp_examples(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        a, b = rng.randrange(5), rng.randrange(5)
        # both digits change, so each operand's path matters on its own
        x = rng.choice([d for d in range(5) if d != a])
        y = rng.choice([d for d in range(5) if d != b])
        answer = MLP_DIGITS[(a + b) % 5]
        clean = f"{EOS} {a} plus {b} is"
        corrupt = f"{EOS} {x} plus {y} is"
        wrong = tuple(" " + d for d in MLP_DIGITS if d != answer)
        out.append(Example(clean, corrupt, (" " + answer,), wrong))
    return out


# -- the registry --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planted:
    """A planted model: how to build it, its prompts and its known circuit.

    Attributes
    ----------
    name : str
        Task and model name, e.g. ``"planted-ioi"``.
    description : str
        One line for ``circuits tasks``.
    build : callable
        ``build() -> Model`` (the hand-set weights and a word-level tokenizer).
    examples : callable
        ``examples(rng, n) -> list[Example]`` clean/corrupted prompt pairs.
    edges : frozenset of str
        The circuit: every edge whose resample ablation changes the answer.
    """

    name: str
    description: str
    build: Callable[[], Model]
    examples: Callable[[random.Random, int], list[Example]]
    edges: frozenset[str]


PLANTED: dict[str, Planted] = {
    p.name: p for p in (
        Planted("planted-induction",
                "planted induction: prev-token head -> induction head (key); known circuit",
                _induction_model, _induction_examples, INDUCTION_EDGES),
        Planted("planted-ioi",
                "planted IOI: duplicate-token -> inhibition -> name mover; known circuit",
                _ioi_model, _ioi_examples, IOI_EDGES),
        Planted("planted-mlp",
                "planted MLP: two heads move digits, an MLP adds them mod 5; known circuit",
                _mlp_model, _mlp_examples, MLP_EDGES),
    )
}


def _get(name: str) -> Planted:
    if name not in PLANTED:
        raise OptionError(f"unknown planted model {name!r}; use one of {', '.join(PLANTED)}")
    return PLANTED[name]


def true_edges(name: str) -> frozenset[str]:
    """Return the known circuit of a planted model as edge names.

    Parameters
    ----------
    name : str
        ``"planted-induction"``, ``"planted-ioi"`` or ``"planted-mlp"``.

    Returns
    -------
    frozenset of str
        Every edge whose resample ablation alone changes the logit difference; every other edge
        changes it by float rounding only.

    Examples
    --------
    >>> sorted(true_edges("planted-mlp"))
    ['a0.h0->m0', 'a0.h1->m0', 'input->a0.h0<v>', 'input->a0.h1<v>', 'm0->logits']
    """
    return _get(name).edges


def planted_model(name: str) -> Model:
    """Build a planted model in memory (the same weights as the shipped folder).

    Parameters
    ----------
    name : str
        A name from `NAMES`.

    Returns
    -------
    Model
        A hand-set `transformers.GPT2LMHeadModel` with its word-level tokenizer.

    Examples
    --------
    >>> model = planted_model("planted-mlp")
    >>> ids = model.tokenize(["<|endoftext|> 3 plus 4 is"])
    >>> model.tokenizer.decode(int(model.hf(ids).logits[0, -1].argmax()))
    '2'
    """
    return _get(name).build()


def planted_examples(name: str, n: int, seed: int = 0) -> list[Example]:
    """Draw `n` clean/corrupted prompt pairs of a planted task.

    Parameters
    ----------
    name : str
        A name from `NAMES`.
    n : int
        Number of examples.
    seed : int
        Generator seed.

    Returns
    -------
    list of Example

    Examples
    --------
    >>> example = planted_examples("planted-ioi", 1, seed=0)[0]
    >>> example.clean.split()[-4] == example.wrong[0].strip()  # the repeated name is wrong
    True
    """
    return _get(name).examples(random.Random(seed), n)


def save(name: str, folder: str | os.PathLike[str]) -> Path:
    """Write a planted model as a Hugging Face folder that `circuits.load_model` reads.

    The folder is written next to its destination and moved into place, so an interrupted save
    leaves the previous folder as it was.

    Parameters
    ----------
    name : str
        A name from `NAMES`.
    folder : path-like
        Destination folder (replaced if it exists).

    Returns
    -------
    pathlib.Path
        The folder.
    """
    import json

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model = planted_model(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the zoo folder is shared
        model.hf.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
        config = tmp / "tokenizer_config.json"
        record = json.loads(config.read_text(encoding="utf-8"))
        record["tokenizer_class"] = "PreTrainedTokenizerFast"  # known to transformers 4 and 5
        record.pop("backend", None)
        config.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def main(argv: list[str] | None = None) -> None:
    """Write every planted model into the zoo folder: ``python -m circuits.planted``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--out", type=Path, default=models_dir(), help="parent folder")
    args = parser.parse_args(argv)
    for name in NAMES:
        print(save(name, args.out / name))


if __name__ == "__main__":
    main()
