"""Graphviz diagrams: every format is produced and the DOT source says what it should."""

import math
import shutil
import subprocess

import pytest
import torch

from circuits.circuit import select
from circuits.errors import OptionError
from circuits.graph import Graph
from circuits.scores import Scores

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' not installed")


def small_circuit():
    g = Graph(2, 2)
    v = torch.zeros(g.n_sources, g.n_destinations)
    for name, s in [("input->a0.h1<q>", 1.0), ("input->a0.h1<v>", 0.5), ("a0.h1->m1", -2.0),
                    ("m1->logits", 3.0), ("a0.h1->a1.h0<k>", 0.7), ("a1.h0->logits", 0.4)]:
        v[g.edge_index(name)] = s
    c = select(Scores(g, v, task="toy", model="tiny", method="hand"), top_k=6)
    c.metrics["faithfulness"] = 0.75
    return c


def test_dot_source_has_ports_colours_and_title(tmp_path):
    c = small_circuit()
    src = c.render(tmp_path / "c.dot").read_text()
    # nodes: input, a0.h1, a1.h0, m1, logits
    assert "toy · tiny · hand — 6 edges, 5 nodes, faithfulness 0.750" in src
    assert '"a0.h1":q:s' in src and '"a1.h0":k:s' in src  # edges land on q/k/v ports
    assert "rankdir=BT" in src and "rank=same" in src
    assert "#b2182b" in src and "#2166ac" in src  # the negative a0.h1->m1 edge is red
    assert "rankdir=TB" in c.render(tmp_path / "r.dot", reverse=True).read_text()


@needs_dot
@pytest.mark.parametrize("fmt,magic", [("svg", b"<?xml"), ("png", b"\x89PNG"), ("pdf", b"%PDF")])
def test_formats(tmp_path, fmt, magic):
    path = small_circuit().render(tmp_path / f"c.{fmt}")
    assert path.read_bytes().startswith(magic)


@needs_dot
def test_dot_file_renders_with_dot(tmp_path):
    path = small_circuit().render(tmp_path / "c.gv")
    run = subprocess.run(["dot", "-Tsvg", str(path)], capture_output=True, timeout=60)
    assert run.returncode == 0 and b"<svg" in run.stdout


def test_unknown_format(tmp_path):
    with pytest.raises(OptionError):
        small_circuit().render(tmp_path / "c.bmp")


def test_nan_and_infinite_scores_are_drawn_grey_and_thin(tmp_path):
    from circuits.render import NEUTRAL, to_graphviz

    c = small_circuit()
    g = c.graph
    c.values[g.edge_index("input->a0.h1<v>")] = math.nan
    c.values[g.edge_index("a0.h1->a1.h0<k>")] = math.inf
    c.values[g.edge_index("m0->logits")] = math.nan  # not in the circuit: ignored
    c.metrics["faithfulness"] = math.nan
    src = to_graphviz(c).source
    nan_edge = next(line for line in src.splitlines() if "input->a0.h1<v>: nan" in line)
    inf_edge = next(line for line in src.splitlines() if "a0.h1->a1.h0<k>: inf" in line)
    for line in (nan_edge, inf_edge):
        assert f'color="{NEUTRAL}"' in line and "penwidth=0.50" in line
    # the finite scores keep their scale: m1->logits (3.0) is the strongest, at max_width 5
    strongest = next(line for line in src.splitlines() if "m1->logits: 3" in line)
    assert "penwidth=5.00" in strongest
    assert "6 edges, 5 nodes" in src and "faithfulness" not in src.split("legend")[0]
    assert c.render(tmp_path / "c.dot").read_text() == src


def test_node_scores_with_nan_render():
    g = Graph(1, 2)
    c = select(Scores(g, torch.tensor([0.0, math.nan, 1.0, 2.0]), level="node"), top_k=2)
    from circuits.render import to_graphviz

    assert "a0.h0" not in to_graphviz(c).source  # a NaN node score ranks last
    c.values[3] = math.nan  # m0 is in the circuit: its tooltip says nan
    assert 'tooltip="m0: nan"' in to_graphviz(c).source


@pytest.mark.parametrize("options", [dict(min_width=-1), dict(max_width=math.nan),
                                     dict(min_width="1"), dict(min_width=True),
                                     dict(max_width=10**5000), dict(min_width=3, max_width=2)])
def test_bad_widths(tmp_path, options):
    with pytest.raises(OptionError, match="width"):
        small_circuit().render(tmp_path / "c.dot", **options)


def test_heads_are_labelled_with_their_role_and_it_survives_saving(tmp_path):
    from circuits.io import load_circuit

    c = small_circuit()
    c.node_info["a0.h1"] = {"role": "induction", "role_score": 0.934, "dla": 1.5}
    c.curve = {"fractions": [0.5, 1.0], "n_edges": [3, 6], "faithfulness": [0.4, 1.0]}
    loaded = load_circuit(c.save(tmp_path / "c.json"))
    assert loaded.node_info == {"a0.h1": {"role": "induction", "role_score": 0.934, "dla": 1.5}}
    assert loaded.curve == c.curve
    src = loaded.render(tmp_path / "c.dot").read_text()
    assert "<B>a0.h1</B><BR/>" in src and ">induction 0.93</FONT>" in src
    assert "a1.h0</B></TD>" in src  # a head without a role keeps its one-line label
    # a file saved without roles or curve (as before them) loads with neither
    plain = load_circuit(small_circuit().save(tmp_path / "plain.json"))
    assert plain.node_info == {} and plain.curve is None


def test_bad_node_info_in_a_file_is_one_clear_error(tmp_path):
    import json

    from circuits.errors import CircuitFileError
    from circuits.io import load_circuit

    path = small_circuit().save(tmp_path / "c.json")
    doc = json.loads(path.read_text())
    doc["nodes"]["a0.h1"]["attention"] = {"tokens": ["a", "b"], "pattern": [[1.0]]}
    path.write_text(json.dumps(doc))
    with pytest.raises(CircuitFileError, match="node 'a0.h1': 'attention'"):
        load_circuit(path)
