"""The loss types and f-divergences by name (TRL's DPOTrainer names, plus simpo), importable without torch:
``fastdpo.reference`` defines each loss, ``fastdpo train --help`` lists the names before torch is imported."""
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
