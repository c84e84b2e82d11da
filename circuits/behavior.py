"""How strongly a model shows a behavior, and whether a discovery has prompts enough to say.

`Behavior` judges the per-prompt effect of ablating everything (`circuits.evaluate.behavior`
measures it); `few_prompts` flags a discovery whose faithfulness rests on too few prompts.
Nothing here runs a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

MIN_EFFECT_RATIO = 0.5  # effect / spread below this: the behavior is weak
MIN_T = 3.0  # t statistic below this: the behavior is weak


@dataclass(frozen=True)
class Behavior:
    """How strongly a model shows a task's behavior, from the per-prompt effect of ablating
    everything: ``d_i = sign * (m_i(model) - m_i(empty))`` (see `circuits.evaluate.behavior`).

    Attributes
    ----------
    effect : float
        Mean of d over the prompts.
    spread : float
        Standard deviation of d (sample, n - 1; NaN for one prompt).
    n : int
        Number of prompts.
    t : float
        ``effect / (spread / sqrt(n))``: the effect in standard errors.
    weak : bool
        True when the effect is not clearly positive against its spread: ``effect / spread <
        MIN_EFFECT_RATIO`` (0.5) or ``t < MIN_T`` (3), or too few prompts to tell.
    reason : str
        One line saying why (or the numbers when it is not weak).
    """

    effect: float
    spread: float
    n: int
    t: float
    weak: bool
    reason: str

    def as_dict(self) -> dict[str, float | int | bool | str]:
        return asdict(self)

    @classmethod
    def of(cls, d: Sequence[float] | np.ndarray | Tensor) -> Behavior:
        """Judge per-prompt effects ``d`` ``[n]`` by the rule of `behavior`.

        Examples
        --------
        >>> Behavior.of([2.0, 1.0, 3.0, 2.0]).weak  # effect 2, spread 0.82, t = 4.9
        False
        >>> Behavior.of([2.0, -1.0, 3.0, 0.0]).weak  # effect 1, spread 1.8, t = 1.1
        True
        """
        d = np.asarray(torch.as_tensor(d, dtype=torch.float64).cpu(), dtype=np.float64)
        n = len(d)
        effect = float(d.mean()) if n else math.nan
        spread = float(d.std(ddof=1)) if n > 1 else math.nan
        if n > 1 and spread == 0:
            ratio = t = math.inf if effect > 0 else math.nan
        else:
            ratio, t = effect / spread, effect / spread * math.sqrt(n)
        numbers = f"effect {effect:.3g}, spread {spread:.3g} over {n} prompts, t = {t:.2f}"
        if n < 2:
            reason = f"too few prompts to tell an effect from noise ({numbers})"
        elif not effect > 0:
            reason = f"ablating every component does not lower the behavior ({numbers})"
        elif not ratio >= MIN_EFFECT_RATIO:
            reason = (f"the effect is only {ratio:.2f} of its spread across prompts, below "
                      f"{MIN_EFFECT_RATIO:g} ({numbers})")
        elif not t >= MIN_T:
            reason = f"the effect is within {MIN_T:g} standard errors of zero ({numbers})"
        else:
            return cls(effect, spread, n, t, False, numbers)
        return cls(effect, spread, n, t, True, reason)


#: Fewer prompts than this on either side of a discovery, and its faithfulness and intervals
#: are flagged: a percentile bootstrap over a handful of prompts understates the uncertainty
#: (over one prompt it has none to show).
FEW_PROMPTS = 10


def few_prompts(n_discovery: int, n_heldout: int) -> str | None:
    """One line saying that a discovery rests on too few prompts to trust its faithfulness
    (fewer than `FEW_PROMPTS` on either side), or None.

    Examples
    --------
    >>> few_prompts(40, 20) is None
    True
    >>> few_prompts(1, 1)[:52]
    'faithfulness rests on 1 discovery and 1 held-out pro'
    """
    if min(n_discovery, n_heldout) >= FEW_PROMPTS:
        return None
    return (f"faithfulness rests on {n_discovery} discovery and {n_heldout} held-out prompt"
            f"{'' if n_heldout == 1 else 's'}, fewer than {FEW_PROMPTS} on a side: the numbers "
            "and their 95% intervals say little (a bootstrap over so few prompts understates the "
            f"uncertainty); use more prompts (--n {int(FEW_PROMPTS / 0.3) + 1} or more with "
            "the default --heldout 0.3)")
