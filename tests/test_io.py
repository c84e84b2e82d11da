"""Circuit files: lossless JSON, clear errors on bad files, atomic writes; GraphML, DOT, MIB."""

import json
import math
import shutil
import subprocess

import networkx as nx
import pytest
import torch

import circuits.io as cio
from circuits.circuit import Circuit, circuit_from_edges, select
from circuits.errors import CircuitFileError, OptionError
from circuits.graph import Graph
from circuits.io import load_circuit
from circuits.scores import Scores


def edge_circuit():
    g = Graph(2, 2)
    # float32 scores with awkward decimals: the round trip must keep every bit
    v = torch.randn(g.n_sources, g.n_destinations, generator=torch.Generator().manual_seed(0))
    c = select(Scores(g, v * g.valid, task="toy", model="tiny", method="rand",
                      options={"steps": 5, "ablation": "resample"}), top_k=25)
    c.metrics.update(faithfulness=0.8125, metric_model=1.5)
    return c


def same(a: Circuit, b: Circuit) -> None:
    assert a.mask.equal(b.mask) and a.level == b.level
    assert (a.values is None and b.values is None) or a.values.equal(b.values)
    assert (a.task, a.model, a.method) == (b.task, b.model, b.method)
    assert a.options == b.options and a.metrics == b.metrics
    assert (a.graph.n_layers, a.graph.n_heads, a.graph.parallel) == (
        b.graph.n_layers, b.graph.n_heads, b.graph.parallel)


def test_json_round_trip_is_lossless(tmp_path):
    for c in (edge_circuit(),
              select(Scores(Graph(2, 2), torch.tensor([0.0, 1.5, -0.25, 0.125, 2.0, -3.0,
                                                      0.5]), level="node"), top_k=3),
              circuit_from_edges(Graph(1, 1), ["input->m0", "m0->logits"])):
        path = c.save(tmp_path / "c.json")
        same(c, load_circuit(path))
    doc = json.loads(path.read_text())
    assert doc["format"] == "circuits.circuit" and doc["version"] == 1
    assert doc["package_version"]


