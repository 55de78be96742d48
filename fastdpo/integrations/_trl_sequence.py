"""FastDPOTrainer under accelerate's sequence parallelism: ``ParallelismConfig(sp_size=N)``, DeepSpeed backend.

What accelerate 1.16 and transformers 5.25 do under it, and what FastDPOTrainer keeps or replaces:
- Groups: accelerate has DeepSpeed make the sequence-parallel groups (``mpu``, consecutive ranks) and hands them to
  ``deepspeed.initialize``. Kept: the group of this rank is ``fastdpo.sequence_parallel``'s ``SequenceGroup``.
- Data: the Trainer wraps the training dataloader in DeepSpeed's ``UlyssesSPDataLoaderAdapter``: each rank of a group
  draws its own batch, and the group processes the group's batches one after another (an epoch has N times the
  batches). Kept, with one change (``GroupLoader``): every rank of the group gets the *whole* batch (a pair layout
  batch, which the adapter could not cut along dim 1), and ``fastdpo.sequence_parallel`` splits its packed rows.
- Attention: accelerate registers DeepSpeed's ``UlyssesSPAttentionHF`` in place of the core attention function
  (``sp_attn_implementation``, which must be the model's). It drops 4D masks (the pair layout's rejected reply must
  not see the chosen one; in evaluation too, where it does not split) and refuses eager attention. Replaced: the
  core function is restored once the model is prepared and before every pass (``restore``), and the group's passes
  run fastdpo's own Ulysses all-to-all around it, with the unsplit layout's mask.
- Loss: TRL's ``compute_loss`` (FastDPOTrainer's) replaces the Trainer's, so ``deepspeed_sp_compute_loss`` never
  runs. Every rank computes the same DPO loss from the per-sequence sums added over the group; each rank's
  parameter gradients are its own tokens' share, so the unsplit run's gradient is their sum over the group.
  DeepSpeed ZeRO-1/2 reduces gradients so: summed over the sequence-parallel group, averaged over the data-parallel
  groups. ZeRO-3 before DeepSpeed 0.20.2 (deepspeedai/DeepSpeed#8854) averages over the sequence-parallel group
  too (measured with 0.19.8: the gradient norm halved at N = 2), so there the loss's gradient is multiplied by N
  (``gradient_factor``; transformers' ``deepspeed_sp_compute_loss`` does the same, and the Trainer refuses the
  ZeRO-3 configuration whose buckets mix both reductions). tests/test_trl_sequence_parallel.py compares every step
  with the single process under ZeRO-2 and ZeRO-3.
Only the training batches are split. Evaluation and ``precompute_ref_log_probs`` run each rank's own batches
unsplit, as without sequence parallelism (their values are right; their memory is not divided).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..sequence_parallel import SequenceGroup, sequence_parallel_unavailable

GROUP = "fastdpo_sequence_group"      # the batch key: True where the batch is the group's, to split over its ranks
IMPLEMENTATION = "sdpa"               # the core attention DeepSpeed registers around and fastdpo verifies


def sizes(parallelism) -> tuple:
    """(sp_size, cp_size) of an accelerate ParallelismConfig (or None: (1, 1))."""
    return tuple(getattr(parallelism, name, None) or 1 for name in ("sp_size", "cp_size"))


def check_config(parallelism, args, pair_layout, where: str, deepspeed: Optional[bool] = None) -> int:
    """The sequence-parallel size N that ``parallelism`` asks for (1: none), once the DPOConfig options that cannot
    be split exactly under it are refused (one line each, naming the option); ``deepspeed``: whether the trainer
    runs DeepSpeed (None: not known yet)."""
    sp, cp = sizes(parallelism)
    if cp > 1:
        raise ValueError(f"FastDPOTrainer: cp_size={cp} ({where}) is not supported: FSDP2's context parallelism (ring "
                         "attention) takes no custom mask and TRL's DPO loss would take each process's slice of a "
                         "sequence for the whole; set cp_size=1, or use sp_size (DeepSpeed) or `fastdpo train "
                         "--sequence-parallel N`")
    if sp == 1:
        return 1
    head = f"FastDPOTrainer: sp_size={sp} ({where})"
    if pair_layout is False:
        raise ValueError(f"{head}: pair_layout=False is not supported under sequence parallelism: FastDPOTrainer "
                         "splits the pair layout's packed rows (TRL's padded batches are not split exactly); drop "
                         "pair_layout=False")
    if not args.disable_dropout:
        raise ValueError(f"{head}: disable_dropout=False is not supported under sequence parallelism (the ranks of a "
                         "group would draw the same dropout masks for their shares of the heads and tokens)")
    if args.use_weighting:
        raise ValueError(f"{head}: use_weighting=True (WPO) is not supported under sequence parallelism")
    if deepspeed is False:
        raise ValueError(f"{head} needs DeepSpeed (DPOConfig(deepspeed=...) or accelerate's DeepSpeed config): "
                         "accelerate splits sequences under DeepSpeed only")
    return sp


def check_model(model, size: int, parallelism, what: str) -> None:
    """Refuse, in one line, a model (policy or reference) that cannot be split over ``size`` ranks exactly."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = f"FastDPOTrainer: sp_size={size}: {what}"
    why = sequence_parallel_unavailable(base, size)
    if why:
        raise ValueError(f"{head} {why}")
    impl = getattr(base.config, "_attn_implementation", None) or "eager"
    wanted = getattr(getattr(parallelism, "sp_handler", None), "sp_attn_implementation", None)
    if impl != IMPLEMENTATION or wanted != IMPLEMENTATION:
        raise ValueError(f"{head} runs {impl!r} attention and ParallelismConfig's sp_attn_implementation is "
                         f"{wanted!r}: under sequence parallelism both must be {IMPLEMENTATION!r} (DeepSpeed's "
                         "registration refuses eager; the others are not verified)")


