"""Every option of ``fastdpo train``: one dataclass with its defaults, help text and rules, and the one typed
parser that flags and YAML both go through.

Each bad value fails here, before anything heavy runs, with one line naming the option and what it accepts.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Optional

from .._loss_names import F_DIVERGENCES, LOSS_TYPES


class ConfigError(ValueError):
    """A bad option: the message names it and says what is allowed."""


def opt(default, help: str, *, choices=None, several=False, at_least=None, above=None, below=None, const=None):
    """A field with its help text and rules: ``choices`` (with ``several``: one or more of them, comma-separated),
    ``at_least`` (inclusive), ``above``/``below`` (exclusive); ``const``: the value of the bare flag (and of YAML
    ``true``) for a string option that may also be given a value."""
    return field(default=default, metadata=dict(help=help, choices=choices, several=several, at_least=at_least,
                                                above=above, below=below, const=const))


# Defaults that depend on what is trained: the demo's own settings, or TRL's DPOConfig defaults with --model.
DEMO_DEFAULTS = dict(lr=1e-3, max_length=96)
MODEL_DEFAULTS = dict(lr=1e-6, max_length=1024)
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("auto", "float32", "bfloat16", "float16")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")        # a Hugging Face repository id: name or org/name


@dataclass
class TrainConfig:
    # what to train on
    model: Optional[str] = opt(None, "Hugging Face causal LM (hub name or local directory); default: a small "
                                     "Llama built from a config, randomly initialized with --seed")
    ref_model: Optional[str] = opt(None, "the reference model, if not the initial policy (hub name or directory): "
                                         "its log-probs are computed once and cached, the model is not kept")
    reference_free: bool = opt(False, "no reference: its log-probs count as 0 (TRL's reference_free)")
    tokenizer: Optional[str] = opt(None, "tokenizer (hub name or directory), if not --model's")
    trust_remote_code: bool = opt(False, "let --model/--ref-model/--tokenizer run their own code (fastdpo still "
                                         "refuses model classes whose output head it does not know)")
    dataset: Optional[str] = opt(None, "preference data: a local .jsonl/.json (optionally .gz), .parquet or .csv "
                                       "file, a saved dataset directory, or a Hugging Face dataset name, in TRL's "
                                       "formats; default: the bundled customer-support pairs")
    dataset_config: Optional[str] = opt(None, "configuration (subset) of a Hugging Face --dataset")
    dataset_split: str = opt("train", "split of a Hugging Face or saved --dataset to train on")
    eval_dataset: Optional[str] = opt(None, "held-out preference data (same formats as --dataset); default: the "
                                            "dataset's eval/validation/test split or --eval-fraction of it")
    eval_fraction: float = opt(0.1, "held-out share when there is no eval split or --eval-dataset", above=0.0,
                               below=1.0)
    torch_dtype: str = opt("auto", "compute dtype (autocast); weights and optimizer state stay float32. auto: "
                                   "bfloat16 on CUDA, float32 elsewhere", choices=DTYPES)
    attn_implementation: Optional[str] = opt(None, "attention implementation (e.g. sdpa, eager)")
    max_length: Optional[int] = opt(None, "prompt + completion tokens; longer completions are truncated, examples "
                                          "whose prompt alone is this long are dropped (default: 96 for the demo, "
                                          "1024 with --model)", at_least=2)
    share_prompt: Optional[bool] = opt(None, "one sequence per pair, [prompt, chosen, rejected]: the prompt is "
                                             "encoded once (default: on where the model supports it)")
    packing: Optional[bool] = opt(None, "several sequences per row, no padding inside a row (default: on where the "
                                        "model supports it)")
    prompt_cache: Optional[bool] = opt(None, "share the prompt through the key/value cache (prompt once, then both "
                                             "replies as its continuations) instead of a custom attention mask "
                                             "(default: without --span-attention, for micro-batches whose longest "
                                             "pair has 2048 tokens or more, where it was measured faster than the "
                                             "dense mask; never with gradient checkpointing); --prompt-cache "
                                             "needs --no-packing")
    span_attention: Optional[bool] = opt(None, "the shared/packed layout's attention span by span: sdpa over only "
                                               "the blocks its mask opens, no [L, L] mask, a micro-batch's "
                                               "sequences packed into one row (default: on the CPU with sdpa and "
                                               "without gradient checkpointing, where it was measured faster)")
    # DPO
    beta: float = opt(0.1, "DPO beta", above=0.0)
    loss_type: str = opt("sigmoid", "the loss (TRL's loss_type names, plus simpo), or several, summed with "
                                    "--loss-weights", choices=LOSS_TYPES, several=True)
    loss_weights: Optional[str] = opt(None, "comma-separated weights, one per --loss-type (default: 1 each)")
    label_smoothing: float = opt(0.0, "label smoothing (robust, exo_pair, ...; as TRL)", at_least=0.0)
    f_divergence_type: str = opt("reverse_kl", "f-divergence of the DPO score", choices=F_DIVERGENCES)
    f_alpha_divergence_coef: float = opt(0.5, "alpha of alpha_divergence")
    ld_alpha: Optional[float] = opt(None, "LD-DPO: the tokens of a reply beyond the length both replies of its pair "
                                          "share count this much (0 to 1; TRL's ld_alpha)", at_least=0.0)
    use_weighting: bool = opt(False, "WPO: weight each pair's loss by the policy's length-normalized probability "
                                     "of its two replies (TRL's use_weighting)")
    router_aux_loss_coef: Optional[float] = opt(None, "MoE models: weight of the router's load-balancing loss added "
                                                      "to the DPO loss as TRL adds it, logged as aux_loss; it needs "
                                                      "the plain layout (default: the model config's own, 0 for "
                                                      "dense models; TRL's router_aux_loss_coef)", at_least=0.0)
    # optimization
    steps: int = opt(200, "optimizer steps", at_least=1)
    batch_size: int = opt(16, "preference pairs per micro-batch (all processes together)", at_least=1)
    max_tokens: Optional[int] = opt(None, "build micro-batches by a token budget instead of --batch-size: as many "
                                          "pairs as fit this many tokens (without padding, in the run's layout)",
                                    at_least=2)
    grad_accum: int = opt(1, "micro-batches per optimizer step", at_least=1)
    lr: Optional[float] = opt(None, "peak learning rate, AdamW (default: 1e-3 for the demo, 1e-6 with --model)",
                              above=0.0)
    weight_decay: float = opt(0.0, "AdamW weight decay", at_least=0.0)
    warmup_steps: int = opt(20, "linear warm-up steps", at_least=0)
    schedule: str = opt("cosine", "after the warm-up: cosine or linear decay to 0, or constant", choices=SCHEDULES)
    max_grad_norm: float = opt(1.0, "gradient clipping (0 turns it off)", at_least=0.0)
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward (saves memory)")
    disable_dropout: bool = opt(True, "turn the model's dropout off, as TRL does by default (the reference pass "
                                      "and the training pass then compute the same function)")
    fsdp: bool = opt(False, "under torchrun: shard parameters, gradients and optimizer state across the processes "
                            "(FSDP2, one unit per decoder layer) instead of replicating the model (one process: "
                            "nothing to shard, a warning)")
    sequence_parallel: int = opt(1, "under torchrun: split each micro-batch's rows along the sequence over this "
                                    "many processes (Ulysses attention: each attends over the whole row with a "
                                    "share of the heads); it must divide the number of processes, the rest are "
                                    "data parallel. Llama, Qwen2, Qwen3, Mistral, Gemma2, Gemma3 and Phi3 "
                                    "(verified), eager or sdpa attention, "
                                    "heads and key/value heads divisible by it; not with the prompt cache "
                                    "or dropout",
                                 at_least=1)
    seed: int = opt(0, "seed of the model init, data order and everything random", at_least=0)
    lora_r: int = opt(0, "LoRA rank (0: train all weights); the reference is the initial policy", at_least=0)
    lora_alpha: float = opt(16.0, "LoRA alpha", above=0.0)
    lora_dropout: float = opt(0.0, "LoRA dropout", at_least=0.0, below=1.0)
    lora_target_modules: str = opt("all-linear", "LoRA targets: all-linear or comma-separated module names")
    # bookkeeping
    output_dir: str = opt("runs/fastdpo", "run directory: metrics.jsonl, plot, config, checkpoints, final model")
    overwrite: bool = opt(False, "replace the run already in --output-dir (without it, an existing run needs "
                                 "--resume)")
    eval_every: int = opt(50, "evaluate every N steps (0: only before and after)", at_least=0)
    save_every: int = opt(100, "checkpoint every N steps (0: only at the end or when interrupted)", at_least=0)
    resume: Optional[str] = opt(None, "continue the run in --output-dir from its newest checkpoint-N, or from the "
                                      "checkpoint directory given (same config; --steps may be raised)",
                                const="latest")
    cache_dir: Optional[str] = opt(None, "reference log-prob and tokenizer cache (default: ~/.cache/fastdpo)")
    save_total_limit: Optional[int] = opt(None, "keep only the newest N checkpoint-* directories", at_least=1)
    logging_steps: int = opt(1, "log the training metrics every N steps (each value averaged over them)",
                             at_least=1)
    report_to: str = opt("none", "also log to: none, tensorboard, wandb (offline), or a comma-separated list")
    progress: bool = opt(True, "progress bars (--no-progress: none, and no loading bars or messages of "
                               "transformers, datasets and peft either)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loss_options(self) -> dict:
        """The fastdpo.loss options of this run."""
        types = [t.strip() for t in self.loss_type.split(",")]
        weights = None if self.loss_weights is None else [float(w) for w in self.loss_weights.split(",")]
        return dict(beta=self.beta, loss_type=types[0] if len(types) == 1 else types, loss_weights=weights,
                    label_smoothing=self.label_smoothing, f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef, ld_alpha=self.ld_alpha,
                    use_weighting=self.use_weighting)

    # the options that change what is computed: a resumed run must match them (steps may grow)
    RESUME_KEYS = ("model", "ref_model", "reference_free", "tokenizer", "dataset", "dataset_config", "dataset_split",
                   "eval_dataset", "eval_fraction", "loss_weights", "label_smoothing", "f_divergence_type",
                   "f_alpha_divergence_coef", "ld_alpha", "use_weighting", "torch_dtype", "attn_implementation",
                   "max_length", "beta", "router_aux_loss_coef",
                   "loss_type", "batch_size", "max_tokens", "grad_accum", "lr", "weight_decay", "warmup_steps",
                   "schedule", "max_grad_norm", "disable_dropout", "share_prompt", "packing", "prompt_cache",
                   "span_attention", "seed", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
HINTS = typing.get_type_hints(TrainConfig)

# The sections of ``fastdpo train --help``: title -> (what they set, their options in order). Every option is in one.
GROUPS = {
    "model": ("what is trained and against which reference",
              ("model", "ref_model", "reference_free", "tokenizer", "trust_remote_code", "torch_dtype",
               "attn_implementation", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")),
    "data": ("preference pairs in TRL's formats",
             ("dataset", "dataset_config", "dataset_split", "eval_dataset", "eval_fraction", "max_length")),
    "loss": ("the DPO loss, TRL's options of the same names",
             ("loss_type", "loss_weights", "beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
              "ld_alpha", "use_weighting", "router_aux_loss_coef")),
    "training": ("optimizer, schedule and batches",
                 ("steps", "batch_size", "max_tokens", "grad_accum", "lr", "weight_decay", "warmup_steps", "schedule",
                  "max_grad_norm", "gradient_checkpointing", "disable_dropout", "seed")),
    "layout": ("how pairs are laid out in a micro-batch (same results, less work)",
               ("share_prompt", "packing", "prompt_cache", "span_attention")),
    "output": ("the run directory, checkpoints, logging",
               ("output_dir", "overwrite", "resume", "save_every", "save_total_limit", "eval_every", "logging_steps",
                "report_to", "cache_dir", "progress")),
    "distributed": ("under torchrun or accelerate launch (WORLD_SIZE > 1): data parallel by default",
                    ("fsdp", "sequence_parallel")),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def kind_of(name: str):
    """(base type, optional?) of a field: int, float, str or bool."""
    hint = HINTS[name]
    if typing.get_origin(hint) is typing.Union:
        return [a for a in typing.get_args(hint) if a is not type(None)][0], True
    return hint, False


def _rule(meta) -> str:
    parts = []
    if meta["at_least"] is not None:
        parts.append(f">= {meta['at_least']:g}")
    if meta["above"] is not None:
        parts.append(f"> {meta['above']:g}")
    if meta["below"] is not None:
        parts.append(f"< {meta['below']:g}")
    return " and ".join(parts)


def coerce(name: str, value):
    """``value`` (from a flag: a string; from YAML: whatever YAML made of it) as the field's type, checked against
    its rules. Raises ConfigError naming the option."""
    kind, optional = kind_of(name)
    meta = FIELDS[name].metadata
    if meta["const"] is not None and isinstance(value, bool):
        return meta["const"] if value else None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{flag(name)} needs a value")
    noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
    rule = _rule(meta)
    want = f"{noun} {rule}".strip() if not meta["choices"] else f"one of {', '.join(meta['choices'])}" + (
        ", or several of them comma-separated" if meta["several"] else "")

    raw = value

    def bad():
        return ConfigError(f"{flag(name)} must be {want}, got {raw!r}")

    if kind is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if kind is int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad() from None
        elif not isinstance(value, int) or isinstance(value, bool):
            raise bad()
    elif kind is float:
        if isinstance(value, str):      # flags, and YAML's "1e-4" (YAML 1.1 reads it as a string)
            try:
                value = float(value.strip())
            except ValueError:
                raise bad() from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        value = float(value)
        if not math.isfinite(value):
            raise bad()
    elif not isinstance(value, str) or not value.strip():
        raise bad()
    items = [v.strip() for v in value.split(",")] if meta["several"] else [value]
    if meta["choices"] and not set(items) <= set(meta["choices"]):
        raise bad()
    if ((meta["at_least"] is not None and value < meta["at_least"])
            or (meta["above"] is not None and value <= meta["above"])
            or (meta["below"] is not None and value >= meta["below"])):
        raise bad()
    return value


def build(options: dict, given: set) -> TrainConfig:
    """A checked TrainConfig from raw option values (flags and YAML merged); ``given`` names what the user set.
    Cross-option rules and the defaults that depend on --model are applied here."""
    values = {name: coerce(name, value) for name, value in options.items()}
    cfg = TrainConfig(**values)
    for name, value in (MODEL_DEFAULTS if cfg.model else DEMO_DEFAULTS).items():
        if getattr(cfg, name) is None:
            setattr(cfg, name, value)
    for name in ("model", "ref_model", "tokenizer", "dataset", "eval_dataset"):      # before the hub is asked
        setattr(cfg, name, resolve_path(getattr(cfg, name), name))
    lora_only = sorted(n for n in ("lora_alpha", "lora_dropout", "lora_target_modules") if n in given)
    if lora_only and cfg.lora_r == 0:
        raise ConfigError(f"{', '.join(map(flag, lora_only))} only apply with --lora-r > 0")
    if cfg.resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: continue the run or replace it")
    if cfg.attn_implementation is not None and cfg.model is None and cfg.attn_implementation not in ("eager", "sdpa"):
        raise ConfigError(f"--attn-implementation {cfg.attn_implementation!r}: the demo model runs eager or sdpa")
    from ..loss import LOSS_DEFAULTS, REFERENCE_FREE_LOSSES, make_params
    try:
        o = cfg.loss_options()
    except ValueError:
        raise ConfigError(f"--loss-weights must be comma-separated numbers, got {cfg.loss_weights!r}") from None
    try:
        make_params(o["loss_type"], o["loss_weights"], cfg.beta, cfg.label_smoothing, cfg.f_divergence_type,
                    cfg.f_alpha_divergence_coef, LOSS_DEFAULTS["gamma"], LOSS_DEFAULTS["discopop_tau"],
                    ld_alpha=cfg.ld_alpha, use_weighting=cfg.use_weighting)
    except ValueError as e:
        which = "--ld-alpha" if "ld_alpha" in str(e) else "--use-weighting" if "use_weighting" in str(e) else (
            f"--loss-type {cfg.loss_type!r}")
        raise ConfigError(f"{which}: {e}") from None
    if cfg.reference_free:
        need = [t for t in cfg.loss_type.split(",") if t.strip() not in REFERENCE_FREE_LOSSES]
        if need or cfg.ref_model is not None:
            raise ConfigError(f"--reference-free: {'--ref-model gives a reference' if not need else ''}"
                              f"{'loss_type ' + ', '.join(need) + ' needs a reference' if need else ''}")
    reports = [r.strip() for r in cfg.report_to.split(",")]
    unknown = [r for r in reports if r not in ("none", "tensorboard", "wandb")]
    if unknown or ("none" in reports and len(reports) > 1):
        raise ConfigError(f"--report-to must be none, tensorboard, wandb or a comma-separated list of the last two, "
                          f"got {cfg.report_to!r}")
    import importlib.util
    for report, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if report in reports and importlib.util.find_spec(package) is None:
            raise ConfigError(f"--report-to {report} needs the {package} package (pip install {package})")
    if cfg.dataset is None and ({"dataset_config", "dataset_split"} & given):
        raise ConfigError("--dataset-config/--dataset-split apply to a Hugging Face or saved --dataset")
    cfg.output_dir = os.path.abspath(os.path.expanduser(cfg.output_dir))
    if cfg.cache_dir is not None:
        cfg.cache_dir = os.path.abspath(os.path.expanduser(cfg.cache_dir))
    return cfg


def local_reason(value: str) -> Optional[str]:
    """Why ``value`` of --model, --dataset, ... names a local path rather than a Hugging Face hub repository, or None
    for a hub name: it exists; it starts as a path does (/, ./, ../, ~); or it has a path separator and either its
    directory exists here (models/nope when ./models exists) or it is not of the hub's form, org/name."""
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded) or os.path.isabs(expanded) or value.startswith((".", "~")):
        return ""
    if "/" in value or os.sep in value:
        parent = os.path.dirname(expanded)
        if os.path.isdir(parent):
            return f" (read as a local path: {parent + os.sep!r} exists here)"
        if not HUB_NAME.match(value):
            return " (read as a local path: a hub name is org/name)"
    return None


def resolve_path(value: Optional[str], name: str) -> Optional[str]:
    """Local paths as absolute, normalized paths (so ./m, m and /abs/m are one run's config); hub names as given.
    A local path that does not exist fails here, naming the option, before the hub is asked for it."""
    if value is None:
        return None
    why = local_reason(value)
    if why is None:
        return value
    path = os.path.abspath(os.path.expanduser(value))
    if not os.path.exists(path):
        what = "file or directory" if name in ("dataset", "eval_dataset") else "directory"
        raise ConfigError(f"{flag(name)} {value!r}: no such {what}{why}")
    return path
