"""fastdpo: fused Triton kernels for Direct Preference Optimization."""
__version__ = "0.1.0"

from . import loss  # noqa: E402
from .logps import sequence_logps, sequence_logps_from_logits  # noqa: E402
from . import layout  # noqa: E402
from .models import (model_dpo_loss, model_pair_dpo_loss, model_pair_logps, model_sequence_logps,  # noqa: E402
                     output_head)

__all__ = ["sequence_logps", "sequence_logps_from_logits", "model_sequence_logps", "model_dpo_loss", "output_head",
           "model_pair_logps", "model_pair_dpo_loss", "layout", "loss", "__version__"]
