"""Property tests: the circuit loader and the selection parser accept or refuse cleanly.

Whatever a circuit file holds, `load_circuit` returns a Circuit or raises CircuitFileError, and
never builds a graph larger than the file lists edges for; whatever text a selection is, it
parses to valid `select` arguments or raises OptionError.
"""

import copy
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import circuits.io as cio
from circuits.circuit import Circuit, circuit_from_edges, parse_selection, select
from circuits.errors import CircuitFileError, OptionError
from circuits.graph import Graph
from circuits.scores import Scores

FAST = settings(max_examples=200, deadline=None, derandomize=True)


def documents() -> list[dict]:
    """Saved circuits of each kind: edge and node level, grouped-query, score-less."""
    g = Graph(2, 2)
    v = torch.randn(g.n_sources, g.n_destinations, generator=torch.Generator().manual_seed(0))
    edge = select(Scores(g, v * g.valid, task="toy", model="tiny-gpt2", method="rand",
                         options={"seed": 0, "ablation": "resample"}), top_k=12)
    edge.metrics.update(faithfulness=math.nan, metric_model=1.5)
    gqa = Graph(1, 4, n_kv_heads=2)
    grouped = select(Scores(gqa, torch.randn(gqa.n_sources, gqa.n_destinations,
                                             generator=torch.Generator().manual_seed(1))
                            * gqa.valid), threshold=0.5)
    node = select(Scores(Graph(2, 1), torch.tensor([0.0, 1.5, -0.25, 0.125, 2.0]),
                         level="node"), top_k=2)
    bare = circuit_from_edges(Graph(1, 1), ["input->m0", "m0->logits"])
    # through strict JSON text, as on disk
    return [json.loads(cio.dumps(cio.circuit_to_dict(c))) for c in (edge, grouped, node, bare)]


DOCUMENTS = documents()
BIGGEST = max(len(d["edges"]) for d in DOCUMENTS)

scalars = st.one_of(
    st.none(), st.booleans(), st.text(max_size=8),
    st.sampled_from([0, 1, -1, 2, 1024, 1025, 10**9, 10**400, -(10**400), 2**63]),
    st.integers(), st.floats(allow_nan=True, allow_infinity=True),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


class SizeGuard(Graph):
    """A Graph that fails the test when it is built larger than any document lists edges for."""

    def __init__(self, n_layers: int, n_heads: int, parallel: bool = False,
                 n_kv_heads: int | None = None) -> None:
        n = Graph.edge_count(n_layers, n_heads, n_kv_heads, parallel)
        assert n <= BIGGEST, f"built a graph of {n} edges"
        super().__init__(n_layers, n_heads, parallel, n_kv_heads)


def load_or_refuse(doc: object) -> Circuit | None:
    """`circuit_from_dict(doc)` or None for a CircuitFileError; anything else fails."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cio, "Graph", SizeGuard)
        try:
            circuit = cio.circuit_from_dict(doc)
        except CircuitFileError as err:
            assert "\n" not in str(err)
            return None
    # what loads is usable: finite scores, and it saves and loads back the same
    assert circuit.values is None or bool(circuit.values.isfinite().all())
    again = cio.circuit_from_dict(json.loads(cio.dumps(cio.circuit_to_dict(circuit))))
    assert again.mask.equal(circuit.mask)
    return circuit


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_load_or_raise_circuit_file_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.json"
        path.write_bytes(data)
        with pytest.raises(CircuitFileError):
            cio.load_circuit(path)


@FAST
@given(json_values)
def test_any_json_value_loads_or_raises_circuit_file_error(value):
    assert load_or_refuse(value) is None


def paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON document (lists by index)."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


def get(doc: object, path: tuple) -> object:
    for key in path:
        doc = doc[key]
    return doc


@st.composite
def near_valid(draw: st.DrawFn) -> dict:
    """A saved circuit with 1-3 random edits: keys deleted or renamed, values replaced by any
    JSON value (NaN, huge integers, wrong types), graph sizes changed, edges dropped."""
    doc = copy.deepcopy(draw(st.sampled_from(DOCUMENTS)))
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["delete", "replace", "rename", "graph", "drop edges"]))
        if edit == "graph":
            key = draw(st.sampled_from(["n_layers", "n_heads", "n_kv_heads", "parallel"]))
            if isinstance(doc.get("graph"), dict):
                doc["graph"][key] = draw(scalars)
            continue
        if edit == "drop edges":
            if isinstance(doc.get("edges"), dict) and doc["edges"]:
                names = sorted(doc["edges"])
                for name in draw(st.lists(st.sampled_from(names), max_size=3)):
                    doc["edges"].pop(name, None)
            continue
        path = draw(st.sampled_from(paths(doc)[1:]))
        parent, key = get(doc, path[:-1]), path[-1]
        if edit == "delete":
            del parent[key]
        elif edit == "replace":
            parent[key] = draw(json_values)
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=12))] = parent.pop(key)
    return doc


@FAST
@given(near_valid())
def test_edited_circuit_files_load_or_raise_circuit_file_error(doc):
    load_or_refuse(doc)


@FAST
@given(near_valid())
def test_edited_circuit_files_on_disk(doc):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.json"
        path.write_text(json.dumps(doc))  # Python's json: NaN and Infinity tokens included
        try:
            cio.load_circuit(path)
        except CircuitFileError:
            pass


def test_the_unedited_documents_load():
    for doc in DOCUMENTS:
        assert isinstance(load_or_refuse(doc), Circuit)


# -- the selection parser ------------------------------------------------------------------------
selections = st.one_of(
    st.text(max_size=30),
    st.builds(lambda kind, value: f"{kind}:{value}",
              st.sampled_from(["threshold", "topk", "top-k", "faithfulness", "TopK", ""]),
              st.one_of(st.text(max_size=12), st.integers().map(str),
                        st.floats(allow_nan=True, allow_infinity=True).map(str),
                        st.from_regex(r"[-+]?[0-9]*\.?[0-9]*([eE][-+]?[0-9]+)?", fullmatch=True))),
)


@FAST
@given(selections)
def test_any_selection_text_parses_to_valid_arguments_or_raises_option_error(text):
    try:
        parsed = parse_selection(text)
    except OptionError as err:
        assert "\n" not in str(err)
        return
    ((name, value),) = parsed.items()
    if name == "top_k":
        assert type(value) is int and value >= 0
    else:
        assert type(value) is float and math.isfinite(value)
        assert name == "threshold" or 0 < value <= 1
    if name != "faithfulness":  # which needs a setup to run
        g = Graph(1, 1)
        select(Scores(g, torch.ones(g.n_sources, g.n_destinations)), **parsed)


@FAST
@given(st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=8),
                 st.lists(st.text(max_size=4), max_size=2)))
def test_a_selection_that_is_not_text_raises_option_error(value):
    with pytest.raises(OptionError):
        parse_selection(value)


@FAST
@given(st.sampled_from(["threshold", "top_k", "faithfulness"]), json_values)
def test_select_accepts_or_raises_option_error(rule, value):
    g = Graph(1, 1)
    scores = Scores(g, torch.arange(g.n_sources * g.n_destinations).float().view(g.n_sources, -1))
    try:
        circuit = select(scores, **{rule: value})
    except OptionError:
        return
    assert rule != "faithfulness" and circuit.n_edges <= g.n_edges