def check_resume(size: int, resume_from_checkpoint, args, trainer_class) -> None:
    """A run resumed under sequence parallelism skips the group's batches already trained on through
    ``Trainer.get_resumed_dataloader`` (``FastDPOTrainer`` overrides it; ``trainer_class``: transformers' own
    ``Trainer``, which must call it); a transformers whose Trainer lacks it
    (5.17 has none) would skip batches of the unwrapped loader instead: silently other data. Refused there."""
    if size > 1 and resume_from_checkpoint and not args.ignore_data_skip \
            and not hasattr(trainer_class, "get_resumed_dataloader"):
        import transformers
        raise ValueError(f"FastDPOTrainer: sp_size={size}: resume_from_checkpoint needs a transformers whose Trainer "
                         f"has get_resumed_dataloader (this {transformers.__version__} has none: it would skip other "
                         "batches than those trained on); upgrade transformers, or set ignore_data_skip=True")


def refuse_without_layout(why: Optional[str], size: int) -> None:
    """The pair layout is what is split: where it cannot run, sequence parallelism is refused."""
    if why:
        raise ValueError(f"FastDPOTrainer: sp_size={size}: the pair layout, which sequence parallelism splits, cannot "
                         f"run: {why}")


class GroupLoader:
    """DeepSpeed's ``UlyssesSPDataLoaderAdapter``'s order with whole batches: each rank of the group draws its batch
    from ``loader``; then every rank yields the group's batches, the first rank's first, each marked ``GROUP``
    (moved to the CPU to travel; the Trainer moves them back). ``skip``: group batches left out at the start (a run
    resumed mid-epoch)."""

    def __init__(self, loader, group: SequenceGroup, skip: int = 0):
        self.loader, self.group, self.skip = loader, group, skip

    def __len__(self):
        return len(self.loader) * self.group.size - self.skip

    def __getattr__(self, name):                  # set_epoch, dataset, batch_size, ... of the wrapped loader
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        from accelerate.utils import send_to_device
        skip = self.skip % self.group.size
        for batch in self.loader:
            batches = [None] * self.group.size
            dist.all_gather_object(batches, send_to_device(batch, "cpu"), group=self.group.group)
            for b in batches[skip:]:
                yield {**b, GROUP: True}
            skip = 0

    def resumed(self, batches: int) -> "GroupLoader":
        """This loader without its first ``batches`` group batches: each rank skips its own first
        ``batches // N`` batches, and the group the first ``batches % N`` of the group's next ones."""
        from accelerate import skip_first_batches
        size = self.group.size
        return GroupLoader(skip_first_batches(self.loader, batches // size), self.group, batches % size)


def gradient_factor(accelerator, size: int) -> int:
    """What the loss's gradient is multiplied by so that the engine's reduction gives the unsplit run's gradient:
    ``size`` where ZeRO-3 averages over the sequence-parallel group (DeepSpeed < 0.20.2), else 1."""
    import deepspeed
    from packaging import version
    plugin = accelerator.state.deepspeed_plugin
    averages = plugin.zero_stage == 3 and version.parse(deepspeed.__version__) < version.parse("0.20.2")
    return size if averages else 1


class ScaleGradient(torch.autograd.Function):
    """The identity whose backward multiplies the gradient by ``factor`` (the logged loss stays the loss)."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def take_over(trainer, attention_functions: dict) -> None:
    """Replace ``trainer.accelerator.deepspeed_ulysses_dl_adapter`` (the Trainer calls it once the model is prepared,
    DeepSpeed's groups made and its attention registered) by: restore ``attention_functions`` (name -> the function
    transformers' table held before), take the group and the ``gradient_factor``, and wrap the loader in
    ``GroupLoader``."""
    accelerator = trainer.accelerator

    def adapter(loader, model):
        from deepspeed.utils import groups
        restore(attention_functions)
        trainer._fastdpo_group = SequenceGroup(groups._get_sequence_parallel_group(),
                                               groups._get_sequence_parallel_world_size(),
                                               groups._get_sequence_parallel_rank())
        trainer._fastdpo_gradient_factor = gradient_factor(accelerator, trainer._fastdpo_group.size)
        return GroupLoader(loader, trainer._fastdpo_group)

    accelerator.deepspeed_ulysses_dl_adapter = adapter


def restore(attention_functions: dict) -> None:
    """Put ``attention_functions`` (``saved_attention()``) back in transformers' table (DeepSpeed's registration,
    made whenever accelerate prepares the model under sequence parallelism, evaluation included, replaces them)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    for name, fn in attention_functions.items():
        ALL_ATTENTION_FUNCTIONS[name] = fn


def saved_attention() -> dict:
    """What transformers' attention table maps the core implementation to now (before DeepSpeed replaces it)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return {IMPLEMENTATION: ALL_ATTENTION_FUNCTIONS[IMPLEMENTATION]}
