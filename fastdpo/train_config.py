"""Every option of ``fastdpo train``: one dataclass, its defaults and help text (the CLI and YAML read it)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


def opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train on
    model: Optional[str] = opt(None, "Hugging Face causal LM (hub name or local directory); default: a small "
                                     "Llama built from a config, randomly initialized with --seed")
    dataset: Optional[str] = opt(None, "preference data: a local JSON/JSONL/Parquet file or a Hugging Face dataset "
                                       "name, in TRL's formats; default: the bundled customer-support pairs")
    eval_fraction: float = opt(0.1, "held-out share when the data has no eval split")
    torch_dtype: str = opt("float32", "weights dtype for --model: float32, bfloat16 or float16")
    attn_implementation: Optional[str] = opt(None, "attention implementation for --model (e.g. sdpa, eager)")
    max_length: int = opt(96, "prompt + completion tokens; longer completions are truncated, examples whose "
                              "prompt alone is longer are dropped")
    # DPO
    beta: float = opt(0.1, "DPO beta")
    loss_type: str = opt("sigmoid", "any fastdpo.loss loss type (TRL's names, or simpo)")
    # optimization
    steps: int = opt(200, "optimizer steps")
    batch_size: int = opt(16, "preference pairs per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimizer step")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(20, "linear warm-up steps")
    schedule: str = opt("cosine", "after warm-up: cosine or linear decay to 0")
    max_grad_norm: float = opt(1.0, "gradient clipping (0 turns it off)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward (saves memory)")
    fsdp: bool = opt(False, "under torchrun: shard parameters, gradients and optimizer state across the processes "
                            "(FSDP2, one unit per decoder layer) instead of replicating the model (one process: "
                            "nothing to shard, a warning)")
    seed: int = opt(0, "seed of the model init, data order and everything random")
    lora_r: int = opt(0, "LoRA rank (0: train all weights); the reference is the base model, adapters disabled")
    lora_alpha: int = opt(16, "LoRA alpha")
    lora_dropout: float = opt(0.0, "LoRA dropout")
    lora_target_modules: str = opt("all-linear", "LoRA targets: all-linear or comma-separated module names")
    # bookkeeping
    output_dir: str = opt("runs/fastdpo", "run directory: metrics.jsonl, plot, config, checkpoints, final model")
    eval_every: int = opt(50, "evaluate every N steps (0: only before and after)")
    save_every: int = opt(100, "checkpoint every N steps (0: only the final model)")
    resume: bool = opt(False, "continue from the last checkpoint in --output-dir (same config required)")
    cache_dir: Optional[str] = opt(None, "reference log-prob and tokenizer cache (default: ~/.cache/fastdpo)")
    progress: bool = opt(True, "progress bars")
    tensorboard: bool = opt(False, "also log to TensorBoard (output_dir/tensorboard)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # the options that change what is computed: a resumed run must match them
    RESUME_KEYS = ("model", "dataset", "eval_fraction", "torch_dtype", "max_length", "beta", "loss_type", "steps",
                   "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm",
                   "seed", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
