"""``fastdpo train``: a thin DPO trainer on the public layer (``fastdpo.model_dpo_loss``), its CLI, config, data
loading, reference cache and distributed helpers."""
