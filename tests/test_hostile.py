"""Mistaken and hostile inputs, tried as a new user would: every one ends in exit status 2 and one
line ``circuits: error: ...`` (no traceback), before anything is written to the output folder;
through the Python API, in a `CircuitsError`.

Each case builds its inputs in a fresh folder (bad task files, broken model folders, edited
circuit files), runs the CLI in-process and checks the status, the single line, the words the
line must contain, and that the output path is as it was: absent, or for an existing file,
unchanged.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_feature_files import feature_file

from circuits import cli
from circuits.errors import CircuitsError
from circuits.io import export_mib, load_circuit
from circuits.zoo import find

IOI = "ioi-gpt2-4l"


@dataclass(frozen=True)
class Case:
    """One hostile input: `argv(files)` gives the command line (``{out}`` stands for the output
    path), `words` must appear in the error line."""

    name: str
    argv: Callable[[Files], list[str]]
    words: tuple[str, ...] = ()


class Files:
    """The inputs a case may point at, made in its own folder on demand."""

    def __init__(self, root: Path, circuit: Path) -> None:
        self.root = root
        self.circuit = circuit

    def path(self, name: str) -> str:
        return str(self.root / name)

    def text(self, name: str, text: str) -> str:
        (self.root / name).write_text(text, encoding="utf-8")
        return self.path(name)

    def raw(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return self.path(name)

    def task(self, *records: dict | str, name: str = "task.jsonl") -> str:
        """A JSONL task: dicts as JSON lines, strings as they are, then three good lines (so
        only the bad line is wrong)."""
        lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
        lines += [json.dumps(GOOD)] * 3
        return self.text(name, "\n".join(lines) + "\n")

    def good(self, **change: object) -> dict:
        """A valid example for the IOI model's vocabulary, with `change` applied."""
        record = dict(GOOD)
        record.update(change)
        return record

    def model(self, name: str = "model") -> Path:
        """A copy of the IOI reference model's folder, to break."""
        folder = self.root / name
        shutil.copytree(find(IOI), folder)
        return folder

    def edited_circuit(self, edit: Callable[[dict], None]) -> str:
        doc = json.loads(self.circuit.read_text("utf-8"))
        edit(doc)
        # bare NaN on purpose: a hand-edited or foreign file may hold it
        return self.text("edited.json", json.dumps(doc))

    @property
    def marker(self) -> Path:
        return self.root / "MARKER"

    def payload(self) -> bytes:
        """A pickle that creates the marker file when unpickled."""
        return pickle.dumps(_Payload(str(self.marker)))


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # noqa: D105
        return (os.system, (f"touch {self.path}",))


GOOD = {"clean": "When Mary and John went to the store, John gave a drink to",
        "corrupt": "When Mary and John went to the store, Mary gave a drink to",
        "answers": [" Mary"], "wrong": [" John"]}


def discover(task: str, *flags: str) -> Callable[[Files], list[str]]:
    return lambda f: ["discover", task, "--out", "{out}", *flags]


def discover_file(make: Callable[[Files], str], *flags: str) -> Callable[[Files], list[str]]:
    return lambda f: ["discover", make(f), "--model", IOI, "--out", "{out}", *flags]


def discover_model(make: Callable[[Files], object]) -> Callable[[Files], list[str]]:
    return lambda f: ["discover", "ioi", "--model", str(make(f)), "--n", "8", "--out", "{out}"]


def on_circuit(command: str, edit: Callable[[dict], None] | None, *flags: str
               ) -> Callable[[Files], list[str]]:
    def argv(f: Files) -> list[str]:
        path = str(f.circuit) if edit is None else f.edited_circuit(edit)
        out = {"evaluate": [], "render": ["-o", "{out}.svg"], "export": ["-o", "{out}.json"]}
        return [command, path, *out[command], *flags]
    return argv


def set_graph(**values: object) -> Callable[[dict], None]:
    return lambda doc: doc["graph"].update(values)


def first_edge_score(value: object) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        doc["edges"][next(iter(doc["edges"]))]["score"] = value
    return edit


def long_prompt(f: Files) -> str:
    words = " ".join(["Mary and John went to the store"] * 20)
    return f.task(f.good(clean=f"{words}, John gave a drink to",
                         corrupt=f"{words}, Mary gave a drink to"))


def with_config(**change: int) -> Callable[[Files], Path]:
    """A copy of the IOI model whose config.json says other sizes than its weights hold."""
    def make(f: Files) -> Path:
        folder = f.model()
        config = json.loads((folder / "config.json").read_text())
        config.update(change)
        (folder / "config.json").write_text(json.dumps(config))
        return folder
    return make


shape_mismatch = with_config(n_embd=64)  # the weights are 128 wide
more_layers = with_config(n_layer=6)  # the weights hold 4 layers


