"""Deterministic, resumable batches for every data-parallel rank.

The global batch of step ``s`` is samples ``[s * G, (s + 1) * G)`` of the (shuffled) GPTDataset, G =
``train.global_batch``; data-parallel rank ``d`` takes its ``G / dp`` consecutive slice, cut into micro-batches.
So the samples a step sees depend only on the step and the global batch -- not on the layout -- which is what
makes DP/TP/PP runs comparable to the single-process run, and makes resume exact: the data position is the
step number (``consumed_samples = step * G``), stored in every checkpoint.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class StepBatches:
    """Micro-batch iterators for one data-parallel rank, indexed by optimizer step."""

    def __init__(self, dataset, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 device: torch.device) -> None:
        if global_batch % (micro_batch * dp_size) != 0:
            raise ValueError(f"global batch {global_batch} is not divisible by micro_batch * dp = "
                             f"{micro_batch} * {dp_size}")
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.device = device
        self.num_microbatches = global_batch // (micro_batch * dp_size)

    def _collate(self, indices: range) -> dict[str, torch.Tensor]:
        n = len(self.dataset)
        items = [self.dataset[i % n] for i in indices]  # wraps around: an epoch boundary, never an error
        out = {}
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            out[key] = torch.stack([torch.as_tensor(np.asarray(it[key])) for it in items]).to(self.device)
        out["tokens"] = out["tokens"].long()
        out["labels"] = out["labels"].long()
        out["position_ids"] = out["position_ids"].long()
        out["loss_mask"] = out["loss_mask"].float()
        return out

    def step_iterator(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """The ``num_microbatches`` micro-batches of this rank for optimizer step ``step``."""
        per_rank = self.global_batch // self.dp_size
        start = step * self.global_batch + self.dp_rank * per_rank
        for m in range(self.num_microbatches):
            lo = start + m * self.micro_batch
            yield self._collate(range(lo, lo + self.micro_batch))

    def eval_iterator(self, num_microbatches: int) -> Iterator[dict[str, torch.Tensor]]:
        """A fixed set of validation micro-batches (the same every evaluation, split over DP ranks)."""
        for m in range(num_microbatches):
            lo = (m * self.dp_size + self.dp_rank) * self.micro_batch
            yield self._collate(range(lo, lo + self.micro_batch))
