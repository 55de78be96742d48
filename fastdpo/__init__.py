"""fastdpo: fused Triton kernels for Direct Preference Optimization."""
from . import loss
from .logps import sequence_logps, sequence_logps_from_logits

__version__ = "0.1.0"
__all__ = ["sequence_logps", "sequence_logps_from_logits", "loss", "__version__"]
