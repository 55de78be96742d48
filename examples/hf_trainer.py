"""fastdpo inside ``transformers.Trainer.compute_loss``: the same swap as the plain loop.

    python examples/hf_trainer.py
"""
import tempfile

import torch
from transformers import Trainer, TrainingArguments

from fastdpo import model_dpo_loss

from plain_loop import logps_of, tiny_model, toy_batch


class PairDataset(torch.utils.data.Dataset):
    """One preference pair per item: chosen and rejected rows with their reference log-probs."""

    def __init__(self, input_ids, labels, ref_logps):
        self.pairs = input_ids.shape[0] // 2
        self.input_ids, self.labels, self.ref = input_ids, labels, ref_logps

    def __len__(self):
        return self.pairs

    def __getitem__(self, i):
        rows = [i, self.pairs + i]
        return {"input_ids": self.input_ids[rows], "labels": self.labels[rows], "ref_logps": self.ref[rows]}


def collate(items):
    """Stack pairs as [chosen rows..., rejected rows...], as linear_dpo_loss expects."""
    stack = lambda key, j: torch.stack([it[key][j] for it in items])  # noqa: E731
    return {key: torch.cat([stack(key, 0), stack(key, 1)]) for key in items[0]}


class FastDPOTrainer(Trainer):
    beta = 0.1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ref_chosen, ref_rejected = inputs["ref_logps"].chunk(2)
        loss, metrics = model_dpo_loss(model, inputs["input_ids"], inputs["labels"], ref_chosen, ref_rejected,
                                       beta=self.beta)
        return (loss, metrics) if return_outputs else loss


def main(steps=10):
    model = tiny_model()
    input_ids, labels = toy_batch()
    with torch.no_grad():
        ref = logps_of(model, input_ids, labels)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
                                 logging_steps=5, report_to=[], save_strategy="no", use_cpu=True,
                                 remove_unused_columns=False)
        trainer = FastDPOTrainer(model=model, args=args, train_dataset=PairDataset(input_ids, labels, ref),
                                 data_collator=collate)
        result = trainer.train()
    print(f"final training loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()
