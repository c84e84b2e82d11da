"""Features: sparse autoencoders and transcoders at a model's activation sites, their training,
quality and dashboards, and circuits whose nodes are features.

- `sites` names where an SAE reads and writes (``resid.3``, ``attn.1``, ``mlp.0``,
  ``mlp_in.0``); `sae` holds the SAE itself and its files (sae-lens's layout, Gemma Scope's
  ``params.npz``).
- `corpus`, `train` and `quality`: the texts an SAE is trained on (`corpus.read_texts`), its
  training (`train.train_sae`, `train.fit_tensor`), and how good it is (`quality.quality`: L0,
  explained variance, loss recovered).
- `dashboard`: each feature's top contexts, histogram and promoted tokens, and a page of them.
- `graph`, `runs`, `attribution` and `discovery`: feature circuits (`circuits.discover(...,
  features=...)`).
- `toy`: the toy model of superposition.

Only the SAE, the sites and the graph are imported here: the package's own drawing and file
modules read feature graphs, and the rest of this package builds on them.
"""

from .graph import FeatureGraph, SiteNodes
from .sae import SAE
from .sites import FeatureSite, read_sites, site_of, spliced

__all__ = ["SAE", "FeatureGraph", "FeatureSite", "SiteNodes", "read_sites", "site_of",
           "spliced"]
