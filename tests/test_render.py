"""Graphviz diagrams: every format is produced and the DOT source says what it should."""

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
