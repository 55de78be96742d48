"""Helper of tests/test_trl_layout.py (not a test): DPOTrainer, then FastDPOTrainer (the pair layout), on tiny Qwen2
(tied, sdpa) under the launcher's processes; rank 0 writes both log histories as JSON.
    python trl_ddp_run.py OUTPUT_DIR HISTORY_JSON"""
import json
import os
import sys

from trl import DPOTrainer

from families import tiny
from test_integration_trl import config
from test_trl_parity import make_dataset, make_tokenizer

from fastdpo.integrations.trl import FastDPOTrainer

output_dir, history = sys.argv[1:]
histories = {}
for cls in (DPOTrainer, FastDPOTrainer):
    args = config(os.path.join(output_dir, cls.__name__))
    args.per_device_train_batch_size = 1          # 2 processes x 1 pair: 2 pairs per step
    trainer = cls(model=tiny("qwen2-tied", 0), ref_model=tiny("qwen2-tied", 1), args=args,
                  train_dataset=make_dataset(), processing_class=make_tokenizer())
    trainer.train()
    assert trainer.padding_free == (cls is FastDPOTrainer), "the pair layout is not as intended"
    histories[cls.__name__] = [h for h in trainer.state.log_history if "loss" in h]
if trainer.accelerator.is_main_process:
    with open(history, "w") as f:
        json.dump(histories, f)
