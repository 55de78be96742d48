"""fastdpo inside other trainers. Each submodule imports its own optional dependency, so importing this package
needs none of them:

- ``fastdpo.integrations.trl``: ``FastDPOTrainer``, TRL's ``DPOTrainer`` with fastdpo's fused log-probs and loss.
"""
