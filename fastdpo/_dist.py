"""Data parallelism for the trainer: torchrun / accelerate launch set WORLD_SIZE and RANK.

Each rank takes its slice of every global micro-batch; gradients are averaged
with one all-reduce per parameter after the backward (the same average DDP
forms), so a run gives the single-process loss curve for the same global batch.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Dist:
    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        return items[self.rank::self.world]

    def unshard(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """Inverse of shard for rows: every rank gets all n rows in the original order."""
        if self.world == 1:
            return part
        parts = [None] * self.world
        dist.all_gather_object(parts, part.cpu())
        full = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
        for r, p in enumerate(parts):
            full[r::self.world] = p
        return full

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t

    def average_grads(self, params) -> None:
        if self.world > 1:
            for p in params:
                if p.grad is not None:
                    self.mean_(p.grad)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()
