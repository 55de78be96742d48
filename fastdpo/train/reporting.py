"""What a run reports: metrics.jsonl (the log history, with TRL's metric names), TensorBoard and wandb (offline),
and the training plot.

Training records are logged every --logging-steps steps, each value averaged over those steps (the learning rate,
epoch and token count are the last step's); evaluation records as they come. The log history is also what
``trainer_state.json`` of a checkpoint holds, so a resumed run rewrites metrics.jsonl from it exactly.
"""
from __future__ import annotations

import json
import os

from .config import TrainConfig
from .runs import writing

LAST = ("step", "epoch", "learning_rate", "num_tokens")       # not averaged over the logging interval


class Reporter:
    def __init__(self, cfg: TrainConfig, main: bool, history: list):
        self.cfg, self.main, self.history, self._pending = cfg, main, list(history), []
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.writers = []
        if main:
            with writing(self.path, "--output-dir"), open(self.path, "w") as f:   # the history up to the checkpoint
                f.writelines(json.dumps(r) + "\n" for r in self.history)
            reports = [r.strip() for r in cfg.report_to.split(",")]
            self.writers = [w for w in (_tensorboard(cfg) if "tensorboard" in reports else None,
                                        _wandb(cfg) if "wandb" in reports else None) if w is not None]

    def train(self, record: dict, last: bool) -> None:
        """One step's record; written every --logging-steps steps (and at the last step)."""
        self._pending.append(record)
        if len(self._pending) == self.cfg.logging_steps or last:
            rows, self._pending = self._pending, []
            merged = {k: rows[-1][k] if k in LAST else sum(r[k] for r in rows) / len(rows) for k in rows[-1]}
            self._write(merged)

    def eval(self, record: dict) -> None:
        self._write(record)

    def _write(self, record: dict) -> None:
        self.history.append(record)
        if not self.main:
            return
        with writing(self.path, "--output-dir"), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for w in self.writers:
            w(record)

    def close(self) -> None:
        for w in self.writers:
            w(None)


def _tensorboard(cfg: TrainConfig):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)") from None
    board = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))

    def write(record):
        if record is None:
            return board.close()
        for key, value in record.items():
            if key != "step":
                board.add_scalar(key, value, record["step"])
    return write


def _wandb(cfg: TrainConfig):
    try:
        import wandb
    except ImportError:
        raise ValueError("--report-to wandb needs the wandb package (pip install wandb)") from None
    run = wandb.init(mode="offline", dir=cfg.output_dir, project="fastdpo", config=cfg.to_dict())

    def write(record):
        if record is None:
            return run.finish()
        run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
    return write


def plot(out: str, history: list) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ["loss", "rewards/accuracies", "rewards/margins"],
                              ["loss", "reward accuracy", "margin"]):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label="train")
        ax.plot([r["step"] for r in evals], [r["eval_" + key] for r in evals], "o-", label="eval")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
