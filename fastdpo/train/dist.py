"""Data parallelism and FSDP for the trainer: torchrun / accelerate launch set WORLD_SIZE and RANK.

Each rank takes its slice of every global micro-batch. Data parallel: gradients are averaged with one
all-reduce per parameter after the backward (the same average DDP forms). FSDP (``--fsdp``): parameters,
gradients and optimizer state are sharded across the ranks (FSDP2, ``fully_shard``), gathered per unit for its
forward and backward, gradients averaged by reduce-scatter. Either way a run gives the single-process loss curve
for the same global batch.

Sequence parallelism (``--sequence-parallel N``): consecutive groups of N ranks each split one micro-batch share's
rows along the sequence (``fastdpo.sequence_parallel``); the data-parallel shards go to the groups, not the ranks.
A parameter's gradient is partial on each rank of a group (its tokens' share): gradients are summed over all ranks
and divided by the number of groups (DP: one all-reduce; FSDP: the reduce-scatter's divide factor).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist


class Dist:
    def __init__(self, fsdp: bool = False, sequence_parallel: int = 1):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world % sequence_parallel:
            raise ValueError(f"--sequence-parallel {sequence_parallel}: the number of processes ({self.world}) must be "
                             "divisible by it")
        self.sp = sequence_parallel                            # ranks per sequence group
        self.dp = self.world // sequence_parallel              # data-parallel groups
        self.dp_rank, self.sp_rank = divmod(self.rank, sequence_parallel)
        if fsdp and self.world == 1:
            warnings.warn("--fsdp with one process: nothing to shard, training unsharded "
                          "(launch with torchrun --nproc-per-node N to shard across N processes)")
        self.fsdp = fsdp and self.world > 1
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)      # FSDP places each rank's shards on the current device
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.sequence_group = None      # fastdpo.sequence_parallel.SequenceGroup of this rank, with N > 1
        if self.sp > 1:
            from ..sequence_parallel import SequenceGroup
            for g in range(self.dp):      # every rank takes part in making every group
                group = dist.new_group(list(range(g * self.sp, (g + 1) * self.sp)))
                if g == self.dp_rank:
                    self.sequence_group = SequenceGroup(group, self.sp, self.sp_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share of a global micro-batch: its data-parallel group's (the same on the group's ranks)."""
        return items[self.dp_rank::self.dp]

    def gather_rows(self, index: list, rows: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's (index, rows) pieces -> all n rows in index order, on every rank (an index given by several
        ranks or twice keeps its first value)."""
        pieces = [(index, rows.cpu())]
        if self.world > 1:
            pieces = [None] * self.world
            dist.all_gather_object(pieces, (index, rows.cpu()))
        full = torch.empty((n, *rows.shape[1:]), dtype=rows.dtype)
        done = torch.zeros(n, dtype=torch.bool)
        for idx, part in pieces:
            for i, row in zip(idx, part):
                if not done[i]:
                    full[i], done[i] = row, True
        if not bool(done.all()):
            raise RuntimeError(f"gather_rows: {int((~done).sum())} of {n} rows were computed by no rank")
        return full

    def wrap(self, policy: torch.nn.Module) -> torch.nn.Module:
        """The policy on this rank's device; with FSDP sharded instead: each decoder layer one unit, the policy
        the root unit (the embeddings, final norm and lm_head, tied or not), whose forward gathers them for the
        fused op and whose backward reduce-scatters their gradients."""
        if not self.fsdp:
            return policy.to(self.device)
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise ValueError("--fsdp needs PyTorch >= 2.6 (torch.distributed.fsdp.fully_shard)") from None
        blocks = policy.model._no_split_modules or ()          # transformers' names of the decoder-layer classes
        layers = [m for m in policy.model.modules() if type(m).__name__ in blocks]
        if not layers:
            raise ValueError(f"--fsdp: {type(policy.model).__name__} names no decoder-layer class "
                             "(_no_split_modules) to shard by")
        for layer in layers:
            fully_shard(layer)      # moves this rank's shards to the current device
        fully_shard(policy)
        if self.sp > 1:             # a group's ranks hold partial gradients: their sum, averaged over the groups
            if not hasattr(policy, "set_force_sum_reduction_for_comms"):
                raise ValueError("--fsdp with --sequence-parallel needs PyTorch >= 2.8 (FSDP2's "
                                 "set_gradient_divide_factor and set_force_sum_reduction_for_comms)")
            for unit in layers + [policy]:
                unit.set_gradient_divide_factor(float(self.dp))
                unit.set_force_sum_reduction_for_comms(True)      # a sum, then the division (gloo has no premul sum)
        # FSDP leaves the root unsharded after its forward, for the backward that follows. A no-grad forward
        # (reference pass, eval) has none: reshard, so that policy.parameters() are the shards (the optimizer's).
        policy.register_forward_hook(lambda module, args, out: None if torch.is_grad_enabled() else module.reshard())
        return policy

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: a stop that every rank obeys at the same step."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def average_grads(self, params) -> None:
        """Data parallel only: under FSDP the backward has already reduced them (reduce-scatter). Summed over the
        ranks, divided by the data-parallel groups (with one rank per group: the mean)."""
        if self.world > 1 and not self.fsdp:
            for p in params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.dp

    def from_main(self, obj):
        """Rank 0's obj on every rank: decisions that steer collectives (a cache hit) are made once."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
