"""Triton kernels of fastdpo (installed as ``fastdpo.kernels``).

Naming convention, used in every kernel and launcher here:

- ``N``: valid (scored) tokens, the rows a kernel works on; ``M``: all rows of
  the flattened input (``B * T``); ``V``: vocabulary; ``D``: hidden size.
- ``BLOCK_N`` / ``BLOCK_V`` / ``BLOCK_D``: tile sizes along those axes.
- ``HAS_*`` / ``COMPUTE_*`` / ``FILTER``: feature flags, derived by
  ``triton.heuristics`` from whether the matching pointer (or option) is
  ``None``/zero; never passed by hand. Other constexprs (``UPCAST``,
  ``DOT_PRECISION``, ``LOOP_N``/``LOOP_V``) are chosen by the launchers.
- ``l``: a raw logit ``h . w + b``; ``z``: the transformed logit
  ``softcap * tanh(l * scale / softcap) / temperature``; ``lse``: logsumexp of z.

Each op has a ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` (``@triton.jit`` only)
and ``<op>_fwd()`` / ``<op>_bwd()`` launchers (checks, allocation, grid). The
linear op's backward launcher uses ``_dlogits_kernel`` and two matrix products
(``_matmul.py``) by default, over row chunks, or over vocabulary slices with
``FASTDPO_BWD=vocab``; ``_logps_bwd_kernel`` with ``FASTDPO_BWD=fused``. Its forward
is ``_logps_fwd_kernel``, or with ``FASTDPO_FWD=tiles`` cuBLAS tiles folded by the
logits op's forward kernel (``tiles.py``, which also holds the chunk steps of the
one-pass loss). ``config.py`` holds every such choice and the chunk schedules. No
autograd lives here; see ``fastdpo/logps.py`` and ``fastdpo/_fused_loss.py``.
"""
from .dpo_loss import dpo_pair_loss
from .logits_logps import logits_logps_bwd, logits_logps_fwd
from .logps import logps_bwd, logps_fwd

__all__ = ["logps_fwd", "logps_bwd", "logits_logps_fwd", "logits_logps_bwd", "dpo_pair_loss"]
