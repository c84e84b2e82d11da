"""Running a model with its SAEs spliced in: node values, and circuits of nodes kept or ablated.

At an SAE site the activation ``y`` splits exactly into the SAE's features ``f = encode(x)``
(``x = y`` for an SAE, the MLP's input for a transcoder), the decoder bias and the error
``e = y - decode(f)``: ``y = f @ W_dec + b_dec + e``. A circuit keeps some of these nodes and
ablates the others: kept ones are computed from the run's own input, ablated ones take their
ablated value (their value on the corrupted prompt under resample ablation, their mean over the
corrupted prompts' tokens under mean ablation, zero under zero ablation). Keeping every node is
the model (up to float rounding), ablating every node is the ablated run. Everything outside the
SAE sites runs as the model does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from .. import distributed
from ..ablation import check_ablation
from ..batch import Batch
from ..errors import CircuitFileError, OptionError
from ..model import Model
from ..nodes import NodeSites
from ..setup import Setup
from .graph import FeatureGraph, SiteNodes
from .sae import CONFIG, SAE
from .sites import FeatureSite, read_sites, site_of, spliced


@dataclass
class FeatureSet:
    """The SAEs of a feature circuit, in the order the forward reaches the sites they write.

    Attributes
    ----------
    saes : list[SAE]
    sites : list[FeatureSite]
        The site each SAE writes (its ``out_site``), where it is spliced in.
    inputs : list[FeatureSite]
        The site each SAE reads (the same for an SAE, ``mlp_in.L`` for a transcoder).
    source : str
        Where they were loaded from (recorded with a circuit).
    """

    saes: list[SAE]
    sites: list[FeatureSite]
    inputs: list[FeatureSite]
    source: str = ""

    @classmethod
    def of(cls, model: Model, saes: Sequence[SAE], source: str = "") -> FeatureSet:
        """Check that `saes` fit `model` and write distinct sites; order them."""
        if not saes:
            raise OptionError("a feature circuit needs at least one SAE")
        for sae in saes:
            sae.check_fits(model)
        outs = [site_of(model, s.out_site) for s in saes]
        if len({s.name for s in outs}) != len(outs):
            raise OptionError("two SAEs write the same site; give one SAE per site")
        for site in outs:
            if site.port != "output":
                raise OptionError(f"an SAE writes {site.name}, a module input; SAEs for "
                                  f"circuits write resid, attn or mlp sites")
        order = sorted(range(len(saes)), key=lambda i: outs[i].order)
        device = model.device
        return cls([saes[i].to(device).eval() for i in order], [outs[i] for i in order],
                   [site_of(model, saes[i].site) for i in order], source)

    @classmethod
    def load(cls, path: str | Path, model: Model) -> FeatureSet:
        """The SAEs in a folder: one SAE folder, or a folder of SAE folders (one per site).

        Raises
        ------
        CircuitFileError
            No SAE there, or an SAE file that cannot be read.
        OptionError
            An SAE that does not fit the model, or two for one site.
        """
        path = resolve_features(path)
        folders = [path] if (path / CONFIG).is_file() else sorted(
            p for p in path.iterdir() if p.is_dir() and (p / CONFIG).is_file())
        if not folders:
            raise CircuitFileError(f"{path}: no SAE found (a folder with {CONFIG} and "
                                   f"weights, or subfolders that are)")
        return cls.of(model, [SAE.load(f) for f in folders], str(path))

    def metric_of_masks(self, setup: Setup, masks: Tensor, chunk: int, per_prompt: bool
                        ) -> Tensor:
        """The metric of feature circuits given as edge masks (`metric_of_masks`)."""
        return metric_of_masks(setup, masks, chunk, per_prompt)

    def graph(self, chosen: Sequence[Sequence[int]], model: Model) -> FeatureGraph:
        """The feature graph with the features `chosen` at each site (in `sites` order)."""
        nodes = NodeSites.of(model)
        return FeatureGraph([SiteNodes(site.name, sae.d_sae, tuple(int(i) for i in c))
                             for site, sae, c in zip(self.sites, self.saes, chosen, strict=True)],
                            nodes.n_layers, nodes.parallel)


def shipped_saes() -> Path:
    """The folder of the SAE sets shipped with the package (one folder per reference model)."""
    return Path(str(resources.files("circuits.tasks").joinpath("saes")))


def resolve_features(spec: str | Path) -> Path:
    """The folder `spec` names: a folder, or the name of a shipped SAE set (``ioi-gpt2-4l``).

    Raises
    ------
    CircuitFileError
        Neither.
    """
    path = Path(spec)
    if path.is_dir():
        return path
    shipped = shipped_saes() / str(spec)
    if "/" not in str(spec) and shipped.is_dir():
        return shipped
    raise CircuitFileError(f"{spec}: no such folder; give a folder with an SAE ({CONFIG} and "
                           f"weights) or one SAE folder per site, or a shipped set (one of: "
                           f"{', '.join(shipped_set_names()) or 'none'})")


def shipped_set_names() -> list[str]:
    """The names of the shipped SAE sets."""
    root = shipped_saes()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


@dataclass
class NodeValues:
    """Per site, the features ``f [b, p, F]`` and the error ``e [b, p, d]`` of one batch."""

    f: list[Tensor]
    e: list[Tensor]

    def lerp(self, other: NodeValues, alpha: float) -> NodeValues:
        """The point ``alpha`` of the way from these values to `other`'s."""
        return NodeValues([a + alpha * (b - a) for a, b in zip(self.f, other.f, strict=True)],
                          [a + alpha * (b - a) for a, b in zip(self.e, other.e, strict=True)])


