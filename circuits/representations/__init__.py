"""What hidden states encode, and changing them: probes, steering vectors and concept erasure.

- `labels`: texts with a class label each and where to read them (`labeled_set`: a JSONL file
  or a built-in label set such as ``ioi``, ``factual`` and ``years``).
- `activations`: the residual stream at chosen layers and positions of those texts.
- `probe`: linear and MLP probes per layer, with control tasks and selectivity.
- `steer`: steering directions from contrastive pairs, applied with a scale, and their price.
- `erase`: concept erasure with LEACE, and what it costs.
- `effects`: what an edit of the residual does to a task's metric, the next-token
  distribution and the loss on neutral text (shared by steering and erasure).
- `planted`: a small model with a direction planted by construction, for tests and examples.

Layer ``L`` means the residual stream after decoder layer ``L`` (the site ``resid.L`` of
`circuits.features.sites`). Nothing heavy is imported here: scikit-learn is imported by the
functions that fit probes.
"""

from .labels import LABEL_SETS, Labeled, labeled_set

__all__ = ["LABEL_SETS", "Labeled", "labeled_set"]
