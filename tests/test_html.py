"""The interactive page: its data, and a real headless browser moving the slider."""

import json
import re
import shutil
import subprocess

import pytest
import torch

from circuits.circuit import select
from circuits.graph import Graph
from circuits.html import page_data, render_html
from circuits.scores import Scores

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def circuit():
    g = Graph(3, 2)
    v = torch.randn(g.n_sources, g.n_destinations, generator=torch.Generator().manual_seed(0))
    return select(Scores(g, v * g.valid, task="toy", model="tiny", method="rand"), top_k=30)


def test_page_data_orders_edges_by_score():
    c = circuit()
    data = page_data(c)
    scores = [abs(e[3]) for e in data["edges"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == c.graph.n_edges
    assert data["initial"] == 30
    page = render_html(c)
    assert "<script src" not in page and "http" not in page.split("<svg")[0]  # nothing fetched
    assert json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S)[1])


def drawn(path, n, tmp_path):
    """Open the page at size n in headless chromium and read what it recorded."""
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
         f"{path.as_uri()}#n={n}"],
        capture_output=True, text=True, timeout=120,
    )
    state = re.search(r'<div id="state"[^>]*>', run.stdout)
    assert state, run.stderr[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="(\d+)"', state[0]))
    return {k: int(v) for k, v in attrs.items()}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_page_in_headless_chromium(tmp_path):
    c = circuit()
    path = c.to_html(tmp_path / "c.html")
    small, large = drawn(path, 30, tmp_path), drawn(path, 120, tmp_path)
    # the page selects and prunes like Python does
    assert small["edges"] == c.n_edges > 0 and small["drawn-paths"] == c.n_edges
    assert large["edges"] == select(c.scores, top_k=120).n_edges > small["edges"]
    assert large["drawn-paths"] == large["edges"] and large["nodes"] > 0


def annotated():
    """The random circuit with a role, attribution and attention on a1.h0 and a curve."""
    c = circuit()
    c.node_info["a1.h0"] = {"role": "induction", "role_score": 0.93,
                            "roles": {"induction": 0.93, "previous-token": 0.2}, "dla": -0.5,
                            "attention": {"tokens": ["A", " b", "\n", "A"],
                                          "pattern": [[1, 0, 0, 0], [0.5, 0.5, 0, 0],
                                                      [0.2, 0.3, 0.5, 0], [0.1, 0.6, 0.1, 0.2]]}}
    c.curve = {"fractions": [0.0, 0.01, 0.1, 1.0], "n_edges": [0, 1, 10, 100],
               "faithfulness": [0.0, float("nan"), 0.6, 1.0]}
    return c


def test_page_data_carries_node_info_and_the_curve():
    c = annotated()
    data = page_data(c)
    node = next(n for n in data["nodes"] if n["name"] == "a1.h0")
    assert node["info"]["role"] == "induction" and node["info"]["dla"] == -0.5
    assert next(n for n in data["nodes"] if n["name"] == "a0.h0")["info"] is None
    # the log axis has no room for x = 0, and a NaN faithfulness is no point
    assert data["curve"] == {"fractions": [0.1, 1.0], "faithfulness": [0.6, 1.0]}
    assert data["total"] == c.graph.n_edges
    assert page_data(circuit())["curve"] is None


def state_of(path, fragment, tmp_path):
    """Open the page at `fragment` in headless chromium: every data- attribute of #state."""
    run = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"{path.as_uri()}#{fragment}"],
        capture_output=True, text=True, timeout=120)
    state = re.search(r'<div id="state"[^>]*>', run.stdout)
    assert state, run.stderr[-2000:]
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', state[0]))


