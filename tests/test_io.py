"""Circuit files: lossless JSON, clear errors on bad files, atomic writes; GraphML, DOT, MIB."""

import json
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
        assert kept <= budget * c.graph.n_edges and "score" not in d["edges"][e]