def node_values(model: Model, fs: FeatureSet, ids: Tensor) -> NodeValues:
    """The features and errors of every SAE on prompts `ids` (one forward, no gradients)."""
    wanted = {s.name: s for s in [*fs.inputs, *fs.sites]}
    acts = read_sites(model, ids, list(wanted.values()))
    f, e = [], []
    with torch.no_grad():
        for sae, x_site, y_site in zip(fs.saes, fs.inputs, fs.sites, strict=True):
            feats = sae.encode(acts[x_site.name])
            f.append(feats)
            e.append(acts[y_site.name] - sae.decode(feats))
    return NodeValues(f, e)


def ablated_values(model: Model, fs: FeatureSet, clean: Tensor, corrupt: Tensor,
                   ablation: str) -> NodeValues:
    """The nodes' ablated values for a batch: the corrupted prompts' (resample), their mean
    over the corrupted prompts' tokens (mean), or zero."""
    check_ablation(ablation)
    if ablation == "zero":  # no run needed: the shapes are the batch's and the SAEs'
        b, p = clean.shape
        return NodeValues([torch.zeros(b, p, sae.d_sae, device=clean.device) for sae in fs.saes],
                          [torch.zeros(b, p, sae.d_out, device=clean.device) for sae in fs.saes])
    v = node_values(model, fs, corrupt)
    return NodeValues([ablated(t, ablation) for t in v.f], [ablated(t, ablation) for t in v.e])


def ablated(corrupt: Tensor, ablation: str) -> Tensor:
    """The ablated value of an activation ``[b, p, ...]`` from its value on the corrupted
    prompts: itself (resample), its mean over their tokens (mean), or zero."""
    if ablation == "resample":
        return corrupt
    if ablation == "mean":
        return corrupt.mean((0, 1), keepdim=True).expand_as(corrupt)
    return torch.zeros_like(corrupt)


