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