def curve_x(fraction, first=0.1, last=1.0):
    """Where the page draws fraction x on its curve: 22 px left margin, 16 right, of 300."""
    import math

    span = math.log10(last) - math.log10(first)
    return 22 + (math.log10(fraction) - math.log10(first)) / span * (300 - 22 - 16)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_clicked_head_panel_and_curve_mark_in_headless_chromium(tmp_path):
    c = annotated()
    path = c.to_html(tmp_path / "c.html")
    total = c.graph.n_edges
    k = round(0.3 * total)
    state = state_of(path, f"n={k}&head=a1.h0", tmp_path)
    assert state["selected"] == "a1.h0"
    assert (state["panel-roles"], state["panel-cells"]) == ("2", "16")  # 2 roles, 4 x 4 tokens
    assert state["curve-points"] == "2"
    assert abs(int(state["curve-mark"]) - curve_x(k / total)) <= 1
    # below the first measured fraction the mark stays at the curve's left end
    assert int(state_of(path, "n=1", tmp_path)["curve-mark"]) == round(curve_x(0.1))
    # a node without annotations opens nothing
    assert state_of(path, "n=30&head=m0", tmp_path).get("selected", "") == ""
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1300,800",
                    f"--screenshot={shot}", f"{path.as_uri()}#n={k}&head=a1.h0"],
                   capture_output=True, timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG"


def measured():
    """The annotated circuit with the faithfulnesses discovery writes: its own held-out value
    (0.8) lies off the curve, whose log-linear reading at its size is about 0.74."""
    c = annotated()
    c.metrics.update(faithfulness=0.9, faithfulness_ci_low=0.85, faithfulness_ci_high=0.95,
                     heldout_faithfulness=0.8, heldout_faithfulness_ci_low=0.7,
                     heldout_faithfulness_ci_high=0.875)
    return c


def embedded(page: str) -> dict:
    return json.loads(re.search(r'type="application/json">(.*?)</script>', page, re.S)[1])


def test_the_curve_mark_and_the_title_show_the_same_held_out_value():
    page = render_html(measured())
    data = embedded(page)
    # at the circuit's own size the mark shows its held-out faithfulness, which the title
    # gives first, labelled
    assert data["circuitMark"] == {"n": data["initial"], "faithfulness": 0.8,
                                   "label": "held-out"}
    assert data["heldoutFaithfulness"] == 0.8 and data["faithfulness"] == 0.9
    assert "held-out faithfulness 0.800 (95% CI 0.700 to 0.875)" in page.split("</title>")[0]
    # a circuit measured on its discovery prompts only has no held-out mark
    c = annotated()
    c.metrics["faithfulness"] = 0.9
    assert embedded(render_html(c))["circuitMark"] is None


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_curve_mark_at_the_circuit_size_matches_the_title_in_headless_chromium(tmp_path):
    c = measured()
    path = c.to_html(tmp_path / "c.html")
    initial = page_data(c)["initial"]

    def opened(n):
        run = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"{path.as_uri()}#n={n}"],
            capture_output=True, text=True, timeout=120)
        state = re.search(r'<div id="state"[^>]*>', run.stdout)
        assert state, run.stderr[-2000:]
        heading = re.search(r'<h1 id="title">(.*?)</h1>', run.stdout, re.S)[1]
        # the words beside the red mark on the curve
        mark = re.search(r'<text[^>]*style="fill:#b2182b"[^>]*>(.*?)</text>', run.stdout)[1]
        return dict(re.findall(r'data-([\w-]+)="([^"]*)"', state[0])), heading, mark

    state, heading, mark = opened(initial)
    assert mark == "held-out 0.800 (this circuit)"
    assert heading.endswith("held-out faithfulness 0.800 (95% CI 0.700 to 0.875), "
                            "discovery 0.900 (95% CI 0.850 to 0.950)")
    assert (state["curve-label"], state["curve-value"]) == ("held-out", "0.800")
    # elsewhere the mark reads the curve, labelled as such: 0.6 at 10% to 1.0 at 100%
    import math

    k = initial + 10
    frac = k / c.graph.n_edges
    expected = 0.6 + 0.4 * math.log10(frac / 0.1)
    state, heading, mark = opened(k)
    assert mark == f"curve ≈ {expected:.2f}" and state["curve-label"] == "curve"
    assert abs(float(state["curve-value"]) - expected) < 1e-3
    assert "faithfulness" not in heading  # measured for the circuit's own size only