def keep_masks(graph: FeatureGraph, nodes: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per site, ``(features [C, F], error [C])`` float keep masks of ``[C, n_src]`` bool kept
    sources (a graph's ``other`` node stands for every feature not chosen)."""
    out = []
    for s in graph.site_nodes:
        col = {name: graph.src_index[name] for name in s.names}
        kf = torch.zeros(nodes.shape[0], s.n_features)
        if s.chosen:
            kf[:, list(s.chosen)] = nodes[:, [col[f"{s.site}.f{i}"] for i in s.chosen]].float()
        if s.others:
            kf[:, s.others] = nodes[:, col[f"{s.site}.other"]].float()[:, None]
        out.append((kf, nodes[:, col[f"{s.site}.err"]].float()))
    return out


def kept_logits(model: Model, fs: FeatureSet, ids: Tensor, keeps: list[tuple[Tensor, Tensor]],
                ablated: NodeValues) -> Tensor:
    """Last-position logits ``[C * b, V]`` (variant-major) of `ids` run once per variant, with
    the nodes of each variant's keep masks (`keep_masks`) computed and the others ablated."""
    C, b = keeps[0][0].shape[0], ids.shape[0]
    fns = {}
    for k, (sae, site) in enumerate(zip(fs.saes, fs.sites, strict=True)):
        kf = keeps[k][0].to(ids.device).repeat_interleave(b, 0)[:, None, :]  # [C*b, 1, F]
        ke = keeps[k][1].to(ids.device).repeat_interleave(b, 0)[:, None, None]
        fa, ea = (t.repeat(C, 1, 1) for t in (ablated.f[k], ablated.e[k]))

        def fn(x: Tensor, y: Tensor, sae: SAE = sae, kf: Tensor = kf, ke: Tensor = ke,
               fa: Tensor = fa, ea: Tensor = ea) -> Tensor:
            f = sae.encode(x if sae.transcoder else y)
            e = y.float() - sae.decode(f)
            return sae.decode(kf * f + (1 - kf) * fa) + ke * e + (1 - ke) * ea
        fns[site] = fn
    with torch.no_grad(), spliced(model, fns):
        out = model.hf(input_ids=ids.repeat(C, 1),
                       attention_mask=torch.ones_like(ids).repeat(C, 1)).logits
    return out[:, -1].float()


def induced_nodes(graph: FeatureGraph, masks: Tensor) -> Tensor:
    """``[C, n_src]`` bool: the nodes each ``[C, n_src, n_dst]`` mask's edges touch."""
    masks = masks.bool() & graph.valid
    as_dst = masks.any(1)[:, :-1]  # [C, n_dst - 1]: destination j is node j + 1
    return masks.any(2) | torch.cat([torch.zeros_like(as_dst[:, :1]), as_dst], 1)


def metric_of_masks(setup: Setup, masks: Tensor, chunk: int, per_prompt: bool) -> Tensor:
    """The metric with the nodes each mask touches kept and every other node ablated:
    ``[C]`` means over the prompts or ``[C, n_prompts]`` (prompts in batch order)."""
    graph: FeatureGraph = setup.feature_graph
    fs: FeatureSet = setup.features
    nodes = induced_nodes(graph, masks)
    C, out = nodes.shape[0], [torch.empty(nodes.shape[0], 0, dtype=torch.float64)]
    # data parallel: each rank runs its rows of every batch; every rank gets all the values
    for whole, mine in _my_rows(setup.batches):
        batch = whole.rows(mine)
        if setup.ablation == "mean":  # the mean over the whole batch, as in one process
            abl = ablated_values(setup.model, fs, whole.clean, whole.corrupt, "mean")
            abl = NodeValues([t[mine] for t in abl.f], [t[mine] for t in abl.e])
        else:
            abl = ablated_values(setup.model, fs, batch.clean, batch.corrupt, setup.ablation)
        rows = torch.empty(C, batch.size, dtype=torch.float64)
        for lo in range(0, C, chunk):
            part = nodes[lo:lo + chunk]
            logits = kept_logits(setup.model, fs, batch.clean, keep_masks(graph, part), abl)
            setup.node_passes.add_forward(part.shape[0] * batch.size)
            values = setup.metric_values(logits, batch).view(part.shape[0], batch.size)
            rows[lo:lo + part.shape[0]] = values.double().cpu()
        out.append(rows)
    values = distributed.gather_rows(torch.cat(out, 1).T.contiguous()).T  # [C, n_prompts]
    return values if per_prompt else values.mean(1)


def _my_rows(batches: list[Batch]) -> Iterator[tuple[Batch, slice]]:
    """The batches holding this rank's prompts (`circuits.distributed.shard` of all the rows,
    one after the other), each with the slice of its rows that are this rank's."""
    mine, start = distributed.shard(sum(b.size for b in batches)), 0
    for b in batches:
        lo, hi = max(mine.start - start, 0), min(mine.stop - start, b.size)
        if lo < hi:
            yield b, slice(lo, hi)
        start += b.size
