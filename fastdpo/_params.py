"""Options of the fused log-prob op, carried as one frozen dataclass.

Autograd Functions receive a single ``LogpsParams`` so that ``backward`` returns
one ``None`` for it instead of a tail of ``None``s (STYLE 6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class LogpsParams:
    ignore_index: int = -100
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0
    average: bool = False
    # Gradient filtering (Triton backward only): skip logit tiles where every
    # |onehot - softmax| < filter_eps (each skipped term is below the dtype's
    # resolution; their sum need not be). None disables it.
    filter_eps: Optional[float] = None
    # Triton backward: True runs separate dH and dW passes without atomics
    # (bitwise reproducible, one extra recompute of the logits).
    deterministic: bool = False

    @property
    def alpha(self) -> float:
        """Slope of the logit transform without softcap: z = logit * alpha."""
        return self.logit_scale / self.temperature
