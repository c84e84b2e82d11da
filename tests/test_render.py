"""Graphviz diagrams: every format is produced and the DOT source says what it should."""

import html
import math
import re
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
    assert "toy · tiny · hand — 6 edges, 5 nodes, discovery faithfulness 0.750" in src
    assert "drawn" not in src  # every edge of a small circuit is drawn, on its own port
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


def laid_out(src: str) -> dict[str, tuple[float, float]]:
    """Node name -> (x, y) centre, as graphviz lays out the DOT source `src`."""
    plain = subprocess.run(["dot", "-Tplain"], input=src, capture_output=True, text=True,
                           timeout=60, check=True).stdout
    return {p[1].strip('"'): (float(p[2]), float(p[3]))
            for p in (line.split() for line in plain.splitlines()) if p[0] == "node"}


def skipping_circuit():
    """Edges that skip layers (a0 -> a2, m0 -> a1 -> a3) and MLPs joined only to input and
    logits: nothing but the layout's own rule keeps the rows in the model's order."""
    g = Graph(4, 4)
    names = ["input->a0.h1<q>", "a0.h1->a2.h0<v>", "a2.h0->logits", "input->m0", "m0->a1.h3<k>",
             "a1.h3->a3.h2<q>", "a3.h2->logits", "input->m2", "m2->logits", "input->a1.h0<q>",
             "a1.h0->m3", "m3->logits", "input->a2.h2<v>", "a2.h2->logits", "input->a3.h0<q>",
             "a3.h0->logits", "input->a2.h3<q>", "a2.h3->logits", "input->a2.h1<k>",
             "a2.h1->logits"]
    v = torch.zeros(g.n_sources, g.n_destinations)
    for i, name in enumerate(names):
        v[g.edge_index(name)] = 1.0 + i / 10
    return select(Scores(g, v, task="toy", model="tiny", method="hand"), top_k=len(names))


@needs_dot
@pytest.mark.parametrize("reverse", [False, True])
def test_rows_follow_the_model_order_and_heads_their_index(reverse):
    from circuits.render import to_graphviz

    c = skipping_circuit()
    assert c.n_edges == 20
    at = laid_out(to_graphviz(c, reverse=reverse).source)
    up = -1 if reverse else 1  # with reverse the rows run downwards
    # every layer's heads share a row, its MLP has the row just above them: input, a0, m0,
    # a1, m1 (not in the circuit), a2, m2, a3, m3, logits, from the bottom up
    rows = [["input"], ["a0.h1"], ["m0"], ["a1.h0", "a1.h3"], ["a2.h0", "a2.h1", "a2.h2", "a2.h3"],
            ["m2"], ["a3.h0", "a3.h2"], ["m3"], ["logits"]]
    heights = []
    for row in rows:
        ys = {at[name][1] for name in row}
        assert len(ys) == 1, row
        heights.append(up * ys.pop())
    assert heights == sorted(heights) and len(set(heights)) == len(heights)
    for row in rows:  # heads left to right by index
        xs = [at[name][0] for name in row]
        assert xs == sorted(xs), row


def test_row_groups_and_order_in_the_dot_source():
    from circuits.render import to_graphviz

    src = to_graphviz(skipping_circuit()).source
    bodies = re.findall(r"subgraph row(\d+) \{(.*?)\n\t\}", src, re.S)
    assert all("rank=same" in body for _, body in bodies)
    groups = {int(stage): [n.strip('"') for n in re.findall(r'^\t\t("?[\w.]+"?)(?: \[|$)',
                                                             body, re.M)]
              for stage, body in bodies}
    # stage 2l + 1 holds layer l's heads, 2l + 2 its MLP (m1 is not in the circuit)
    assert groups == {0: ["_row0", "input", "legend"], 1: ["_row1", "a0.h1"], 2: ["_row2", "m0"],
                      3: ["_row3", "a1.h0", "a1.h3"],
                      5: ["_row5", "a2.h0", "a2.h1", "a2.h2", "a2.h3"], 6: ["_row6", "m2"],
                      7: ["_row7", "a3.h0", "a3.h2"], 8: ["_row8", "m3"], 9: ["_row9", "logits"]}
    # each row in index order, after its anchor; the anchors chained in stage order by
    # invisible edges that pull nothing sideways
    assert '"a2.h0" -> "a2.h1" [style=invis]' in src and '"a2.h1" -> "a2.h3" [style=invis]' in src
    stages = sorted(groups)
    for lower, upper in zip(stages, stages[1:], strict=False):
        assert f"_row{lower} -> _row{upper} [style=invis weight=0]" in src


