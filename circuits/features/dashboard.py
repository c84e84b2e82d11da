"""Feature dashboards: what makes each SAE feature fire, and what it writes.

For every chosen feature of an SAE, over a corpus streamed batch by batch:

- its top-activating contexts: the tokens with the highest activations, each with the tokens
  around it and every one of those tokens' activations (so a page can shade them);
- a histogram of its nonzero activations, its firing frequency (the fraction of tokens where
  it is above zero), its largest and its mean nonzero activation;
- the tokens its decoder direction promotes and suppresses most through the unembedding
  (`promoted_tokens`).

Memory is bounded by one batch plus what is kept per feature (its top contexts and its
histogram): each batch's candidates are merged with the kept ones by `torch.topk`, never by a
loop over tokens. `write_dashboard` writes ``features.json`` (all of it, finite numbers only) and
``index.html``, a page that needs no network (data, styles and script inlined) to browse the
features by id or by token.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import OptionError
from ..files import dumps
from ..model import Model
from ..outputs import staged
from ..reading.lens import Unembedding
from .sae import SAE
from .sites import read_sites, site_of

FILES = ("features.json", "index.html")
BINS = 32  # histogram bins (a power of two: merging pairs of bins keeps them aligned)
FEATURE_CHUNK = 256  # features per product with the unembedding ([chunk, vocab] at a time)


# -- what a feature writes ---------------------------------------------------------------------
def logit_weights(model: Model, sae: SAE, features: Sequence[int]) -> Tensor:
    """``[len(features), vocab]``: what each feature's decoder direction adds to every token's
    logit through the final norm and the unembedding (see `promoted_tokens`)."""
    return _Readout(model, sae)(features)


class _Readout:
    """Decoder directions -> logit weights, the norm's map found once for many chunks."""

    def __init__(self, model: Model, sae: SAE) -> None:
        unembed = Unembedding.of(model)
        self.W_U = unembed.head.weight  # [vocab, d]
        if sae.d_out != self.W_U.shape[1]:
            raise OptionError(f"the SAE writes {sae.d_out}-wide directions and {model.name}'s "
                              f"unembedding reads {self.W_U.shape[1]}; use an SAE of this "
                              f"model")
        self.M = _norm_map(unembed.norm, sae.d_out, self.W_U.device, self.W_U.dtype)  # [d, d]
        self.W_dec = sae.W_dec.detach()

    def __call__(self, features: Sequence[int]) -> Tensor:
        rows = self.W_dec[list(features)].to(self.W_U.device, torch.float32)  # [n, d]
        with torch.no_grad():
            # in the unembedding's own dtype: a float32 copy of a half-precision vocabulary
            # would be the largest tensor of the run
            return ((rows @ self.M).to(self.W_U.dtype) @ self.W_U.T).float()


def _norm_map(norm: torch.nn.Module, d: int, device: torch.device, dtype: torch.dtype
              ) -> Tensor:
    """``[d, d]`` matrix M: a direction v reaches the unembedding as ``v @ M`` (the final
    norm's weight folded in, its bias and its division by the residual's scale left out).

    Found by probing the norm, so every norm is covered (LayerNorm's centring, RMSNorm's gain,
    Gemma's ``1 + w``): the odd part ``(norm(x) - norm(-x)) / 2`` drops the bias, and on inputs
    of zero mean and unit RMS the scale is 1. The centred basis vectors ``a (e_i - 1/d)`` are
    such inputs; the all-ones vector (unit RMS, zero variance) gives what a norm passes of the
    mean (RMSNorm: its gain; LayerNorm: nothing), which the centred probes lack.
    """
    a = d / math.sqrt(max(d - 1, 1))  # makes a (e_i - 1/d) unit-RMS (it is 0 when d = 1)
    probes = torch.eye(d, device=device).sub_(1.0 / d).mul_(a)  # [d, d]
    ones = torch.ones(1, d, device=device)
    with torch.no_grad():
        def odd(x: Tensor) -> Tensor:
            return (norm(x.to(dtype)).float() - norm((-x).to(dtype)).float()) / 2
        mean_part = odd(ones) / d  # [1, d]
        return torch.cat([odd(chunk) / a for chunk in probes.split(1024)]) + mean_part