def test_bad_files_raise_circuit_file_error(tmp_path):
    path = edge_circuit().save(tmp_path / "c.json")
    text = path.read_text()
    bad = tmp_path / "bad.json"
    cases = {
        "truncated": text[: len(text) // 2],
        "not JSON": "\x00garbage",
        "version": text.replace('"version":1', '"version":99'),
        "format": text.replace('"circuits.circuit"', '"other"'),
        "missing edge": json.dumps({**json.loads(text), "edges": {}}),
    }
    doc = json.loads(text)
    kept_node = next(n for n, e in doc["nodes"].items() if e["in_circuit"] and n != "input")
    doc["nodes"][kept_node]["in_circuit"] = False
    cases["inconsistent node"] = json.dumps(doc)
    doc = json.loads(text)
    doc["edges"]["input->a0.h0<q>"]["score"] = "high"
    cases["score type"] = json.dumps(doc)
    for what, content in cases.items():
        bad.write_text(content)
        with pytest.raises(CircuitFileError, match=str(bad)):
            load_circuit(bad)
        assert what
    with pytest.raises(CircuitFileError, match="cannot read"):
        load_circuit(tmp_path / "missing.json")


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = edge_circuit().save(tmp_path / "c.json")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(cio.os, "fsync", broken)
    with pytest.raises(RuntimeError):
        edge_circuit().save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left


def test_graphml_opens_with_networkx(tmp_path):
    c = edge_circuit()
    g = nx.read_graphml(c.export(tmp_path / "c.graphml"), force_multigraph=True)
    assert g.number_of_edges() == c.n_edges and set(g.nodes) == set(c.nodes)
    a = next(iter(g.edges(data=True)))[2]
    assert isinstance(a["score"], float) and isinstance(a["in_circuit"], bool)
    full = nx.read_graphml(c.export(tmp_path / "f.graphml", full=True))
    assert full.number_of_edges() == c.graph.n_edges


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not installed")
def test_dot_export_opens_with_graphviz(tmp_path):
    path = edge_circuit().export(tmp_path / "c.dot")
    run = subprocess.run(["dot", "-Tsvg", str(path)], capture_output=True, timeout=60)
    assert run.returncode == 0 and b"<svg" in run.stdout


def test_mib_layout(tmp_path):
    c = edge_circuit()
    with pytest.raises(OptionError):
        c.export(tmp_path / "x.json", format="mib")  # MIB records d_model
    doc = json.loads(c.export(tmp_path / "imp.json", format="mib", d_model=16).read_text())
    assert doc["cfg"] == {"n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "parallel_attn_mlp": False,
                          "d_model": 16}
    assert list(doc["nodes"])[:3] == ["input", "a0.h0", "a0.h1"] and "logits" in doc["nodes"]
    assert len(doc["edges"]) == c.graph.n_edges
    assert sum(e["in_graph"] for e in doc["edges"].values()) == c.n_edges
    e = "input->a0.h0<q>"
    assert doc["edges"][e]["score"] == float(c.values[c.graph.edge_index(e)])

    folder = c.export(tmp_path / "toy_tiny", format="mib", d_model=16, binary=True)
    files = sorted(folder.iterdir())
    assert len(files) == 10
    for f in files:
        budget = float(f.stem.split("_")[1]) / 100
        d = json.loads(f.read_text())
        kept = sum(e["in_graph"] for e in d["edges"].values())
        # every edge's score, which MIB's loaders read
        assert kept <= budget * c.graph.n_edges and d["edges"][e] == {
            "score": doc["edges"][e]["score"], "in_graph": d["edges"][e]["in_graph"]}


# -- strict JSON ----------------------------------------------------------------------------------
def strict_loads(text):
    """json.loads that refuses NaN and Infinity, as JavaScript's JSON.parse does."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_dumps_writes_null_for_every_non_finite_number():
    import numpy as np

    nan, inf = float("nan"), float("inf")
    obj = {"a": nan, "b": [1.5, -inf, (inf, 2)], "c": {"d": {"e": nan}}, "f": np.float32(nan),
           "g": np.float64(0.25), "h": torch.tensor(inf), "i": torch.tensor([1.0, nan]),
           "j": np.array([-inf, 3.0]), "k": "NaN", "l": True, "m": None, "n": 7}
    text = cio.dumps(obj, allow_nan=True, sort_keys=True)  # allow_nan cannot be turned back on
    assert strict_loads(text) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": {"e": None}},
                                  "f": None, "g": 0.25, "h": None, "i": [1.0, None],
                                  "j": [None, 3.0], "k": "NaN", "l": True, "m": None, "n": 7}
    assert cio.dumps([1.0], indent=1) == "[\n 1.0\n]"


def test_nan_faithfulness_of_a_real_evaluation_is_saved_as_null(tmp_path):
    from circuits.batch import Batch
    from circuits.setup import Setup
    from circuits.testing import tiny_gpt2

    # answer == wrong: the logit difference is 0 with any circuit, so faithfulness is 0 / 0
    same_token = torch.tensor([[3], [4]])
    batch = Batch(torch.randint(1, 32, (2, 5)), torch.randint(1, 32, (2, 5)), same_token,
                  same_token)
    setup = Setup(tiny_gpt2(n_layer=2, n_head=2), [batch], "logit-diff", "resample")
    c = edge_circuit()
    c.evaluate(setup)
    assert math.isnan(c.metrics["faithfulness"])
    text = c.save(tmp_path / "c.json").read_text()
    assert strict_loads(text)["metrics"]["faithfulness"] is None
    assert math.isnan(load_circuit(tmp_path / "c.json").metrics["faithfulness"])


def test_metrics_null_and_old_nan_literals_load_as_nan(tmp_path):
    c = edge_circuit()
    c.metrics.update(faithfulness=math.nan, cpr=math.inf, n_edges=25)
    path = c.save(tmp_path / "c.json")
    doc = strict_loads(path.read_text())
    assert doc["metrics"]["faithfulness"] is None and doc["metrics"]["cpr"] is None
    back = load_circuit(path).metrics
    assert math.isnan(back["faithfulness"]) and math.isnan(back["cpr"])
    assert back["n_edges"] == 25 and back["metric_model"] == 1.5
    # files written before strict JSON hold a bare NaN token: still read
    path.write_text(path.read_text().replace('"faithfulness":null', '"faithfulness":NaN'))
    assert math.isnan(load_circuit(path).metrics["faithfulness"])


def test_mib_exports_are_strict_json(tmp_path):
    c = edge_circuit()
    c.values[c.graph.edge_index("input->a0.h0<q>")] = math.nan
    doc = strict_loads(c.export(tmp_path / "imp.json", format="mib", d_model=16).read_text())
    assert doc["edges"]["input->a0.h0<q>"]["score"] is None
    node = select(Scores(Graph(1, 1), torch.tensor([0.0, 1.0, 2.0]), level="node"), top_k=1)
    doc = strict_loads(node.export(tmp_path / "n.json", format="mib", d_model=8).read_text())
    assert all(e["score"] is None for e in doc["edges"].values())  # node scores: no edge scores
    assert doc["nodes"]["m0"]["score"] == 2.0


# -- validation of circuit files ------------------------------------------------------------------
def saved(tmp_path, doc, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def edge_doc():
    return json.loads(json.dumps(cio.circuit_to_dict(edge_circuit())))


@pytest.mark.parametrize("graph, message", [
    ({"n_layers": 1000}, "does not match the edges"),
    ({"n_layers": 10**9}, "n_layers is 1000000000; it must be an integer from 0 to 1024"),
    ({"n_heads": 10**9}, "n_heads is 1000000000; it must be an integer from 1 to 1024"),
    ({"n_layers": 3}, "has 100 edges but the file lists 46"),
    ({"n_layers": True}, "n_layers is true"),
    ({"n_heads": 2.0}, "n_heads is 2.0"),
    ({"n_heads": 0}, "n_heads is 0"),
    ({"n_layers": -1}, "n_layers is -1"),
    ({"n_kv_heads": 4}, "n_kv_heads is 4; it must be a positive integer that divides"),
    ({"n_kv_heads": 0}, "n_kv_heads is 0"),
    ({"n_kv_heads": 1}, "does not match the edges"),
    ({"parallel": "no"}, "parallel is 'no'; it must be true or false"),
    ({"parallel": True}, "does not match the edges"),
])
def test_implausible_or_mismatched_graph_is_refused_before_it_is_built(tmp_path, monkeypatch,
                                                                        graph, message):
    built = []

    class Spy(Graph):
        def __init__(self, *args, **kwargs):
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cio, "Graph", Spy)
    doc = edge_doc()
    doc["graph"].update(graph)
    with pytest.raises(CircuitFileError, match=message):
        load_circuit(saved(tmp_path, doc))
    assert built == []  # nothing sized by the bad shape was allocated
    del doc["graph"]["n_layers"]
    with pytest.raises(CircuitFileError, match="n_layers is missing"):
        load_circuit(saved(tmp_path, doc))
    assert load_circuit(saved(tmp_path, edge_doc())).n_edges == 25 and len(built) == 1


@pytest.mark.parametrize("score, shown", [
    ("NaN", "NaN"), ("Infinity", "Infinity"), ("-Infinity", "-Infinity"), ("1e39", "1e\\+39"),
    ("1" + "0" * 400, "a huge integer"), ('"0.5"', "'0.5'"), ("true", "true"), ("[1]", "a list"),
])
def test_scores_must_be_finite_numbers(tmp_path, score, shown):
    path = edge_circuit().save(tmp_path / "c.json")
    text = path.read_text()
    edge = '"input->a0.h1<k>":{"in_circuit":false,"score":'
    start = text.index(edge) + len(edge)
    end = text.index("}", start)
    path.write_text(text[:start] + score + text[end:])
    with pytest.raises(CircuitFileError, match=f"edge 'input->a0.h1<k>' has score {shown}"):
        load_circuit(path)


def test_null_or_missing_scores_are_refused_with_the_name(tmp_path):
    doc = edge_doc()
    doc["edges"]["a0.h1->m1"]["score"] = None
    with pytest.raises(CircuitFileError, match=r"edge 'a0.h1->m1' has no score \(null\)"):
        load_circuit(saved(tmp_path, doc))
    del doc["edges"]["a0.h1->m1"]["score"]
    with pytest.raises(CircuitFileError, match=r"edge 'a0.h1->m1' has no score \(missing\)"):
        load_circuit(saved(tmp_path, doc))
    doc["has_scores"] = False  # a score-less circuit needs none
    assert load_circuit(saved(tmp_path, doc)).values is None

    node = select(Scores(Graph(1, 1), torch.tensor([0.0, 1.0, 2.0]), level="node"), top_k=1)
    doc = json.loads(json.dumps(cio.circuit_to_dict(node)))
    doc["nodes"]["a0.h0"]["score"] = float("nan")
    with pytest.raises(CircuitFileError, match="node 'a0.h0' has score NaN"):
        load_circuit(saved(tmp_path, doc))


@pytest.mark.parametrize("where, value, message", [
    ("options", [], "'options' must be an object"),
    ("metrics", [0.5], "'metrics' must be an object"),
    ("metrics", {"faithfulness": "high"}, "metric 'faithfulness' is 'high'"),
    ("metrics", {"faithfulness": [1]}, "metric 'faithfulness' is a list"),
    ("has_scores", "yes", "'has_scores' is 'yes'; it must be true or false"),
    ("level", "graph", "level is 'graph'; it must be 'edge' or 'node'"),
    ("level", ["edge"], "level is a list"),
    ("task", 5, "'task' is 5; it must be a string"),
    ("edges", [], "'nodes' and 'edges' must be objects"),
    ("nodes", None, "'nodes' and 'edges' must be objects"),
    ("graph", [2, 2], "'graph' must be an object"),
    ("version", True, "version true is not supported"),
    ("version", "1", "version '1' is not supported"),
    ("options", {"seed": "x"}, "option 'seed' is 'x'; it must be an integer"),
    ("options", {"d_model": -5}, "option 'd_model' is -5; it must be a positive integer"),
    ("options", {"top_k": 2.5}, "option 'top_k' is 2.5"),
    ("options", {"signed": "yes"}, "option 'signed' is 'yes'; it must be true or false"),
    ("options", {"metric": 3}, "option 'metric' is 3; it must be a string or null"),
])
def test_wrong_types_are_refused(tmp_path, where, value, message):
    doc = edge_doc()
    doc[where] = value
    with pytest.raises(CircuitFileError, match=message):
        load_circuit(saved(tmp_path, doc))


def test_wrong_entries_are_refused(tmp_path):
    doc = edge_doc()
    doc["edges"]["a0.h1->m1"] = [True, 0.5]
    with pytest.raises(CircuitFileError, match="edge 'a0.h1->m1' needs a boolean 'in_circuit'"):
        load_circuit(saved(tmp_path, doc))
    doc = edge_doc()
    doc["nodes"]["m1"]["in_circuit"] = "true"
    with pytest.raises(CircuitFileError, match="node 'm1' needs a boolean 'in_circuit'"):
        load_circuit(saved(tmp_path, doc))
    doc = edge_doc()
    doc["edges"]["a0.h1->m9"] = doc["edges"].pop("a0.h1->m1")  # renamed: same count
    with pytest.raises(CircuitFileError, match="1 edges of the graph are missing.*'a0.h1->m9'"):
        load_circuit(saved(tmp_path, doc))


def test_huge_deep_or_oversized_files_are_refused(tmp_path):
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(cio.MAX_FILE_BYTES + 1)  # sparse: costs no disk and is never read
    with pytest.raises(CircuitFileError, match="larger than 512 MiB"):
        load_circuit(big)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CircuitFileError, match="nested too deeply"):
        load_circuit(deep)
    digits = tmp_path / "digits.json"
    digits.write_text('{"version": ' + "9" * 5000 + "}")
    with pytest.raises(CircuitFileError, match="not a circuit JSON"):
        load_circuit(digits)
    with pytest.raises(CircuitFileError, match="cannot read it"):
        load_circuit(tmp_path)  # a folder
    with pytest.raises(OptionError, match="needs a file path"):
        load_circuit(None)


def test_mib_d_model_must_be_a_positive_integer(tmp_path):
    import numpy as np

    c = edge_circuit()
    for bad in (-5, 0, True, 2.5, "768"):
        with pytest.raises(OptionError, match="d_model must be a positive integer"):
            c.export(tmp_path / "x.json", format="mib", d_model=bad)
        with pytest.raises(OptionError, match="d_model must be a positive integer"):
            c.export(tmp_path / "folder", format="mib", d_model=bad, binary=True)
    assert not (tmp_path / "folder").exists() and not (tmp_path / "x.json").exists()
    c.options["d_model"] = -1
    with pytest.raises(OptionError, match="got -1"):
        cio.mib_dict(c)
    assert cio.mib_dict(c, d_model=np.int64(16))["cfg"]["d_model"] == 16
