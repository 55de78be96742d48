"""fastdpo: fused Triton kernels for Direct Preference Optimization.

The public names are imported on first use (PEP 562), so that ``import fastdpo`` and ``fastdpo train --help`` do
not pay for torch: ``fastdpo.sequence_logps``, ``from fastdpo import model_sequence_logps`` and ``fastdpo.models``
work as if everything had been imported up front.
"""
import importlib

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {"sequence_logps": "logps", "sequence_logps_from_logits": "logps", "model_sequence_logps": "models",
            "model_dpo_loss": "models", "output_head": "models", "model_pair_logps": "models",
            "model_pair_dpo_loss": "models"}

__all__ = ["sequence_logps", "sequence_logps_from_logits", "model_sequence_logps", "model_dpo_loss", "output_head",
           "model_pair_logps", "model_pair_dpo_loss", "layout", "loss", "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("__"):          # a submodule (fastdpo.loss, fastdpo.models, ...), imported on first use
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
