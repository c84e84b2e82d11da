"""Sparse autoencoders and transcoders: encode an activation into sparse features, decode back.

``f = act(pre(x))`` with ``pre(x) = (x - b_dec) @ W_enc + b_enc`` (``x @ W_enc + b_enc`` when
`b_dec_in` is False: transcoders, Gemma Scope) and ``x_hat = f @ W_dec + b_dec``. Three
activations, the ones the field trains:

``topk``
    Keep the `k` largest pre-activations of each token (ReLU'd), zero the rest.
``jumprelu``
    ``pre * (pre > threshold)`` with a learned per-feature threshold (Gemma Scope).
``relu``
    ``max(pre, 0)``, trained with an L1 penalty.

A transcoder reads one site and writes another (``mlp_in.L`` to ``mlp.L``): the MLP's input in,
an approximation of its output out.

Files use sae-lens's layout, so SAEs trained elsewhere load and ours load there: a folder with
``cfg.json`` (``d_in``, ``d_sae``, ``architecture``, ``hook_name``, ``apply_b_dec_to_input``,
``activation_fn_kwargs``; circuits adds ``circuits`` with its own fields) and
``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc``,
``b_dec``, and ``threshold`` for JumpReLU). Gemma Scope's ``params.npz`` (the same names) and a
bare ``.safetensors`` file load too, given the site.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CircuitFileError, OptionError
from ..files import write_atomic
from ..model import Model
from .sites import HOOK_NAMES, parse_site, site_of

KINDS = ("topk", "jumprelu", "relu")
WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
# sae-lens's architecture names for our kinds
_ARCHITECTURES = {"topk": "topk", "jumprelu": "jumprelu", "relu": "standard"}


class SAE(nn.Module):
    """A sparse autoencoder (or transcoder) of one activation site.

    Parameters
    ----------
    d_in, d_sae : int
        Width of the activation read and number of features.
    kind : "topk", "jumprelu" or "relu"
    k : int, optional
        Features kept per token (TopK only, required there).
    site : str
        The site read (``resid.3``; see `circuits.features.sites`).
    out_site : str, optional
        The site written, when it is not `site` (a transcoder).
    d_out : int, optional
        Width of the activation written; `d_in` by default.
    b_dec_in : bool
        Subtract ``b_dec`` from the input before encoding (sae-lens's standard SAEs do).
    meta : dict, optional
        Saved with the SAE (model, training settings, quality).

    Examples
    --------
    >>> sae = SAE.init(4, 8, "topk", k=2, site="resid.0")
    >>> f = sae.encode(torch.randn(3, 4))
    >>> tuple(f.shape), int((f != 0).sum(1).max()) <= 2
    ((3, 8), True)
    """

    def __init__(self, d_in: int, d_sae: int, kind: str = "topk", k: int | None = None,
                 site: str = "", out_site: str | None = None, d_out: int | None = None,
                 b_dec_in: bool = True, meta: dict[str, Any] | None = None) -> None:
        super().__init__()
        check_kind(kind, k, d_sae)
        d_out = d_in if d_out is None else d_out
        if min(d_in, d_sae, d_out) < 1:
            raise OptionError(f"an SAE needs positive widths, got d_in={d_in}, d_sae={d_sae}, "
                              f"d_out={d_out}")
        self.kind, self.k, self.site = kind, k, site
        self.out_site = out_site or site
        self.b_dec_in = b_dec_in
        self.meta = dict(meta or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("threshold", torch.zeros(d_sae))

    # -- shape ------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def transcoder(self) -> bool:
        return self.out_site != self.site

    # -- the maps ---------------------------------------------------------------------------
    def pre(self, x: Tensor) -> Tensor:
        """Pre-activations ``[..., d_sae]``."""
        x = x.to(self.W_enc.dtype)
        if self.b_dec_in and not self.transcoder:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: Tensor) -> Tensor:
        """Feature activations from pre-activations (the kind's sparsifying activation)."""
        if self.kind == "topk":
            top = pre.topk(min(self.k, pre.shape[-1]), dim=-1)
            return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        if self.kind == "jumprelu":
            return pre * (pre > self.threshold)
        return pre.relu()

    def encode(self, x: Tensor) -> Tensor:
        """Feature activations ``[..., d_sae]``."""
        return self.activate(self.pre(x))

    def decode(self, f: Tensor) -> Tensor:
        """The reconstruction ``f @ W_dec + b_dec`` ``[..., d_out]``."""
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale every decoder row to unit norm (zero rows stay zero)."""
        norms = self.W_dec.norm(dim=1, keepdim=True)
        self.W_dec.div_(torch.where(norms > 0, norms, torch.ones_like(norms)))

    @classmethod
    def init(cls, d_in: int, d_sae: int, kind: str = "topk", k: int | None = None,
             seed: int = 0, **kw: Any) -> SAE:
        """A freshly initialised SAE: random unit decoder rows, the encoder their transpose,
        zero biases; the same for the same seed, without touching the global RNG."""
        sae = cls(d_in, d_sae, kind, k, **kw)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sae.W_dec.copy_(torch.randn(d_sae, sae.d_out, generator=gen))
            sae.normalize_decoder()
            if sae.d_out == d_in:
                sae.W_enc.copy_(sae.W_dec.T)
            else:
                sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=gen) / math.sqrt(d_in))
        return sae

    # -- fitting a model --------------------------------------------------------------------
    def check_fits(self, model: Model) -> None:
        """Raise OptionError (one line) when the SAE's sites or widths do not fit `model`."""
        for name, width, what in ((self.site, self.d_in, "reads"),
                                  (self.out_site, self.d_out, "writes")):
            if not name:
                raise OptionError("the SAE names no site; give one (--site resid.3)")
            site = site_of(model, name)
            if site.width != width:
                raise OptionError(
                    f"the SAE {what} {width}-wide activations at {name}, but {model.name} has "
                    f"{site.width} there; use an SAE trained on this model")

    # -- files ------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """What ``cfg.json`` holds (sae-lens's keys and ours under ``circuits``)."""
        kind, layer = parse_site(self.site) if self.site else ("resid", 0)
        cfg: dict[str, Any] = {
            "d_in": self.d_in, "d_sae": self.d_sae,
            "architecture": _ARCHITECTURES[self.kind],
            "hook_name": f"blocks.{layer}.{HOOK_NAMES[kind]}",
            "apply_b_dec_to_input": self.b_dec_in and not self.transcoder,
            "activation_fn_kwargs": {"k": self.k} if self.kind == "topk" else {},
            "model_name": self.meta.get("model", ""),
            "circuits": {"kind": self.kind, "k": self.k, "site": self.site,
                         "out_site": self.out_site, "d_out": self.d_out, "meta": self.meta},
        }
        if self.transcoder:
            out_kind, out_layer = parse_site(self.out_site)
            cfg["hook_name_out"] = f"blocks.{out_layer}.{HOOK_NAMES[out_kind]}"
            cfg["d_out"] = self.d_out
        return cfg

    def save(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into `folder`; returns it."""
        from safetensors.torch import save

        tensors = {name: t.detach().float().cpu().contiguous() for name, t in
                   (("W_enc", self.W_enc), ("b_enc", self.b_enc), ("W_dec", self.W_dec),
                    ("b_dec", self.b_dec))}
        if self.kind == "jumprelu":
            tensors["threshold"] = self.threshold.detach().float().cpu().contiguous()
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise OptionError("the SAE has non-finite weights; it was not saved (lower the "
                              "learning rate)")
        folder = Path(folder)
        write_atomic(folder / WEIGHTS, save(tensors))
        write_atomic(folder / CONFIG, (json.dumps(self.config(), indent=1) + "\n").encode())
        return folder

    @classmethod
    def load(cls, path: str | Path, site: str | None = None) -> SAE:
        """An SAE from a folder (``cfg.json`` and a ``.safetensors`` file), a ``.safetensors``
        file or a Gemma Scope ``params.npz``; `site` names the site where the file does not
        (or overrides it).

        Raises
        ------
        CircuitFileError
            Missing files, missing or misshapen tensors, an unknown architecture.
        """
        path = Path(path)
        cfg = _read_config(path)
        tensors = _read_tensors(path)
        return _from_parts(cfg, tensors, site, path)


def check_kind(kind: str, k: int | None, d_sae: int) -> None:
    """One-line OptionErrors for a kind and k that do not go together."""
    if kind not in KINDS:
        raise OptionError(f"unknown SAE kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "topk" and (k is None or not 1 <= k <= d_sae):
        raise OptionError(f"a TopK SAE needs 1 <= k <= {d_sae} features, got k={k}")
    if kind != "topk" and k is not None:
        raise OptionError(f"k applies to TopK SAEs only; drop it for a {kind} SAE")


def _read_config(path: Path) -> dict[str, Any]:
    """``cfg.json`` of a folder (or next to a file), or {} where there is none."""
    folder = path if path.is_dir() else path.parent
    file = folder / CONFIG
    if not path.exists():
        raise CircuitFileError(f"{path}: no such file or folder; give an SAE folder "
                               f"(cfg.json + {WEIGHTS}), a .safetensors or a params.npz file")
    if not file.is_file():
        return {}
    try:
        cfg = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CircuitFileError(f"{file}: not a JSON SAE config ({err})") from None
    if not isinstance(cfg, dict):
        raise CircuitFileError(f"{file}: an SAE config is a JSON object")
    return cfg


def _read_tensors(path: Path) -> dict[str, Tensor]:
    """The weight tensors of an SAE file or folder."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.npz"))
        if not files:
            raise CircuitFileError(f"{path}: no .safetensors or .npz weights in the folder")
        path = path / WEIGHTS if (path / WEIGHTS).is_file() else files[0]
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return {name: torch.from_numpy(np.asarray(data[name], dtype=np.float32))
                        for name in data.files}
        from safetensors.torch import load_file

        return {name: t.float() for name, t in load_file(str(path)).items()}
    except Exception as err:  # noqa: BLE001 - any unreadable file is one line for the user
        raise CircuitFileError(f"{path}: cannot read SAE weights ({type(err).__name__}: "
                               f"{err})") from None


def _from_parts(cfg: dict[str, Any], tensors: dict[str, Tensor], site: str | None,
                path: Path) -> SAE:
    """Build an SAE from a config (sae-lens's or ours, possibly empty) and its tensors."""
    missing = [n for n in ("W_enc", "W_dec", "b_enc", "b_dec") if n not in tensors]
    if missing:
        raise CircuitFileError(f"{path}: the SAE weights lack {', '.join(missing)}")
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", False):
        raise CircuitFileError(f"{path}: the SAE normalises its input ({norm!r}), which circuits "
                               f"does not apply; use an SAE trained without normalisation")
    ours = cfg.get("circuits") if isinstance(cfg.get("circuits"), dict) else {}
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    if W_enc.dim() != 2 or W_dec.dim() != 2 or W_enc.shape[1] != W_dec.shape[0]:
        raise CircuitFileError(f"{path}: W_enc {tuple(W_enc.shape)} and W_dec "
                               f"{tuple(W_dec.shape)} are not [d_in, d_sae] and [d_sae, d_out]")
    d_in, d_sae, d_out = W_enc.shape[0], W_enc.shape[1], W_dec.shape[1]
    if "threshold" not in tensors and "log_threshold" in tensors:
        tensors["threshold"] = tensors["log_threshold"].exp()
    kind = ours.get("kind") or _kind_of(cfg, tensors)
    k = ours.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or cfg.get("k")
    k = int(k) if kind == "topk" and k is not None else None
    site = site or ours.get("site") or _site_of_hook(cfg.get("hook_name"))
    if not site:
        raise CircuitFileError(f"{path}: the file does not say which site the SAE reads; "
                               f"give it (--site resid.3)")
    out_site = ours.get("out_site") or _site_of_hook(cfg.get("hook_name_out")) or site
    parse_site(site)
    b_dec_in = bool(cfg.get("apply_b_dec_to_input", d_in == d_out and bool(cfg)))
    try:
        sae = SAE(d_in, d_sae, kind, k, site=site, out_site=out_site, d_out=d_out,
                  b_dec_in=b_dec_in, meta=ours.get("meta"))
    except OptionError as err:
        raise CircuitFileError(f"{path}: {err}") from None
    shapes = {"b_enc": (d_sae,), "b_dec": (d_out,), "threshold": (d_sae,)}
    for name, shape in shapes.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise CircuitFileError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                   f"expected {shape}")
    if kind == "jumprelu" and "threshold" not in tensors:
        raise CircuitFileError(f"{path}: a JumpReLU SAE needs its threshold tensor")
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if name in tensors:
                getattr(sae, name).copy_(tensors[name])
    return sae


def _kind_of(cfg: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """Our kind for a sae-lens architecture (a file without config: JumpReLU when it has a
    threshold, else ReLU)."""
    arch = cfg.get("architecture")
    if arch is None:
        return "jumprelu" if "threshold" in tensors else "relu"
    kinds = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "relu": "relu"}
    if arch not in kinds:
        raise CircuitFileError(f"SAE architecture {arch!r} is not supported; circuits loads "
                               f"{', '.join(sorted(kinds))}")
    return kinds[arch]


def _site_of_hook(hook: Any) -> str | None:
    """Our site name for a TransformerLens hook name (None when there is none)."""
    if not hook:
        return None
    kind, layer = parse_site(str(hook))
    return f"{kind}.{layer}"