def promoted_tokens(model: Model, sae: SAE, features: Sequence[int], k: int = 5
                    ) -> list[tuple[list[str], list[str]]]:
    """Per feature, the `k` tokens its decoder direction promotes most and suppresses most.

    A feature's direction ``W_dec[f]`` is read through the unembedding as the field's logit
    weights are (``W_dec[f] @ W_U^T``), with the final norm folded in as the model applies it
    to a residual: its weight (per dimension gain: LayerNorm's and RMSNorm's weight, Gemma's
    ``1 + w``) multiplies the direction and LayerNorm's centring removes its mean, since a
    direction reaches the logits only through them. The norm's bias and the unembedding's bias
    are left out (they are the same whatever the feature writes), and so is the norm's
    division by the residual's scale and a final soft-cap: both change every token's logit by
    the same positive factor or monotone map, which reorders nothing.

    Parameters
    ----------
    model : Model
    sae : SAE
        Its decoder writes `model`'s residual width (`SAE.check_fits`).
    features : sequence of int
    k : int

    Returns
    -------
    list of (promoted, suppressed)
        Token texts, strongest first (``#id`` for a model without a tokenizer).

    Examples
    --------
    A feature that writes token 7's unembedding row promotes token 7 first (no other row has
    as large a product with it):

    >>> from circuits.testing import tiny_gpt2
    >>> model = tiny_gpt2()
    >>> sae = SAE.init(16, 8, "relu", site="resid.1")
    >>> with torch.no_grad():
    ...     _ = sae.W_dec[3].copy_(model.hf.lm_head.weight[7])
    >>> up, down = promoted_tokens(model, sae, [3], k=2)[0]
    >>> up[0], len(down)
    ('#7', 2)
    """
    up, _, down, _ = _extremes(model, sae, features, k)
    texts = _vocabulary(model, torch.cat([up, down]))
    return [([texts[t] for t in u if t >= 0], [texts[t] for t in d if t >= 0])
            for u, d in zip(up.tolist(), down.tolist(), strict=True)]