def large_circuit(n_edges: int = 300):
    """A circuit of `n_edges` of the 479 edges of a 4-layer graph, a fifth of them negative."""
    g = Graph(4, 4)
    gen = torch.Generator().manual_seed(0)
    v = torch.rand(g.n_sources, g.n_destinations, generator=gen)
    v[0, :] += 2  # every edge from input and into logits ranks first, so every edge
    v[:, -1] += 2  # selected lies on an input-to-logits path and nothing is pruned
    v = v * g.valid * torch.where(torch.rand(v.shape, generator=gen) < 0.2, -1.0, 1.0)
    c = select(Scores(g, v, task="toy", model="tiny", method="rand"), top_k=n_edges)
    assert c.n_edges == n_edges
    return c


def drawn_edges(src: str) -> tuple[int, dict[str, float]]:
    """The number of visible edge lines in DOT source, and the circuit edges (with their
    scores) their tooltips name."""
    lines = [line for line in src.splitlines() if "->" in line and "style=invis" not in line
             and "style=dashed" not in line and "tooltip=" in line]
    named = {}
    for line in lines:
        tip = re.search(r'tooltip="([^"]*)"', line)[1]
        for name, score in re.findall(r"(\S+->\S+): (\S+?)(?:;|$)", tip):
            named[html.unescape(name)] = float(score)
    return len(lines), named


def test_a_large_circuit_draws_its_strongest_edges_and_says_so():
    from circuits.render import MAX_EDGES, to_graphviz

    c = large_circuit(300)
    src = to_graphviz(c).source
    assert f"the {MAX_EDGES} strongest of 300 edges drawn" in src
    assert "q, k and v inputs of a head drawn as one line per source" in src
    n_lines, named = drawn_edges(src)
    assert len(named) == MAX_EDGES and n_lines <= MAX_EDGES
    g = c.graph
    scores = {e.name: float(c.values[g.edge_index(e)]) for e in c.edges()}
    strongest = sorted(scores, key=lambda name: -abs(scores[name]))[:MAX_EDGES]
    assert set(named) == set(strongest)
    assert all(named[name] == pytest.approx(scores[name], rel=1e-3) for name in named)
    # merged: no edge lands on a q/k/v port, and the heads show none
    assert not re.search(r":[qkv]:s", src) and 'PORT="q"' not in src
    # asked for, every edge is drawn on its own port; the title says nothing is left out
    full = to_graphviz(c, max_edges=None, merge_ports=False).source
    n_lines, named = drawn_edges(full)
    assert n_lines == len(named) == 300 and "drawn" not in full.split("legend")[0]
    assert re.search(r":[qkv]:s", full)


def test_faithfulness_in_the_title_is_held_out_when_measured():
    from circuits.render import title

    c = small_circuit()
    assert title(c).endswith("discovery faithfulness 0.750")
    c.metrics.update(faithfulness_ci_low=0.7, faithfulness_ci_high=0.8)
    assert title(c).endswith("discovery faithfulness 0.750 (95% CI 0.700 to 0.800)")
    c.metrics.update(heldout_faithfulness=0.625, heldout_faithfulness_ci_low=0.5,
                     heldout_faithfulness_ci_high=0.75)
    assert title(c).endswith("held-out faithfulness 0.625 (95% CI 0.500 to 0.750)")
    assert "0.750 (95%" not in title(c)  # the discovery value is not shown beside it
    c.metrics["heldout_faithfulness"] = math.nan  # undefined: the discovery value, labelled
    assert title(c).endswith("discovery faithfulness 0.750 (95% CI 0.700 to 0.800)")


@pytest.mark.parametrize("value", [0, -3, pytest.param(-10**5000, id="huge"), 2.5, "10", True])
def test_bad_max_edges(value):
    from circuits.render import to_graphviz

    with pytest.raises(OptionError, match="max_edges"):
        to_graphviz(small_circuit(), max_edges=value)