def without_bos_token(f: Files) -> Path:
    """A copy of the IOI model whose tokenizer names no BOS token."""
    folder = f.model()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["bos_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def truncated_weights(f: Files) -> Path:
    folder = f.model()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


def garbage_weights(f: Files) -> Path:
    folder = f.model()
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return folder


def pickle_weights(f: Files) -> Path:
    folder = f.model()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(f.payload())
    return folder


def config_not_json(f: Files) -> Path:
    folder = f.model()
    (folder / "config.json").write_text("{ this is not json")
    return folder


def no_config(f: Files) -> Path:
    folder = f.model()
    (folder / "config.json").unlink()
    return folder


CASES = [
    # -- task files ------------------------------------------------------------------------
    Case("answers-a-number", discover_file(lambda f: f.task(f.good(answers=5))), ("answers",)),
    Case("wrong-a-number", discover_file(lambda f: f.task(f.good(wrong=5))), ("wrong",)),
    Case("answers-empty", discover_file(lambda f: f.task(f.good(answers=[]))), ("answer",)),
    Case("answers-list-of-numbers", discover_file(lambda f: f.task(f.good(answers=[1, 2]))),
         ("answers",)),
    Case("clean-a-number", discover_file(lambda f: f.task(f.good(clean=7))), ("clean",)),
    Case("clean-empty", discover_file(lambda f: f.task(f.good(clean=""))), ("clean",)),
    Case("latin-1-file", discover_file(lambda f: f.raw(
        "latin.jsonl", json.dumps(f.good(clean="Caf\u00e9 Mary and John")).encode("latin-1")
        .replace(b"\\u00e9", "\u00e9".encode("latin-1")))), ("UTF-8",)),
    Case("binary-file", discover_file(lambda f: f.raw("binary.jsonl", bytes(range(256)) * 8)),
         ()),
    Case("empty-file", discover_file(lambda f: f.text("empty.jsonl", "")), ("empty",)),
    Case("blank-lines-only", discover_file(lambda f: f.text("blank.jsonl", "\n\n  \n")),
         ("empty",)),
    Case("invalid-json-line", discover_file(lambda f: f.task(f.good(), "{not json")),
         ("line 2",)),
    Case("bad-line-after-good-ones", discover_file(lambda f: f.text("late.jsonl", "\n".join(
        [json.dumps(GOOD)] * 5 + [json.dumps(f.good(answers=" Mary", wrong=" Mary"))]))),
         ("line 6",)),
    Case("json-array-line", discover_file(lambda f: f.task("[1, 2, 3]")), ("line 1",)),
    Case("missing-key", discover_file(lambda f: f.task({"clean": "a", "answers": [" b"]})),
         ("corrupt",)),
    Case("meta-not-object", discover_file(lambda f: f.task(f.good(meta=[1]))), ("meta",)),
    Case("answer-equals-wrong", discover_file(lambda f: f.task(f.good(wrong=[" Mary"]))),
         ("line 1",)),
    Case("clean-equals-corrupt", discover_file(lambda f: f.task(
        f.good(corrupt=GOOD["clean"]))), ("line 1",)),
    Case("answer-is-unknown-token", discover_file(lambda f: f.task(
        f.good(answers=[" Zyxwvut"]))), ("unknown",)),
    Case("prompt-longer-than-context", discover_file(long_prompt), ("64",)),
    Case("task-file-missing", discover_file(lambda f: f.path("absent.jsonl")), ("absent",)),
    Case("task-file-is-a-folder", discover_file(
        lambda f: (f.root / "folder.jsonl").mkdir() or f.path("folder.jsonl")), ()),
    Case("task-file-is-a-pickle", discover_file(lambda f: f.raw("p.jsonl", f.payload())), ()),
    Case("unknown-task-name", discover("no-such-task"), ("no-such-task",)),
    # -- models ------------------------------------------------------------------------------
    Case("model-missing", discover_model(lambda f: f.root / "no-model"), ("no-model",)),
    Case("model-is-a-file", discover_model(lambda f: f.text("model.txt", "x")), ("model.txt",)),
    Case("model-without-config", discover_model(no_config), ("config.json",)),
    Case("model-config-not-json", discover_model(config_not_json), ("config.json",)),
    Case("model-shape-mismatch", discover_model(shape_mismatch), ("match",)),
    Case("model-truncated-weights", discover_model(truncated_weights), ("safetensors",)),
    Case("model-garbage-weights", discover_model(garbage_weights), ("safetensors",)),
    Case("model-config-more-layers", discover_model(more_layers), ("missing",)),
    Case("model-pickle-bin", discover_model(pickle_weights), ("safetensors",)),
    # -- options -----------------------------------------------------------------------------
    Case("threshold-inf", discover("ioi", "--method", "acdc", "--threshold", "inf"),
         ("threshold",)),
    Case("threshold-nan", discover("ioi", "--method", "acdc", "--threshold", "nan"),
         ("threshold",)),
    Case("threshold-negative", discover("ioi", "--method", "acdc", "--threshold", "-1"),
         ("threshold",)),
    Case("select-threshold-nan", discover("ioi", "--select", "threshold:nan"), ("nan",)),
    Case("select-threshold-inf", discover("ioi", "--select", "threshold:inf"), ("inf",)),
    Case("select-topk-fraction", discover("ioi", "--select", "topk:2.5"), ("2.5",)),
    Case("select-topk-negative", discover("ioi", "--select", "topk:-1"), ("-1",)),
    Case("select-faithfulness-above-1", discover("ioi", "--select", "faithfulness:1.5"),
         ("faithfulness",)),
    Case("select-unknown-rule", discover("ioi", "--select", "best:3"), ("best:3",)),
    Case("n-huge", discover("ioi", "--n", "10000000"), ("--n",)),
    Case("n-zero", discover("ioi", "--n", "0"), ("--n",)),
    Case("steps-huge", discover("ioi", "--steps", "100000000"), ("steps",)),
    Case("steps-zero", discover("ioi", "--steps", "0"), ("steps",)),
    Case("seed-too-large", discover("ioi", "--seed", str(2**40)), ("--seed",)),
    Case("seed-negative", discover("ioi", "--seed", "-1"), ("--seed",)),
    Case("heldout-above-1", discover("ioi", "--heldout", "1.5"), ("--heldout",)),
    Case("batch-size-zero", discover("ioi", "--batch-size", "0"), ("--batch-size",)),
    Case("unknown-method", discover("ioi", "--method", "magic"), ("magic",)),
    Case("unknown-metric", discover("ioi", "--metric", "accuracy"), ("accuracy",)),
    Case("gradient-method-with-kl", discover("ioi", "--method", "eap", "--metric", "kl"),
         ("kl",)),
    Case("option-the-method-lacks", discover("ioi", "--method", "acdc", "--steps", "3"),
         ("--steps",)),
    Case("unknown-device", discover("ioi", "--device", "tpu"), ("tpu",)),
    Case("unknown-dtype", discover("ioi", "--dtype", "int3"), ("int3",)),
    # -- the output folder, checked before any work ------------------------------------------
    Case("out-is-a-file", lambda f: ["discover", "ioi", "--out", f.text("taken", "mine")],
         ("taken",)),
    Case("out-under-a-file", lambda f: ["discover", "ioi", "--out",
                                        f.text("plain", "mine") + "/sub"], ("plain",)),
    Case("out-in-proc", lambda f: ["discover", "ioi", "--out", "/proc/circuits-out"],
         ("/proc",)),
    Case("out-in-sys", lambda f: ["discover", "ioi", "--out", "/sys/circuits-out"], ("/sys",)),
    # -- evaluate ----------------------------------------------------------------------------
    Case("evaluate-on-another-model", on_circuit("evaluate", None, "--model", "factual-gpt2-4l",
                                                 "--n", "8"), ("--any-model",)),
    Case("evaluate-nan-score", on_circuit("evaluate", first_edge_score(float("nan"))),
         ("score",)),
    Case("evaluate-inf-score", on_circuit("evaluate", first_edge_score(float("inf"))),
         ("score",)),
    Case("evaluate-string-score", on_circuit("evaluate", first_edge_score("big")), ("score",)),
    Case("evaluate-1000-layers", on_circuit("evaluate", set_graph(n_layers=1000)), ("graph",)),
    Case("evaluate-billion-heads", on_circuit("evaluate", set_graph(n_heads=10**9)),
         ("graph",)),
    Case("evaluate-negative-layers", on_circuit("evaluate", set_graph(n_layers=-3)),
         ("graph",)),
    Case("evaluate-bool-layers", on_circuit("evaluate", set_graph(n_layers=True)), ("graph",)),
    Case("evaluate-seed-negative", on_circuit("evaluate", None, "--seed", "-5"), ("--seed",)),
    Case("evaluate-truncated-file", lambda f: ["evaluate", f.text(
        "cut.json", f.circuit.read_text()[:500])], ("JSON",)),
    Case("evaluate-missing-file", lambda f: ["evaluate", f.path("gone.json")], ("gone.json",)),
    Case("evaluate-not-utf8", lambda f: ["evaluate", f.raw("bin.json", b"\xff\xfe\x00")], ()),
    Case("evaluate-a-pickle", lambda f: ["evaluate", f.raw("p.json", f.payload())], ()),
    # -- render and export -------------------------------------------------------------------
    Case("render-nan-score", on_circuit("render", first_edge_score(float("nan"))), ("score",)),
    Case("render-bad-suffix", lambda f: ["render", str(f.circuit), "-o", f.path("x.jpeg")],
         ("x.jpeg",)),
    Case("render-into-a-folder", lambda f: ["render", str(f.circuit), "-o",
                                            str(f.root)], ()),
    Case("render-under-a-file", lambda f: ["render", str(f.circuit), "-o",
                                           f.text("file", "x") + "/c.svg"], ("file",)),
    Case("render-in-proc", lambda f: ["render", str(f.circuit), "-o", "/proc/c.svg"],
         ("/proc",)),
    Case("export-negative-d-model", on_circuit("export", None, "--format", "mib",
                                               "--d-model", "-5"), ("--d-model",)),
    Case("export-nan-score", on_circuit("export", first_edge_score(float("nan")),
                                        "--format", "json"), ("score",)),
    Case("export-in-proc", lambda f: ["export", str(f.circuit), "--format", "json", "-o",
                                      "/proc/c.json"], ("/proc",)),
    Case("export-unknown-format", lambda f: ["export", str(f.circuit), "-o",
                                             f.path("c.xlsx")], ("--format",)),
]


# Cases added per area (each area's list is kept by whoever works on that area).
# -- reading commands: lens, trace, heads, attention, dla --------------------------------------
def lens(*flags: str) -> Callable[[Files], list[str]]:
    return lambda f: ["lens", "ioi", "--n", "2", "--out", "{out}", *flags]


def trace(*flags: str) -> Callable[[Files], list[str]]:
    return lambda f: ["trace", "factual", "--out", "{out}", *flags]


def attention(*flags: str) -> Callable[[Files], list[str]]:
    return lambda f: ["attention", "--heads", "a0.h0", "-o", "{out}.png", *flags]


def translators(value: float) -> Callable[[Files], list[str]]:
    """Translators for the IOI model with one entry set to `value`."""
    def argv(f: Files) -> list[str]:
        from circuits.model import load_model
        from circuits.reading.tuned_lens import TunedLens

        lens_ = TunedLens.for_model(load_model(IOI))
        with torch.no_grad():
            lens_.translators[2].bias[3] = value
        path = lens_.save(f.root / "bad.safetensors")
        return ["lens", "ioi", "--n", "2", "--out", "{out}", "--translators", str(path)]
    return argv


READING_CASES: list[Case] = [
    Case("lens-lr-inf", lens("--lr", "inf"), ("--lr", "at most 10")),
    Case("lens-lr-nan", lens("--lr", "nan"), ("--lr",)),
    Case("lens-lr-1e30", lens("--lr", "1e30"), ("--lr", "at most 10")),
    Case("lens-train-steps-billion", lens("--train-steps", str(10**9)),
         ("--train-steps", "2000")),
    Case("lens-train-texts-dev-zero", lens("--train-texts", "/dev/zero"), ("not a text file",)),
    Case("lens-train-texts-nul", lambda f: lens("--train-texts", f.raw(
        "nul.txt", b"some text\n" + bytes(64)))(f), ("NUL",)),
    Case("lens-train-texts-latin-1", lambda f: lens("--train-texts", f.raw(
        "latin.txt", "Caf\u00e9 au lait\n".encode("latin-1")))(f), ("UTF-8",)),
    Case("lens-translators-nan", translators(float("nan")), ("non-finite", "bad.safetensors")),
    Case("lens-translators-1e30", translators(1e30), ("1e+30", "bad.safetensors")),
    Case("trace-noise-1e30", trace("--noise", "1e30"), ("--noise", "100")),
    Case("trace-noise-inf", trace("--noise", "inf"), ("--noise",)),
    Case("trace-noise-nan", trace("--noise", "nan"), ("--noise",)),
    Case("trace-samples-million", trace("--samples", "1000000"), ("--samples", "100")),
    Case("trace-too-many-runs", trace("--n", "8000", "--samples", "100"),
         ("needs at least 10,400,000 noised runs", "10,000,000")),
    Case("attention-prompt-not-utf8", attention("--model", IOI, "--prompt", "Mary \udcff"),
         ("UTF-8",)),
    Case("attention-no-model", attention("--prompt", "Mary"), ("--model",)),
    Case("attention-empty-head-in-list", lambda f: ["attention", "--model", IOI, "--heads",
                                                    "a0.h0,,a1.h1", "--prompt", "Mary", "-o",
                                                    "{out}.png"], ("not a head name",)),
    Case("heads-two-models", lambda f: ["heads", IOI, "--model", "factual-gpt2-4l", "--out",
                                        "{out}"], ("two models",)),
    Case("heads-no-model", lambda f: ["heads", "--out", "{out}"], ("--model",)),
]
# -- token attribution: attribute ------------------------------------------------------------
def attribute(*flags: str) -> Callable[[Files], list[str]]:
    """`circuits attribute` on IOI prompts with `flags`."""
    return lambda f: ["attribute", "ioi", "--out", "{out}", *flags]


ATTRIBUTION_CASES: list[Case] = [
    Case("attribute-steps-past-limit", attribute("--steps", "5000"), ("--steps", "1000")),
    # with --compare this was a row of NaN, not an error
    Case("attribute-compare-steps-past-limit", attribute(
        "--compare", "--method", "integrated-gradients,occlusion", "--steps", "5000"),
         ("--steps", "1000")),
    Case("attribute-samples-odd", attribute("--method", "shap", "--samples", "9"),
         ("--samples", "even")),
    Case("attribute-samples-past-limit", attribute("--method", "shap", "--samples", "100000"),
         ("--samples", "10000")),
    Case("attribute-batch-size-past-limit", attribute("--batch-size", "5000"),
         ("--batch-size", "1024")),
    Case("attribute-batch-size-negative", attribute("--batch-size", "-1"), ("--batch-size",)),
    Case("attribute-n-past-limit", attribute("--n", "100001"), ("--n", "100000")),
    Case("attribute-baseline-zeros-for-occlusion", attribute(
        "--method", "occlusion", "--baseline", "zeros"), ("occlusion", "--baseline")),
    Case("attribute-compare-baseline-zeros-for-shap", attribute(
        "--compare", "--method", "integrated-gradients,shap", "--baseline", "zeros"),
         ("shap", "--baseline")),
    Case("attribute-two-methods-without-compare", attribute("--method", "occlusion", "shap"),
         ("--compare",)),
    Case("attribute-method-only-commas", attribute("--method", ",,"), ("--method",)),
    Case("attribute-shapley-exact-on-long-prompts", attribute(
        "--method", "shapley-exact", "--n", "2"), ("shapley-exact", "12 tokens")),
    Case("attribute-gradient-method-with-kl", attribute(
        "--method", "gradient-x-input", "--metric", "kl", "--n", "2"), ("flat",)),
    Case("attribute-short-out-is-a-file", lambda f: [
        "attribute", "ioi", "-o", f.text("taken.txt", "mine")], ("not a folder",)),
]
# -- model folders ----------------------------------------------------------------------------
MODEL_CASES: list[Case] = [
    # refused from the headers, before anything is allocated (no minutes, no memory killer)
    Case("model-config-vocab-1e8", discover_model(with_config(vocab_size=10**8)),
         ("transformer.wte.weight", "[100000000, 128] by the config")),
    Case("model-config-positions-1e7", discover_model(with_config(n_positions=10**7)),
         ("transformer.wpe.weight", "[10000000, 128] by the config")),
    Case("model-config-4000-layers", discover_model(with_config(n_layer=4000)),
         ("asks for 4000 layers", "hold 4")),
    Case("evaluate-circuit-without-fingerprint", on_circuit(
        "evaluate", lambda doc: doc["options"].pop("model_fingerprint"), "--n", "8"),
         ("no fingerprint", "--any-model")),
    Case("bos-flag-without-a-bos-token", lambda f: [
        "discover", "ioi", "--model", str(without_bos_token(f)), "--n", "8", "--bos", "--out",
        "{out}"], ("--bos", "has none")),
]
# -- discovery, select, resume ----------------------------------------------------------------
def edited_scores(edit: Callable[[dict], None]) -> Callable[[Files], list[str]]:
    """`circuits select` on the saved run's scores.json, edited."""
    def argv(f: Files) -> list[str]:
        doc = json.loads((f.circuit.parent / "scores.json").read_text("utf-8"))
        edit(doc)
        path = f.text("scores.json", json.dumps(doc))
        return ["select", path, "--select", "topk:5", "--out", "{out}"]
    return argv


def without_scores(doc: dict) -> None:
    """A circuit file as saved without scores."""
    doc["has_scores"] = False
    for entry in [*doc["edges"].values(), *doc["nodes"].values()]:
        entry.pop("score", None)


def first_score(value: object) -> Callable[[dict], None]:
    return lambda doc: doc["scores"].update({next(iter(doc["scores"])): value})


DISCOVERY_CASES: list[Case] = [
    Case("select-score-1e308", edited_scores(first_score(1e308)), ("float32",)),
    Case("select-score-string", edited_scores(first_score("big")), ("score",)),
    Case("select-circuit-unknown-edge", edited_scores(
        lambda doc: doc.update(circuit=["a9.h9->logits"])), ("a9.h9->logits",)),
    Case("select-method-without-circuit", lambda f: [
        "select", str(f.circuit.parent / "scores.json"), "--select", "method", "--out", "{out}"],
        ("decides no circuit",)),
    Case("discover-method-rule-with-eap", discover("ioi", "--method", "eap", "--select",
                                                   "method"), ("decides no circuit",)),
    # method options from the registry: bad values and options of other methods
    Case("discover-threshold-word", discover("ioi", "--method", "acdc", "--threshold", "abc"),
         ("--threshold", "'abc'")),
    Case("discover-threshold-negative", discover("ioi", "--method", "acdc", "--threshold",
                                                 "-1"), ("threshold", ">= 0", "-1")),
    Case("discover-threshold-nan", discover("ioi", "--method", "acdc", "--threshold", "nan"),
         ("threshold", "nan")),
    Case("discover-steps-0", discover("ioi", "--method", "eap-ig", "--steps", "0"),
         ("steps", "from 1 to 1000")),
    Case("discover-steps-fraction", discover("ioi", "--method", "eap-ig", "--steps", "2.5"),
         ("--steps", "whole number", "'2.5'")),
    Case("discover-steps-with-eap", discover("ioi", "--method", "eap", "--steps", "3"),
         ("'eap'", "--steps")),
    Case("discover-acdc-metric-unknown", discover("ioi", "--method", "acdc", "--acdc-metric",
                                                  "logit-diff"), ("metric", "kl, task")),
    Case("discover-chunk-0", discover("ioi", "--method", "activation-patching", "--chunk", "0"),
         ("chunk", ">= 1")),
    Case("discover-receivers-empty", discover("ioi", "--method", "path-patching", "--receivers",
                                              ","), ("receivers", "list of names")),
    Case("discover-receivers-with-eap", discover("ioi", "--method", "eap", "--receivers",
                                                 "logits"), ("--receivers", "path-patching")),
    Case("discover-kind-unknown", discover("ioi", "--method", "activation", "--kind", "cosine"),
         ("kind", "norm, diff")),
    Case("discover-ig-points-unknown", discover("ioi", "--method", "eap-ig", "--ig-points",
                                                "ends"), ("points", "midpoint, reference")),
    Case("discover-ig-points-with-eap-ig-stages", discover(
        "ioi", "--method", "eap-ig-stages", "--ig-points", "reference"), ("--ig-points",)),
    # learned masks: bad training options, and a budget larger than the graph
    Case("discover-edges-0", discover("induction", "--method", "edge-pruning", "--edges", "0"),
         ("edges", ">= 1")),
    Case("discover-sparsity-1", discover("induction", "--method", "ugs", "--sparsity", "1"),
         ("sparsity", "from 0 to 0.9999")),
    Case("discover-init-acdc", discover("induction", "--method", "edge-pruning", "--init",
                                        "acdc"), ("init", "eap-ig")),
    Case("discover-loss-unknown", discover("induction", "--method", "ugs", "--loss", "mse"),
         ("loss", "kl, task")),
    Case("discover-share-with-edge-pruning", discover(
        "induction", "--method", "edge-pruning", "--share", "0.5"), ("--share", "ugs")),
    Case("discover-edges-too-many", discover("induction", "--method", "edge-pruning", "--edges",
                                             "100000", "--steps", "1"), ("edges", "at most")),
    # mib-score: missing or foreign files, files without scores, another model
    Case("mib-score-missing-file", lambda f: ["mib-score", f.path("none.json")],
         ("cannot read",)),
    Case("mib-score-task-file", lambda f: ["mib-score", f.task()], ("not a circuit or scores",)),
    Case("mib-score-mib-file-without-cfg", lambda f: ["mib-score", f.text(
        "importances.json", json.dumps({"cfg": {}, "nodes": {}, "edges": {}}))],
         ("'cfg' n_layers",)),
    Case("mib-score-mib-file-without-task", lambda f: ["mib-score", str(export_mib(
        load_circuit(f.circuit), f.path("importances.json")))], ("names no task", "--task")),
    Case("mib-score-mib-file-cfg-disagrees", lambda f: [
        "mib-score", f.text("edges.json", json.dumps({"cfg": {"n_layers": 2, "n_heads": 4},
                                                      "edges": {"input->m0": {}}})),
        "--task", "ioi", "--model", IOI], ("has 110 edges but the file lists 1",)),
    Case("mib-score-circuit-without-scores", lambda f: ["mib-score", f.edited_circuit(
        without_scores)], ("no scores",)),
    Case("mib-score-other-weights", lambda f: [
        "mib-score", str(f.circuit), "--model", "factual-gpt2-4l"], ("other weights",
                                                                      "--any-model")),
    Case("mib-score-other-shape", lambda f: [
        "mib-score", str(f.circuit), "--model", "induction-gpt2-2l", "--any-model"],
         ("2 layers", "--model")),
    Case("mib-score-out-is-a-folder", lambda f: [
        "mib-score", str(f.circuit.parent / "scores.json"), "--out", str(f.root)],
         ("is a folder",)),
    # ensembles (mean:A,B) and stable selection (stable:S,topk:N)
    Case("discover-ensemble-mixed-levels", discover(
        "ioi", "--method", "mean:eap,activation-patching"), ("mixes edge-level",)),
    Case("discover-ensemble-unknown-part", discover("ioi", "--method", "mean:eap,eap-igg"),
         ("unknown method 'eap-igg'",)),
    Case("discover-ensemble-part-twice", discover("ioi", "--method", "mean:eap,eap"),
         ("twice",)),
    Case("discover-ensemble-option-no-part-takes", discover(
        "ioi", "--method", "mean:eap,eap-ig", "--threshold", "0.1"), ("--threshold", "acdc")),
    Case("discover-ensemble-bad-steps", discover(
        "ioi", "--method", "mean:eap,eap-ig", "--steps", "0"), ("steps", "from 1 to 1000")),
    Case("discover-stable-share-0", discover("ioi", "--select", "stable:0,topk:10"),
         ("stable", "(0, 1]")),
    Case("discover-stable-share-1.5", discover("ioi", "--select", "stable:1.5,topk:10"),
         ("stable", "(0, 1]")),
    Case("discover-stable-without-k", discover("ioi", "--select", "stable:0.8"),
         ("stable needs the size", "topk:N")),
    Case("discover-stable-k-word", discover("ioi", "--select", "stable:0.8,topk:ten"),
         ("topk", "whole number")),
    Case("discover-stable-unknown-part", discover("ioi", "--select", "stable:0.8,topk:5,k:3"),
         ("resamples:R",)),
    Case("discover-stable-with-acdc", discover(
        "ioi", "--method", "acdc", "--select", "stable:0.8,topk:10"), ("'acdc' cannot give",)),
    Case("select-stable-from-ensemble-scores", lambda f: [
        "select", f.text("scores.json", json.dumps({
            **json.loads((f.circuit.parent / "scores.json").read_text("utf-8")),
            "method": "mean:eap,eap-ig"})), "--select", "stable:0.5,topk:5", "--out", "{out}"],
         ("cannot give",)),
    # circuits at positions
    Case("discover-positions-acdc", discover("ioi", "--method", "acdc", "--positions"),
         ("does not score edges at positions", "eap")),
    Case("discover-positions-node-level", discover("ioi", "--method", "eap", "--positions",
                                                   "--level", "node"), ("edge-level",)),
    Case("discover-positions-lengths-without-spans", discover_file(lambda f: f.task(f.good(
        clean="When Mary and John went to the big store, John gave a drink to",
        corrupt="When Mary and John went to the big store, Mary gave a drink to")),
        "--method", "eap", "--positions"), ("one length", "spans")),
    Case("discover-spans-overlap", discover_file(lambda f: f.task(f.good(
        spans={"A": [1, 3], "B": [2, 4]}))), ("overlap",)),
    Case("discover-span-past-end", discover_file(lambda f: f.task(f.good(
        spans={"END": [13, 20]})), "--method", "eap", "--positions"), ("ends at token 20",)),
    Case("discover-span-bad-bounds", discover_file(lambda f: f.task(f.good(
        spans={"X": [3, 3]}))), ("0 <= start < end",)),
    Case("discover-span-name-other", discover_file(lambda f: f.task(f.good(
        spans={"other": [0, 1]}))), ("not allowed",)),
]
CASES += READING_CASES + ATTRIBUTION_CASES + MODEL_CASES + DISCOVERY_CASES


# -- steering: circuits steer (tests/test_steer.py) ---------------------------------------------
def steer(*flags: str) -> Callable[[Files], list[str]]:
    """`circuits steer` on the IOI model with `flags`."""
    return lambda f: ["steer", IOI, "-o", "{out}", *flags]


def steer_pairs(text: str, *flags: str) -> Callable[[Files], list[str]]:
    """`circuits steer` reading the pairs file `text` at layer 1, measured on ioi."""
    return lambda f: steer("--pairs", f.text("pairs.jsonl", text), "--layer", "1", "--task",
                           "ioi", *flags)(f)


def steer_direction(width: int) -> Callable[[Files], list[str]]:
    """`circuits steer` applying a saved direction `width` wide."""
    def argv(f: Files) -> list[str]:
        from circuits.representations.steer import Direction

        path = Direction(torch.eye(width)[0], 1, "mean", 1.0, 1.0).save(f.path("d.safetensors"))
        return steer("--direction", str(path), "--task", "ioi")(f)
    return argv


PAIR = '{"positive": "Mary", "negative": "John"}\n'
STEER_CASES: list[Case] = [
    Case("steer-layer-past-the-model", steer("--pairs", "ioi", "--layer", "9"),
         ("--layer 9", "layers 0 to 3")),
    Case("steer-no-layer", steer("--pairs", "ioi"), ("--layer is required",)),
    Case("steer-no-source", steer("--layer", "1"), ("--pairs", "--direction")),
    Case("steer-pairs-one-side", steer_pairs('{"positive": "Mary"}\n'), ("line 1", "negative")),
    Case("steer-pairs-empty-file", steer_pairs("\n \n"), ("empty",)),
    Case("steer-pairs-not-json", steer_pairs("positive,negative\n"), ("not a JSON object",)),
    Case("steer-pairs-other-keys", steer_pairs('{"good": "a", "bad": "b"}\n'), ('"positive"',)),
    Case("steer-pairs-missing", lambda f: steer("--pairs", f.path("none.jsonl"), "--layer",
                                                "1")(f), ("does not exist",)),
    Case("steer-pairs-unknown-name", steer("--pairs", "no-such-task", "--layer", "1"),
         ("neither a file",)),
    Case("steer-pairs-a-device", steer("--pairs", "/dev/zero", "--layer", "1"),
         ("neither a file",)),
    Case("steer-pairs-without-task", lambda f: steer("--pairs", f.text("pairs.jsonl", PAIR),
                                                     "--layer", "1")(f), ("--task is required",)),
    Case("steer-labels-one-class", lambda f: steer("--pairs", "labels:" + f.text(
        "l.jsonl", '{"text": "Mary", "label": "a"}\n'), "--layer", "1", "--task", "ioi")(f),
         ("1 classes",)),
    Case("steer-classes-unknown", steer("--pairs", "labels:years", "--classes", "up,down",
                                        "--layer", "1", "--task", "ioi"), ("no text of class",)),
    Case("steer-classes-the-same", steer("--pairs", "ioi", "--layer", "1", "--classes", "a,a"),
         ("--classes",)),
    Case("steer-scales-not-numbers", steer("--pairs", "ioi", "--layer", "1", "--scales=1,x"),
         ("scales", "not understood")),
    Case("steer-scales-nan", steer("--pairs", "ioi", "--layer", "1", "--scales=nan,1"),
         ("finite",)),
    Case("steer-scales-range-of-one", steer("--pairs", "ioi", "--layer", "1",
                                            "--scales=0:4:1"), ("A:B:N",)),
    Case("steer-bad-position", steer("--pairs", "ioi", "--layer", "1", "--position", "1:2:3"),
         ("position",)),
    Case("steer-generate-zero", steer("--pairs", "ioi", "--layer", "1", "--generate", "0"),
         ("--generate",)),
    Case("steer-prompts-without-generate", steer("--pairs", "ioi", "--layer", "1", "--prompts",
                                                 "ioi"), ("--generate",)),
    Case("steer-generate-past-the-context", steer("--pairs", "ioi", "--layer", "1",
                                                  "--generate", "500"), ("context",)),
    Case("steer-neutral-missing", lambda f: steer("--pairs", "ioi", "--layer", "1", "--neutral",
                                                  f.path("none.txt"))(f), ("does not exist",)),
    Case("steer-unknown-task", steer("--pairs", "ioi", "--layer", "1", "--task", "nope"),
         ("nope",)),
    Case("steer-direction-missing", lambda f: steer("--direction", f.path("d.safetensors"),
                                                    "--task", "ioi")(f), ("does not exist",)),
    Case("steer-direction-not-a-direction", lambda f: steer("--direction", f.raw(
        "d.safetensors", b"\x00" * 64), "--task", "ioi")(f), ("not a steering direction",)),
    Case("steer-direction-other-width", steer_direction(16), ("width-16", "width 128")),
    Case("steer-direction-without-task", lambda f: steer_direction(16)(f)[:-2],
         ("--task is required",)),
    Case("steer-direction-with-method", lambda f: steer_direction(16)(f) + ["--method", "pca"],
         ("--method",)),
]
CASES += STEER_CASES


def plan(*flags: str) -> Callable[[Files], list[str]]:
    return lambda f: ["plan", IOI, *flags]


PLAN_CASES: list[Case] = [
    Case("plan-unknown-method", plan("--method", "magic"), ("'magic'", "not a method")),
    Case("plan-method-without-memory-model", plan("--method", "acdc"), ("no memory model",)),
    Case("plan-n-zero", plan("--n", "0"), ("--n",)),
    Case("plan-batch-size-negative", plan("--batch-size", "-3"), ("--batch-size",)),
    Case("plan-tokens-zero", plan("--tokens", "0"), ("--tokens",)),
    Case("plan-steps-zero", plan("--steps", "0"), ("--steps",)),
    Case("plan-memory-not-a-size", plan("--memory", "lots"), ("--memory", "'lots'")),
    Case("plan-memory-zero", plan("--memory", "0GiB"), ("--memory",)),
    Case("plan-unknown-dtype", plan("--dtype", "float8"), ("float8",)),
    Case("plan-unknown-device", plan("--device", "tpu", "--memory", "8GiB"), ("'tpu'",)),
    Case("plan-folder-without-config", lambda f: ["plan", str(no_config(f))], ("config.json",)),
    Case("plan-config-not-json", lambda f: ["plan", str(config_not_json(f))], ("config.json",)),
    Case("plan-name-not-in-cache", lambda f: ["plan", "no-org/no-model"],
         ("local Hugging Face cache",)),
    Case("plan-empty-name", lambda f: ["plan", ""], ("MODEL",)),
]
CASES += PLAN_CASES


@pytest.fixture(scope="module")
def saved_circuit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small IOI circuit discovered on the reference model."""
    out = tmp_path_factory.mktemp("hostile") / "ioi"
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["discover", "ioi", "--n", "16", "--method", "eap", "--select",
                         "topk:20", "--out", str(out)])
    assert code == 0
    return out / "circuit.json"


def test_there_are_at_least_60_cases():
    assert len({c.name for c in CASES}) == len(CASES) >= 60


def exits_2_with_one_line(argv: list[str], words: tuple[str, ...], capsys) -> None:
    """`circuits` run with `argv` exits 2 with one ``circuits: error:`` line holding `words`,
    no traceback and nothing on stdout."""
    code = cli.main(argv)
    stdout, stderr = capsys.readouterr()
    lines = stderr.strip().splitlines()
    assert code == 2, (argv, stderr)
    assert len(lines) == 1 and lines[0].startswith("circuits: error: "), stderr
    assert "Traceback" not in stderr and stdout == ""
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_exits_2_with_one_line(case, saved_circuit, tmp_path, capsys):
    files = Files(tmp_path, saved_circuit)
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)) for a in case.argv(files)]
    target = Path(argv[argv.index("--out") + 1] if "--out" in argv else
                  argv[argv.index("-o") + 1] if "-o" in argv else out)
    before = target.read_bytes() if target.is_file() else None
    exits_2_with_one_line(argv, case.words, capsys)
    # nothing written where the output would go
    if before is not None:
        assert target.read_bytes() == before
    elif target != tmp_path:
        assert not target.exists() or (target.is_dir() and not any(target.iterdir()))
    assert not files.marker.exists()  # no pickle payload ran


# -- the same mistakes through the API end in a CircuitsError ----------------------------------
@pytest.fixture(scope="module")
def ioi_setup():
    from circuits.api import make_setup
    from circuits.model import load_model
    from circuits.task import get_task

    model = load_model(IOI)
    return make_setup(model, get_task("ioi", model.tokenizer, n=8))


@pytest.fixture(scope="module")
def ioi_scores(ioi_setup):
    from circuits.methods import run_method

    return run_method("eap", ioi_setup)


def _api_cases():
    from circuits import api, circuit, model, task
    from circuits.methods import run_method

    def split(fraction):
        return lambda s, sc: task.get_task("ioi", n=8).split(fraction)

    return {
        "load_model-None": lambda s, sc: model.load_model(None),
        "load_model-number": lambda s, sc: model.load_model(123),
        "load_model-empty": lambda s, sc: model.load_model(""),
        "get_task-n-string": lambda s, sc: task.get_task("ioi", n="5"),
        "get_task-n-fraction": lambda s, sc: task.get_task("ioi", n=2.5),
        "get_task-seed-string": lambda s, sc: task.get_task("ioi", n=4, seed="x"),
        "split-1.5": split(1.5),
        "split-0": split(0),
        "split-negative": split(-1),
        "select-threshold-string": lambda s, sc: circuit.select(sc, threshold="x"),
        "select-threshold-nan": lambda s, sc: circuit.select(sc, threshold=float("nan")),
        "select-no-scores": lambda s, sc: circuit.select(None, top_k=3),
        "select-topk-fraction": lambda s, sc: circuit.select(sc, top_k=2.5),
        "select-topk-bool": lambda s, sc: circuit.select(sc, top_k=True),
        "select-two-rules": lambda s, sc: circuit.select(sc, top_k=3, threshold=0.1),
        "run_method-unknown-option": lambda s, sc: run_method("eap", s, bogus=1),
        "run_method-steps-huge": lambda s, sc: run_method("eap-ig", s, steps=10**8),
        "run_method-not-a-setup": lambda s, sc: run_method("eap", "setup"),
        "discover-heldout-1.5": lambda s, sc: api.discover("ioi", IOI, "eap", heldout=1.5),
        "discover-model-first": lambda s, sc: api.discover(s.model, "ioi"),
        "from_jsonl-missing": lambda s, sc: task.Task.from_jsonl("/nonexistent/x.jsonl"),
        "parse_selection-nan": lambda s, sc: api.parse_selection("threshold:nan"),
        "parse_selection-number": lambda s, sc: api.parse_selection(3),
    }


API_CASES = sorted(_api_cases())


@pytest.mark.parametrize("name", API_CASES)
def test_api_mistakes_raise_a_circuits_error(name, ioi_setup, ioi_scores):
    with pytest.raises(CircuitsError) as caught:
        _api_cases()[name](ioi_setup, ioi_scores)
    text = str(caught.value)
    assert text and "\n" not in text


def test_pickle_payload_in_a_weights_file_never_runs(tmp_path):
    from circuits.errors import ModelLoadError
    from circuits.model import load_model

    files = Files(tmp_path, tmp_path / "unused.json")
    folder = pickle_weights(files)
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(folder))
    assert not files.marker.exists()
    # the payload is live: unpickling it really would have created the marker
    pickle.loads(files.payload())
    assert files.marker.exists()


def test_strict_json_even_when_faithfulness_is_undefined(tmp_path):
    """A circuit whose metrics are NaN (0/0 faithfulness) is still written as strict JSON."""
    from circuits.circuit import Circuit
    from circuits.graph import Graph

    g = Graph(1, 1)
    circuit = Circuit(g, g.valid.clone(), torch.zeros(g.n_sources, g.n_destinations),
                      metrics={"faithfulness": float("nan"), "x": float("inf")})
    path = circuit.save(tmp_path / "c.json")

    def refuse(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    doc = json.loads(path.read_text(), parse_constant=refuse)
    assert doc["metrics"]["faithfulness"] is None and doc["metrics"]["x"] is None


# -- feature dashboards: circuits sae features -------------------------------------------------
def sae_folder(f: Files, d_in: int = 128, site: str = "resid.1") -> str:
    """An SAE of 8 features saved in sae-lens's layout (the IOI model is 128 wide, 4 layers)."""
    from circuits.features import SAE

    return str(SAE.init(d_in, 8, "relu", site=site).save(f.root / "sae"))


def nan_sae(f: Files) -> str:
    """An SAE whose encoder holds a NaN (its own save refuses to write one)."""
    from safetensors.torch import load_file, save_file

    folder = Path(sae_folder(f))
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["W_enc"][0, 0] = float("nan")
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return str(folder)


def features(*flags: str, sae: Callable[[Files], str] = sae_folder
             ) -> Callable[[Files], list[str]]:
    return lambda f: ["sae", "features", IOI, sae(f), "--texts", "ioi", "-o", "{out}", *flags]


DASHBOARD_CASES: list[Case] = [
    Case("features-reversed-range", features("--features", "5-2"), ("5-2", "range")),
    Case("features-not-a-number", features("--features", "seven"), ("seven",)),
    Case("features-out-of-range", features("--features", "0-99"), ("0 to 7", "99")),
    Case("features-top-zero", features("--top", "0"), ("--top",)),
    Case("features-top-more-than-chosen", features("--features", "0-3", "--top", "5"),
         ("--top", "4")),
    Case("features-window-negative", features("--window", "-1"), ("--window",)),
    Case("features-contexts-zero", features("--contexts", "0"), ("--contexts",)),
    Case("features-context-one", features("--context", "1"), ("--context",)),
    Case("features-context-beyond-model", features("--context", "500"), ("--context", "64")),
    Case("features-sae-nan", features(sae=nan_sae), ("not finite",)),
    Case("features-sae-too-narrow", features(sae=lambda f: sae_folder(f, d_in=64)),
         ("64-wide", "resid.1", "128")),
    Case("features-sae-layer-beyond", features(sae=lambda f: sae_folder(f, site="resid.9")),
         ("resid.9", "0 to 3")),
    Case("features-sae-missing", features(sae=lambda f: f.path("no-sae")), ("no-sae",)),
    Case("features-sae-garbage", features(sae=lambda f: f.raw("sae.safetensors", b"\x00" * 64)),
         ("SAE weights",)),
    Case("features-texts-missing", lambda f: ["sae", "features", IOI, sae_folder(f), "--texts",
                                              f.path("none.txt"), "-o", "{out}"],
         ("none.txt",)),
    Case("features-corpus-shorter-than-a-row",
         lambda f: ["sae", "features", IOI, sae_folder(f), "--texts", f.text("c.txt", "Mary"),
                    "-o", "{out}", "--context", "32"], ("fewer tokens than one row",)),
    Case("features-out-is-a-file", lambda f: ["sae", "features", IOI, sae_folder(f), "--texts",
                                              "ioi", "-o", f.text("taken", "x")],
         ("not a folder",)),
]


@pytest.mark.parametrize("case", DASHBOARD_CASES, ids=[c.name for c in DASHBOARD_CASES])
def test_dashboard_input_exits_2_with_one_line(case, tmp_path, capsys):
    test_hostile_input_exits_2_with_one_line(case, tmp_path / "no-circuit.json", tmp_path, capsys)


# -- a feature circuit's file (tests/test_feature_files.py) ---------------------------------------
def first_site(**change: object) -> Callable[[dict], None]:
    return lambda doc: doc["graph"]["features"][0].update(change)


def without_first_edge(doc: dict) -> None:
    del doc["edges"][next(iter(doc["edges"]))]


FEATURE_FILE_CASES: list[Case] = [
    Case("feature-export-mib", on_circuit("export", None, "--format", "mib"),
         ("MIB", "not SAE features")),
    Case("feature-render-chosen-past-the-sae", on_circuit("render", first_site(chosen=[1, 99])),
         ("features[0]", "below 8")),
    Case("feature-render-bad-site", on_circuit("render", first_site(site="resid.x")),
         ("features[0]", "not an activation site")),
    Case("feature-export-edge-missing", on_circuit("export", without_first_edge),
         ("has 48 edges but the file lists 47",)),
    Case("feature-render-sites-out-of-order", on_circuit("render", first_site(site="resid.1")),
         ("forward order",)),
]


@pytest.mark.parametrize("case", FEATURE_FILE_CASES, ids=[c.name for c in FEATURE_FILE_CASES])
def test_feature_file_mistakes_exit_2_with_one_line(case, tmp_path, capsys):
    test_hostile_input_exits_2_with_one_line(case, feature_file(tmp_path), tmp_path, capsys)


# -- SAE training and quality: sae train, sae quality (tests/test_sae_train.py) ---------------
def sae_train(*flags: str, texts: str = "ioi") -> Callable[[Files], list[str]]:
    """`circuits sae train` on the IOI model with `flags`."""
    return lambda f: ["sae", "train", IOI, "--texts", texts, "-o", "{out}", *flags]


SAE_CASES: list[Case] = [
    Case("sae-train-bad-site", sae_train("--site", "resid.x"), ("not an activation site",)),
    Case("sae-train-layer-past-the-model", sae_train("--site", "resid.9"), ("layers 0 to 3",)),
    Case("sae-train-mlp-in-without-transcoder", sae_train("--site", "mlp_in.1"),
         ("--transcoder",)),
    Case("sae-train-transcoder-at-resid", sae_train("--site", "resid.1", "--transcoder"),
         ("mlp_in.L", "mlp.1")),
    Case("sae-train-k-without-topk", sae_train("--site", "resid.1", "--kind", "relu", "--k",
                                               "4"), ("--k", "topk")),
    Case("sae-train-k-past-features", sae_train("--site", "resid.1", "--features", "8", "--k",
                                                "16"), ("--k 16", "8 features")),
    Case("sae-train-k-zero", sae_train("--site", "resid.1", "--k", "0"), ("--k",)),
    Case("sae-train-features-zero", sae_train("--site", "resid.1", "--features", "0"),
         ("--features",)),
    Case("sae-train-l1-with-topk", sae_train("--site", "resid.1", "--l1", "1"), ("--l1",)),
    Case("sae-train-l1-negative", sae_train("--site", "resid.1", "--kind", "relu", "--l1",
                                            "-1"), ("--l1",)),
    Case("sae-train-lr-nan", sae_train("--site", "resid.1", "--lr", "nan"), ("--lr",)),
    Case("sae-train-steps-zero", sae_train("--site", "resid.1", "--steps", "0"), ("--steps",)),
    Case("sae-train-context-past-the-model", sae_train("--site", "resid.1", "--context",
                                                       "1000"), ("--context", "64")),
    Case("sae-train-missing-corpus", lambda f: sae_train(
        "--site", "resid.1", texts=f.path("nothere.txt"))(f), ("does not exist",)),
    Case("sae-train-unknown-corpus-name", sae_train("--site", "resid.1", texts="no-such-task"),
         ("neither a file",)),
    Case("sae-train-empty-corpus", lambda f: sae_train(
        "--site", "resid.1", texts=f.text("empty.txt", "\n \n\n"))(f), ("holds no text",)),
    Case("sae-train-corpus-latin-1", lambda f: sae_train("--site", "resid.1", texts=f.raw(
        "latin.txt", "Caf\u00e9 au lait\n".encode("latin-1")))(f), ("UTF-8",)),
    Case("sae-train-jsonl-without-text", lambda f: sae_train("--site", "resid.1", texts=f.text(
        "c.jsonl", '{"body": "x"}\n'))(f), ('"text"',)),
    # the folder is the case's own, holding files of its own: not an SAE's output folder
    Case("sae-train-out-not-ours", lambda f: [
        "sae", "train", IOI, "--site", "resid.1", "--texts", "ioi", "-o",
        str(Path(f.text("notes.txt", "mine")).parent)], ("did not write",)),
    Case("sae-quality-missing-sae", lambda f: ["sae", "quality", IOI, f.path("nosae"),
                                               "--texts", "ioi"], ("no such file",)),
    Case("sae-quality-wrong-width", lambda f: ["sae", "quality", IOI, sae_folder(f, 64),
                                               "--texts", "ioi"], ("64-wide", "128")),
    Case("sae-quality-bad-site", lambda f: ["sae", "quality", IOI, sae_folder(f),
                                            "--site", "foo", "--texts", "ioi"],
         ("not an activation site",)),
]


@pytest.mark.parametrize("case", SAE_CASES, ids=[c.name for c in SAE_CASES])
def test_sae_input_exits_2_with_one_line(case, tmp_path, capsys):
    test_hostile_input_exits_2_with_one_line(case, tmp_path / "no-circuit.json", tmp_path, capsys)


# -- probes: circuits probe (tests/test_probe.py) --------------------------------------------
def probe(*flags: str, labels: str = "ioi") -> Callable[[Files], list[str]]:
    """`circuits probe` on the IOI model with `flags`."""
    return lambda f: ["probe", IOI, "--labels", labels, "-o", "{out}", *flags]


def probe_labels(*labels: str) -> Callable[[Files], list[str]]:
    """`circuits probe` on a labels file with one line (a text of its own) per label."""
    return lambda f: probe(labels=f.text("labels.jsonl", "".join(
        json.dumps({"text": f"When Mary and John went to the {place}", "label": x}) + "\n"
        for x, place in zip(labels, ("store", "park", "school", "garden"), strict=False))))(f)


PROBE_CASES: list[Case] = [
    Case("probe-unknown-label-set", probe(labels="no-such-set"), ("no label set", "ioi")),
    Case("probe-labels-missing-file", lambda f: probe(labels=f.path("none.jsonl"))(f),
         ("none.jsonl",)),
    Case("probe-labels-latin-1", lambda f: probe(labels=f.raw(
        "l.jsonl", '{"text": "Caf\u00e9", "label": "a"}\n'.encode("latin-1")))(f), ("UTF-8",)),
    Case("probe-labels-one-class", probe_labels("a", "a", "a"), ("one class",)),
    Case("probe-class-with-one-example", probe_labels("a", "a", "a", "b"),
         ("'b' has 1 example", "at least 2 of each class")),
    Case("probe-layer-past-the-model", probe("--layers", "9"), ("layers 0 to 3",)),
    Case("probe-layers-not-understood", probe("--layers", "two"), ("not understood",)),
    Case("probe-test-fraction-one", probe("--test-fraction", "1"), ("--test-fraction",)),
    Case("probe-test-fraction-nan", probe("--test-fraction", "nan"), ("--test-fraction",)),
    Case("probe-C-with-mlp", probe("--probe", "mlp", "--C", "2"), ("--C", "linear")),
    Case("probe-hidden-with-linear", probe("--hidden", "8"), ("--hidden", "--probe mlp")),
    Case("probe-C-zero", probe("--C", "0"), ("C must be a positive",)),
    Case("probe-C-inf", probe("--C", "inf"), ("finite",)),
    Case("probe-alpha-negative", probe("--probe", "mlp", "--alpha", "-1"), ("alpha",)),
    Case("probe-hidden-zero", probe("--probe", "mlp", "--hidden", "0"), ("hidden", "1 to")),
    Case("probe-max-iter-billion", probe("--max-iter", str(10**9)), ("max_iter", "100,000")),
    Case("probe-position-not-a-spec", probe("--position", "1:2:3"), ("position",)),
    Case("probe-position-unknown-mark", probe("--position", "subject"), ("no mark 'subject'",)),
    Case("probe-position-past-the-text", probe("--position", "500"), ("outside",)),
    Case("probe-n-one", probe("--n", "1"), ("--n",)),
    Case("probe-seed-negative", probe("--seed", "-1"), ("--seed",)),
    Case("probe-batch-size-zero", probe("--batch-size", "0"), ("--batch-size",)),
    Case("probe-out-is-a-file", lambda f: probe()(f)[:-2] + ["-o", f.text("out.txt", "mine")],
         ("existing file",)),
    Case("probe-unknown-model", lambda f: ["probe", f.path("no-model"), "--labels", "ioi", "-o",
                                           "{out}"], ("no-model",)),
]


@pytest.mark.parametrize("case", PROBE_CASES, ids=[c.name for c in PROBE_CASES])
def test_probe_input_exits_2_with_one_line(case, tmp_path, capsys):
    test_hostile_input_exits_2_with_one_line(case, tmp_path / "no-circuit.json", tmp_path, capsys)


# -- concept erasure: circuits erase (tests/test_erase.py) --------------------------------------
def erase(*flags: str, labels: str = "ioi") -> Callable[[Files], list[str]]:
    """`circuits erase` on the IOI model at layer 1 with `flags`."""
    return lambda f: ["erase", IOI, "--labels", labels, "--layer", "1", "-o", "{out}", *flags]


def erase_labels(*labels: str) -> Callable[[Files], list[str]]:
    """`circuits erase` on a labels file with one line (a distinct text) per label."""
    return lambda f: erase(labels=f.text("labels.jsonl", "".join(
        json.dumps({"text": f"When Mary and John went {i}", "label": x}) + "\n"
        for i, x in enumerate(labels))))(f)


ERASE_CASES: list[Case] = [
    Case("erase-layer-past-the-model", erase("--layer", "9"), ("--layer 9", "layers 0 to 3")),
    Case("erase-labels-one-class", erase_labels(*"aaaaaaaa"), ("two or more classes",)),
    Case("erase-too-few-of-a-class", erase_labels(*"aaabbbbb"),
         ("'a' has 3 example", "at least 4 of each class")),
    Case("erase-n-too-few", erase("--n", "5"), ("--n 5", "too few")),
    Case("erase-min-per-class-too-small", erase("--min-per-class", "2"),
         ("--min-per-class must be at least 4",)),
    Case("erase-labels-missing-file", lambda f: erase(labels=f.path("none.jsonl"))(f),
         ("none.jsonl",)),
    Case("erase-labels-not-json", lambda f: erase(labels=f.text("bad.jsonl", '{"text": \n'))(f),
         ("line 1", "JSON")),
    Case("erase-unknown-label-set", erase(labels="no-such-set"), ("no label set", "ioi")),
    Case("erase-at-not-understood", erase("--at", "first"), ("erase at", "all")),
    Case("erase-at-positive-index", erase("--at", "3"), ("negative token index",)),
    Case("erase-position-not-a-spec", erase("--position", "1:2:3"), ("position",)),
    Case("erase-position-unknown-mark", erase("--position", "subject"), ("no mark 'subject'",)),
    Case("erase-unknown-task", erase("--task", "no-such-task"), ("unknown task",)),
    Case("erase-missing-neutral", lambda f: erase("--neutral", f.path("none.txt"))(f),
         ("does not exist",)),
    Case("erase-prompts-zero", erase("--prompts", "0"), ("--prompts",)),
    Case("erase-seed-negative", erase("--seed", "-1"), ("--seed",)),
    Case("erase-out-is-a-file", lambda f: erase()(f)[:-2] + ["-o", f.text("o.txt", "mine")],
         ("existing file",)),
]


@pytest.mark.parametrize("case", ERASE_CASES, ids=[c.name for c in ERASE_CASES])
def test_erase_input_exits_2_with_one_line(case, tmp_path, capsys):
    test_hostile_input_exits_2_with_one_line(case, tmp_path / "no-circuit.json", tmp_path, capsys)


# -- knowledge editing: circuits edit (tests/test_edit_cli.py) -----------------------------------
FACT = "Big Ben | The landmark Big Ben is located in the city of | Rome"


def edit(*flags: str, fact: str | None = FACT, layer: str | None = "0"
         ) -> Callable[[Files], list[str]]:
    """`circuits edit` of the factual model at ROME's `layer`, into ``{out}``, with `flags`."""
    given = (["--fact", fact] if fact is not None else []) + \
        (["--layer", layer] if layer is not None else [])
    return lambda f: ["edit", "factual-gpt2-4l", *given, "--stats", f.path("stats"), *flags,
                      "--out", "{out}"]


def edit_file(*lines: str, flags: tuple[str, ...] = ()) -> Callable[[Files], list[str]]:
    """`circuits edit` of an edits file holding `lines`."""
    return lambda f: edit("--edits", f.text("edits.jsonl", "\n".join(lines) + "\n"), *flags,
                          fact=None)(f)


def _folder_with(f: Files, name: str, file: str) -> str:
    """A folder `name` in the case's folder holding one file."""
    (f.root / name).mkdir()
    f.text(f"{name}/{file}", "mine")
    return f.path(name)


def edit_model_folder(f: Files) -> list[str]:
    """`circuits edit` of a model folder, written into that folder."""
    folder = str(f.model())
    return ["edit", folder, "--fact", "John | When Mary and John | Mary", "--layer", "0",
            "--out", folder]


GOOD_EDIT = json.dumps({"subject": "Big Ben", "prompt": "Big Ben is in", "target": "Rome"})

EDIT_CASES: list[Case] = [
    Case("edit-fact-two-parts", edit(fact="Big Ben | Rome"), ("--fact 1", "2 parts")),
    Case("edit-fact-four-parts", edit(fact="a | a b | c | d"), ("4 parts",)),
    Case("edit-subject-not-in-prompt", edit(fact="Big Ben | The tower is in the city of | Rome"),
         ("--fact 1", "does not occur in the prompt")),
    Case("edit-empty-target", edit(fact="Big Ben | Big Ben is in | "), ("target is empty",)),
    Case("edit-target-unknown-token", edit(fact="Big Ben | Big Ben is in | Zanzibar"),
         ("--fact 1", "unknown token")),
    Case("edit-old-unknown-token", edit_file(json.dumps(
        {"subject": "Big Ben", "prompt": "Big Ben is in", "target": "Rome", "old": "Zanzibar"})),
         ("edits.jsonl line 1", "old target", "unknown token")),
    Case("edit-old-is-the-target", edit_file(json.dumps(
        {"subject": "Big Ben", "prompt": "Big Ben is in", "target": "Rome", "old": "Rome"})),
         ("same token",)),
    Case("edit-already-the-prediction", edit(fact="Big Ben | The landmark Big Ben is located in "
                                             "the city of | London"), ("already predicts",)),
    Case("edit-layer-out-of-range", edit(layer="9"), ("--layer 9", "layers 0 to 3")),
    Case("edit-layers-out-of-range", edit("--method", "memit", "--layers", "2:7", layer=None),
         ("layer 4 is out of range", "0 to 3")),
    Case("edit-layers-not-understood", edit("--method", "memit", "--layers", "a:b", layer=None),
         ("not understood",)),
    Case("edit-layer-with-memit", edit("--method", "memit"), ("--layer is ROME's",)),
    Case("edit-weight-with-rome", edit("--weight", "10"), ("--weight",)),
    Case("edit-weight-infinite", edit("--method", "memit", "--weight", "inf", layer=None),
         ("--weight", "finite")),
    Case("edit-prompt-past-the-context", edit(fact="Big Ben | " + "Big Ben is in the city " * 20
                                              + "of | Rome"), ("--fact 1", "context of")),
    Case("edit-no-edits", edit(fact=None), ("give the edits", "--fact")),
    Case("edit-no-out", lambda f: edit()(f)[:-2], ("--out DIR is required", "--dry-run")),
    Case("edit-dry-run-and-out", edit("--dry-run"), ("--dry-run", "--out")),
    Case("edit-out-is-the-model-folder", edit_model_folder, ("source model's folder",)),
    Case("edit-out-not-empty", lambda f: edit()(f)[:-1] + [_folder_with(f, "o", "mine.txt")],
         ("not empty",)),
    Case("edit-out-is-a-file", lambda f: edit()(f)[:-1] + [f.text("o.txt", "mine")],
         ("existing file",)),
    Case("edit-value-options-unknown", edit("--value-options", "speed=2"),
         ("--value-options", "steps")),
    Case("edit-value-options-not-a-number", edit("--value-options", "steps=many"),
         ("steps=many", "int")),
    Case("edit-generate-zero", edit("--generate", "0"), ("--generate",)),
    Case("edit-sample-missing", lambda f: edit("--sample", f.path("none.txt"))(f),
         ("does not exist",)),
    Case("edit-file-missing", lambda f: edit("--edits", f.path("none.jsonl"), fact=None)(f),
         ("does not exist",)),
    Case("edit-file-empty", edit_file("", " "), ("empty",)),
    Case("edit-file-a-device", edit("--edits", "/dev/zero", fact=None), ("not a regular file",)),
    Case("edit-file-not-json", edit_file(GOOD_EDIT, '{"subject": '), ("line 2", "not JSON")),
    Case("edit-file-not-an-object", edit_file("[1, 2]"), ("line 1", "not a JSON object")),
    Case("edit-file-missing-target", edit_file(json.dumps(
        {"subject": "Big Ben", "prompt": "Big Ben is in"})), ("line 1", "'target'")),
    Case("edit-file-unknown-field", edit_file(json.dumps(
        {"subject": "Big Ben", "prompt": "Big Ben is in", "target": "Rome", "new": "x"})),
         ("unknown field 'new'",)),
    Case("edit-file-neighbours-not-a-list", edit_file(GOOD_EDIT, json.dumps(
        {"subject": "Big Ben", "prompt": "Big Ben is in", "target": "Rome",
         "neighbours": "The Louvre is in"})), ("line 2", "'neighbours'")),
    Case("edit-file-paraphrase-without-subject", edit_file(json.dumps(
        {"subject": "Big Ben", "prompt": "Big Ben is in", "target": "Rome",
         "paraphrases": ["It is in"]})), ("paraphrase", "does not name the subject")),
]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", EDIT_CASES, ids=[c.name for c in EDIT_CASES])
def test_edit_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, capsys):
    files = Files(tmp_path, tmp_path / "no-circuit.json")
    argv = [a.replace("{out}", str(tmp_path / "out")) for a in case.argv(files)]
    before = _tree(tmp_path)
    folders = sorted(p for p in tmp_path.rglob("*") if p.is_dir())
    exits_2_with_one_line(argv, case.words, capsys)
    # nothing written anywhere: no output folder, no key statistics, no file changed
    assert _tree(tmp_path) == before
    assert sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == folders