def _extremes(model: Model, sae: SAE, features: Sequence[int], k: int
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token ids and logit weights ``[n, k]`` (on the CPU) of the tokens each feature promotes
    most and suppresses most, ids -1 for a feature whose decoder row is zero (it writes
    nothing, so it promotes nothing); at most `FEATURE_CHUNK` rows of logits at once."""
    features = list(features)
    if not all(0 <= f < sae.d_sae for f in features):
        raise OptionError(f"feature ids must lie in 0 to {sae.d_sae - 1}")
    readout = _Readout(model, sae)
    k = min(k, readout.W_U.shape[0])
    parts: list[tuple[Tensor, ...]] = []
    for start in range(0, len(features), FEATURE_CHUNK):
        w = readout(features[start:start + FEATURE_CHUNK])  # [chunk, vocab]
        up, down = w.topk(k, dim=1), w.topk(k, dim=1, largest=False)
        parts.append((up.indices, up.values, down.indices, down.values))
    if not parts:
        empty = torch.empty(0, k)
        return empty.long(), empty, empty.long(), empty
    up_ids, up_w, down_ids, down_w = (torch.cat(p).cpu() for p in zip(*parts, strict=True))
    silent = (sae.W_dec.detach()[features] == 0).all(1).cpu()  # [n]
    up_ids[silent], down_ids[silent] = -1, -1
    return up_ids, up_w, down_ids, down_w


def token_texts(model: Model, ids: Sequence[int]) -> list[str]:
    """Each token id as the text it adds after a word, its leading space included (``#id``
    without a tokenizer).

    Decoded after an anchor token (the first token of ``"a"``) and the anchor's own text cut
    off: a token decoded alone loses its leading space in SentencePiece tokenizers (Llama's
    ``▁the``) and in word-level ones, and contexts read as one run-on word.
    """
    tok = model.tokenizer
    if tok is None:
        return [f"#{int(i)}" for i in ids]
    encoded = tok.encode("a", add_special_tokens=False)
    anchor = list(getattr(encoded, "ids", encoded))[:1]  # a ``tokenizers`` Encoding or ids
    lead = tok.decode(anchor)
    out = []
    for i in ids:
        both = tok.decode([*anchor, int(i)])
        out.append(both[len(lead):] if anchor and both.startswith(lead)
                   else tok.decode([int(i)]))
    return out


# -- reading the feature specification ---------------------------------------------------------
def parse_features(spec: str, d_sae: int) -> list[int]:
    """Feature ids from ``"0-99,120"``: ids and inclusive ranges, comma separated.

    Raises
    ------
    OptionError
        A part that is not an id or a range ``a-b`` with ``a <= b``, or an id outside
        ``0 .. d_sae - 1``.

    Examples
    --------
    >>> parse_features("3,0-2,7", 8)
    [0, 1, 2, 3, 7]
    """
    ids: set[int] = set()
    for part in str(spec).split(","):
        first, dash, last = part.strip().partition("-")
        if not (first.isdecimal() and (last.isdecimal() if dash else True)) or (
                dash and int(first) > int(last)):
            raise OptionError(f"features {spec!r}: {part.strip()!r} is not a feature id or a "
                              f"range; use ids and ranges like 0-99,120")
        lo, hi = int(first), int(last) if dash else int(first)
        if hi >= d_sae:
            raise OptionError(f"features {spec!r}: the SAE has features 0 to {d_sae - 1}; "
                              f"{hi} is out of range")
        ids.update(range(lo, hi + 1))
    return sorted(ids)


# -- statistics over a corpus ------------------------------------------------------------------
def activations(model: Model, sae: SAE, ids: Tensor) -> Tensor:
    """``[b, p, d_sae]`` feature activations on token ids ``[b, p]`` (on the SAE's device).

    Raises
    ------
    OptionError
        The activations are not finite (a model or SAE whose weights overflow).
    """
    site = site_of(model, sae.site)
    x = read_sites(model, ids, [site])[site.name]
    with torch.no_grad():
        f = sae.encode(x.to(sae.W_enc.device))
    if not torch.isfinite(f).all():
        raise OptionError(f"the SAE's feature activations at {site.name} are not finite (NaN "
                          f"or inf) on this corpus; check the model's and the SAE's weights, or "
                          f"run in float32")
    return f


def frequencies(model: Model, sae: SAE, batches: Iterable[Tensor], skip: int = 0) -> Tensor:
    """``[d_sae]``: the fraction of the corpus's tokens on which each feature is above zero
    (the first `skip` positions of every row not counted, as in `feature_dashboard`)."""
    count = torch.zeros(sae.d_sae, dtype=torch.int64, device=sae.W_enc.device)
    tokens = 0
    for ids in batches:
        f = activations(model, sae, ids)[:, skip:]
        count += (f > 0).flatten(0, -2).sum(0)
        tokens += f.shape[0] * f.shape[1]
    return count.cpu().double() / max(tokens, 1)


class _Tally:
    """What is kept per feature while the corpus streams past: firing counts, the largest
    activation, a histogram and the top contexts (their values, tokens and activations)."""

    def __init__(self, n: int, contexts: int, window: int, device: torch.device) -> None:
        self.contexts, self.window, self.tokens = contexts, window, 0
        self.count = torch.zeros(n, dtype=torch.int64, device=device)
        self.sum = torch.zeros(n, dtype=torch.float64)  # on the CPU: MPS has no float64
        self.max = torch.zeros(n, device=device)
        # histogram of feature i: BINS bins of width 2**exp[i] from 0 (the smallest power of
        # two whose bins reach its largest activation so far; widening merges pairs of bins)
        self.hist = torch.zeros(n, BINS, dtype=torch.int64, device=device)
        self.exp = torch.full((n,), -1000, dtype=torch.int64, device=device)
        span = 2 * window + 1
        self.top = torch.empty(0, n, device=device)  # [kept, n] activations, largest first
        self.top_ids = torch.empty(0, n, span, dtype=torch.int64, device=device)
        self.top_acts = torch.empty(0, n, span, device=device)

    def add(self, ids: Tensor, f: Tensor, skip: int = 0) -> None:
        """Count one batch: token ids ``[b, p]``, the chosen features' activations
        ``[b, p, n]``; the first `skip` positions of each row are not counted (they may show
        as the neighbours of a counted token)."""
        b, p, n = f.shape
        flat = f[:, skip:].reshape(-1, n)
        fires = flat > 0
        self.tokens += flat.shape[0]
        self.count += fires.sum(0)
        self.sum += flat.clamp(min=0).sum(0).cpu().double()
        self.max = torch.maximum(self.max, flat.max(0).values)
        self._histogram(flat, fires)
        self._contexts(ids.to(f.device), f, flat, skip)

    def _histogram(self, flat: Tensor, fires: Tensor) -> None:
        """Widen the bins of features whose largest activation outgrew them, then count."""
        top = self.max.clamp(min=torch.finfo(self.max.dtype).tiny)
        need = torch.ceil(torch.log2(top / BINS)).long()
        need = need + (torch.ldexp(torch.ones_like(top), need) * BINS < top)  # rounding
        need = torch.where(self.max > 0, torch.maximum(need, self.exp), self.exp)
        shift = need - self.exp
        for s in shift.unique().tolist():
            if s > 0:
                rows = (shift == s).nonzero().squeeze(1)
                self.hist[rows] = _coarsen(self.hist[rows], s)
        self.exp = need
        tok, feat = fires.nonzero(as_tuple=True)
        bins = torch.floor(torch.ldexp(flat[tok, feat], -self.exp[feat])).long()
        index = feat * BINS + bins.clamp(max=BINS - 1)
        self.hist += torch.bincount(index, minlength=self.hist.numel()).view_as(self.hist)

    def _contexts(self, ids: Tensor, f: Tensor, flat: Tensor, skip: int) -> None:
        """Merge this batch's top activations per feature (among the counted positions,
        `flat`) with the kept ones."""
        b, p, n = f.shape
        values, where = flat.topk(min(self.contexts, flat.shape[0]), dim=0)  # [k, n]
        seq, pos = where // (p - skip), where % (p - skip) + skip
        offsets = torch.arange(-self.window, self.window + 1, device=f.device)
        at = pos[..., None] + offsets  # [k, n, span]
        inside = (at >= 0) & (at < p)
        at = at.clamp(0, p - 1)
        rows = seq[..., None].expand_as(at)
        tokens = torch.where(inside, ids[rows, at], -1)
        feature = torch.arange(n, device=f.device)[None, :, None].expand_as(at)
        acts = torch.where(inside, f[rows, at, feature], 0.0)
        values = torch.cat([self.top, values])
        keep = values.topk(min(self.contexts, values.shape[0]), dim=0).indices  # [kept, n]
        self.top = values.gather(0, keep)
        pick = keep[..., None].expand(-1, -1, at.shape[-1])
        self.top_ids = torch.cat([self.top_ids, tokens]).gather(0, pick)
        self.top_acts = torch.cat([self.top_acts, acts]).gather(0, pick)


def _coarsen(hist: Tensor, shift: int) -> Tensor:
    """Histograms ``[m, BINS]`` with bins 2**shift times as wide (sums of aligned groups)."""
    out = torch.zeros_like(hist)
    group = 1 << min(shift, int(math.log2(BINS)))
    out[:, :BINS // group] = hist.view(hist.shape[0], BINS // group, group).sum(-1)
    return out


def feature_dashboard(model: Model, sae: SAE, batches: Iterable[Tensor],
                      features: Sequence[int] | None = None, contexts: int = 10,
                      window: int = 8, k: int = 10, skip: int = 0) -> dict[str, Any]:
    """Statistics of SAE features over a corpus, ready for `write_dashboard`.

    Parameters
    ----------
    model : Model
    sae : SAE
        Fits `model` (`SAE.check_fits`) and lives on the device its activations are read on.
    batches : iterable of Tensor
        Token ids ``[b, p]``, streamed (`circuits.features.corpus.token_batches`).
    features : sequence of int, optional
        The features to describe (default: all).
    contexts : int
        Top-activating contexts kept per feature.
    window : int
        Tokens shown on each side of a context's activating token.
    k : int
        Promoted and suppressed tokens per feature.
    skip : int
        Leading positions of every row left out of the statistics: the tokens a row starts
        with (`circuits.task.prefix_ids`, a BOS), where activations are unlike the text's.

    Returns
    -------
    dict
        ``model``, ``sae`` (its site, kind and widths), ``tokens`` (the corpus's token count),
        ``window`` and ``features``: per feature its ``id``, ``frequency`` (fraction of tokens
        where it is above zero), ``count``, ``max`` and ``mean`` (over the tokens where it
        fires), ``histogram`` (``width`` and ``counts``: bin i holds activations in ``[i
        width, (i + 1) width)``, the last bin its largest), ``promoted`` and ``suppressed``
        (``[token, logit weight]`` pairs) and ``contexts`` (strongest first: ``act``, the
        activating token's index ``at`` in ``tokens``, and ``acts``, one per token).

    Examples
    --------
    >>> from circuits.testing import tiny_gpt2
    >>> model = tiny_gpt2()
    >>> sae = SAE.init(16, 8, "relu", site="resid.0")
    >>> data = feature_dashboard(model, sae, [torch.randint(0, 32, (2, 6))], features=[0, 5])
    >>> [f["id"] for f in data["features"]], data["tokens"]
    ([0, 5], 12)
    """
    sae.check_fits(model)
    chosen = list(range(sae.d_sae)) if features is None else list(features)
    if not chosen or not all(0 <= f < sae.d_sae for f in chosen):
        raise OptionError(f"choose at least one feature id in 0 to {sae.d_sae - 1}")
    if contexts < 1 or window < 0 or k < 1 or skip < 0:
        raise OptionError(f"contexts and k must be at least 1, window and skip at least 0, "
                          f"got contexts={contexts}, window={window}, k={k}, skip={skip}")
    device = sae.W_enc.device
    index = torch.tensor(chosen, device=device)
    tally = _Tally(len(chosen), contexts, window, device)
    for ids in batches:
        if ids.shape[1] > skip:
            tally.add(ids, activations(model, sae, ids)[..., index], skip)
    if tally.tokens == 0:
        raise OptionError("the corpus gave no tokens to count: it holds fewer tokens than one "
                          "row; give more text or a shorter context")
    return {
        "model": model.name,
        "sae": {"site": sae.site, "out_site": sae.out_site, "kind": sae.kind, "k": sae.k,
                "d_in": sae.d_in, "d_sae": sae.d_sae},
        "tokens": tally.tokens,
        "window": window,
        "skip": skip,
        "features": _describe(model, sae, chosen, tally, k),
    }


def _describe(model: Model, sae: SAE, chosen: list[int], tally: _Tally, k: int
              ) -> list[dict[str, Any]]:
    """One JSON-ready record per chosen feature."""
    count, total = tally.count.tolist(), tally.sum.tolist()
    maxes, exps, hists = tally.max.tolist(), tally.exp.tolist(), tally.hist.tolist()
    top = tally.top.T.tolist()  # [n, kept]
    top_ids = tally.top_ids.transpose(0, 1).tolist()  # [n, kept, span]
    top_acts = tally.top_acts.transpose(0, 1).tolist()
    up, up_w, down, down_w = _extremes(model, sae, chosen, k)
    texts = _vocabulary(model, torch.cat([tally.top_ids.flatten().cpu(), up.flatten(),
                                          down.flatten()]))
    up, up_w, down, down_w = up.tolist(), up_w.tolist(), down.tolist(), down_w.tolist()
    records = []
    for i in range(len(chosen)):
        fired = count[i] > 0
        used = max((j + 1 for j, c in enumerate(hists[i]) if c), default=0)
        records.append({
            "id": chosen[i],
            "frequency": count[i] / tally.tokens,
            "count": count[i],
            "max": maxes[i] if fired else 0.0,
            "mean": total[i] / count[i] if fired else 0.0,
            "histogram": {"width": math.ldexp(1.0, exps[i]) if fired else 0.0,
                          "counts": hists[i][:used]},
            "promoted": [[texts[t], _round(w)] for t, w in zip(up[i], up_w[i], strict=True)
                         if t >= 0],
            "suppressed": [[texts[t], _round(w)]
                           for t, w in zip(down[i], down_w[i], strict=True) if t >= 0],
            "contexts": [_context(texts, top_ids[i][j], top_acts[i][j], top[i][j],
                                  tally.window)
                         for j in range(len(top[i])) if top[i][j] > 0],
        })
    return records


def _vocabulary(model: Model, ids: Tensor) -> dict[int, str]:
    """The text of every token id in `ids` (each decoded once; -1, no token, left out)."""
    used = [i for i in ids.unique().tolist() if i >= 0]
    return dict(zip(used, token_texts(model, used), strict=True))


def _context(texts: dict[int, str], ids: list[int], acts: list[float], act: float,
             window: int) -> dict[str, Any]:
    """One top context: the tokens inside the sequence, their activations, where it fired."""
    inside = [j for j, t in enumerate(ids) if t >= 0]
    first = inside[0]
    return {"act": _round(act), "at": window - first,
            "tokens": [texts[ids[j]] for j in inside],
            "acts": [_round(acts[j]) for j in inside]}


def _round(x: float) -> float:
    """`x` to 5 significant digits (the page shows 3; the file stays small)."""
    return float(f"{x:.5g}")


# -- the files ---------------------------------------------------------------------------------
def render_page(data: dict[str, Any]) -> str:
    """The dashboard page's HTML text: the template with the data inlined."""
    return _page(dumps(data, separators=(",", ":")), data)


def _page(text: str, data: dict[str, Any]) -> str:
    """The page around `data` already written as JSON `text`."""
    # "<", ">" and "&" escaped everywhere: no "</script>" or "<!--" inside the data can end or
    # bend the script element that holds it
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    template = resources.files(__package__).joinpath("dashboard.html").read_text("utf-8")
    title = f"SAE features of {data['model']} at {data['sae']['site']}"
    return template.replace("__TITLE__", html.escape(title)).replace("__DATA__", text)


def write_dashboard(data: dict[str, Any], out: str | Path) -> list[Path]:
    """Write ``features.json`` and ``index.html`` into the folder `out`, together (staged).

    Examples
    --------
    >>> import tempfile
    >>> from circuits.testing import tiny_gpt2
    >>> model = tiny_gpt2()
    >>> sae = SAE.init(16, 4, "relu", site="resid.0")
    >>> data = feature_dashboard(model, sae, [torch.randint(0, 32, (2, 6))])
    >>> [p.name for p in write_dashboard(data, tempfile.mkdtemp())]
    ['features.json', 'index.html']
    """
    out = Path(out)
    text = dumps(data, separators=(",", ":"))
    with staged(out) as folder:
        (folder / FILES[0]).write_text(text + "\n", encoding="utf-8")
        (folder / FILES[1]).write_text(_page(text, data), encoding="utf-8")
    return [out / name for name in FILES]
