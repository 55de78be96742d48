"""Small bundled datasets for fastdpo demos (see ``support_prefs.jsonl``)."""
