"""A self-contained HTML page of prompts with each token shaded by its attribution.

Each prompt is one block: its tokens on a line per method, red where the token pushes the
metric up, blue where it pushes it down, the shade's strength the score over the line's largest
|score| (so lines compare by order and shape, not scale; the raw score shows on hover). Known
tokens (`circuits.attribution.compare.known_mask`) are underlined. Nothing is fetched: styles
and the small script are inlined. The script records what the browser laid out on
``<div id="state" data-tokens data-visible data-shaded>`` (tokens, tokens with a box on the
page, tokens with a non-transparent background), for headless checks.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import write_atomic

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; margin-bottom: 4px; }
.sub { color: #555; margin-bottom: 16px; font-size: 13px; }
.prompt { border-top: 1px solid #ddd; padding: 10px 0; }
.head { font-size: 12px; color: #555; margin-bottom: 4px; }
.line { display: flex; align-items: baseline; margin: 3px 0; }
.method { width: 170px; flex: none; font-size: 12px; color: #444; }
.toks { font-family: ui-monospace, monospace; font-size: 15px; line-height: 1.9; }
.tok { white-space: pre; padding: 2px 1px; border-radius: 3px; }
.known { border-bottom: 3px solid #111; }
.refused { font-size: 12px; color: #a33; }
.notes { color: #333; font-size: 13px; margin-bottom: 12px; }
.legend span { padding: 2px 6px; margin-right: 6px; border-radius: 3px; }
"""

SCRIPT = """
document.addEventListener("DOMContentLoaded", () => {
  const toks = Array.from(document.querySelectorAll(".tok"));
  const visible = toks.filter(t => {
    const r = t.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(t).visibility !== "hidden";
  });
  const clear = ["rgba(0, 0, 0, 0)", "transparent"];
  const shaded = toks.filter(t => !clear.includes(getComputedStyle(t).backgroundColor));
  const state = document.getElementById("state");
  state.dataset.tokens = toks.length;
  state.dataset.visible = visible.length;
  state.dataset.shaded = shaded.length;
});
"""


@dataclass(frozen=True)
class PromptView:
    """One prompt of the page.

    Attributes
    ----------
    tokens : list of str
        The clean prompt's tokens as text (`token_texts`).
    scores : mapping
        Method name -> ``[p]`` scores, one per token.
    known : list of bool or None
        Which tokens are known to matter (underlined), or None.
    note : str
        A line shown above the tokens (e.g. the answer and the metric).
    refused : mapping
        Method name -> why it refused this prompt: its line shows the reason instead of the
        tokens (its scores, if any, are not shown).
    """

    tokens: list[str]
    scores: Mapping[str, Sequence[float]]
    known: list[bool] | None = None
    note: str = ""
    refused: Mapping[str, str] = field(default_factory=dict)


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's text as it reads in the decoded prompt (leading spaces kept).

    A token's text is what it adds to the decoded prefix, so tokenizers that mark spaces in
    their vocabulary (``Ġ``, ``▁``) read as plain text. Without a tokenizer, ``#id``.

    Examples
    --------
    >>> token_texts(None, [3, 7])
    ['#3', '#7']
    """
    if tokenizer is None:
        return [f"#{i}" for i in ids]
    texts, before = [], ""
    for k in range(len(ids)):
        now = tokenizer.decode(list(ids[: k + 1]))
        texts.append(now[len(before):] if now.startswith(before) else
                     tokenizer.decode([ids[k]]))
        before = now
    return texts


def _shade(score: float, top: float) -> str:
    """A background colour: red for positive, blue for negative, alpha |score| / top (a faint
    tint at least, so any nonzero score shows); none for zero or no score."""
    if not math.isfinite(score) or top <= 0 or score == 0:
        return "transparent"
    alpha = min(abs(score) / top, 1.0)
    rgb = "220, 38, 38" if score > 0 else "37, 99, 235"
    return f"rgba({rgb}, {max(alpha, 0.04):.3f})"


def _line(method: str, tokens: list[str], scores: Sequence[float],
          known: list[bool] | None) -> str:
    """One method's shaded tokens."""
    finite = [abs(s) for s in scores if math.isfinite(s)]
    top = max(finite) if finite else 0.0
    spans = []
    for i, (text, score) in enumerate(zip(tokens, scores, strict=True)):
        cls = "tok known" if known is not None and known[i] else "tok"
        spans.append(f'<span class="{cls}" style="background:{_shade(score, top)}" '
                     f'title="{html.escape(repr(text))} (position {i}): {score:+.4g}">'
                     f"{html.escape(text)}</span>")
    return (f'<div class="line"><div class="method">{html.escape(method)}</div>'
            f'<div class="toks">{"".join(spans)}</div></div>')


def _refused_line(method: str, why: str) -> str:
    """A method's line that says why it has no scores for the prompt."""
    return (f'<div class="line"><div class="method">{html.escape(method)}</div>'
            f'<div class="refused">refused: {html.escape(why)}</div></div>')


def render_html(prompts: Sequence[PromptView], title: str, subtitle: str = "",
                notes: Sequence[str] = ()) -> str:
    """The page for `prompts` as one HTML string.

    Parameters
    ----------
    prompts : sequence of PromptView
    title : str
        The page's heading.
    subtitle : str
        A line under it (model, metric, options).
    notes : sequence of str
        Lines shown above the prompts (what was left out, how many prompts are shown).

    Returns
    -------
    str

    Examples
    --------
    >>> page = render_html([PromptView(["a", " b"], {"ig": [0.5, -1.0]})], "demo")
    >>> page.count('class="tok"'), "rgba(37, 99, 235, 1.000)" in page
    (2, True)
    """
    blocks = []
    for n, prompt in enumerate(prompts):
        lines = "".join(_refused_line(m, prompt.refused[m]) if m in prompt.refused else
                        _line(m, prompt.tokens, s, prompt.known)
                        for m, s in prompt.scores.items())
        note = f" · {html.escape(prompt.note)}" if prompt.note else ""
        blocks.append(f'<div class="prompt"><div class="head">prompt {n}{note}</div>'
                      f"{lines}</div>")
    said = "".join(f'<div class="notes">{html.escape(n)}</div>' for n in notes)
    legend = ('<div class="sub legend"><span style="background:rgba(220, 38, 38, 0.8)">'
              'pushes the metric up</span><span style="background:rgba(37, 99, 235, 0.8)">'
              'pushes it down</span><span class="known">known token</span> shade = score / '
              "largest |score| of the line; hover a token for its score</div>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style>"
            f"<script>{SCRIPT}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><div class=\"sub\">{html.escape(subtitle)}</div>"
            f"{legend}{said}{''.join(blocks)}"
            '<div id="state" data-tokens="0" data-visible="0" data-shaded="0"></div>'
            "</body></html>\n")


def write_html(path: str | Path, prompts: Sequence[PromptView], title: str,
               subtitle: str = "", notes: Sequence[str] = ()) -> Path:
    """Write `render_html`'s page to `path` (atomically) and return the path."""
    path = Path(path)
    write_atomic(path, render_html(prompts, title, subtitle, notes).encode("utf-8"))
    return path
