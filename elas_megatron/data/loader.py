"""Deterministic, resumable batches for every data-parallel rank.

The global batch of step ``s`` is samples ``[s * G, (s + 1) * G)`` of the (shuffled) GPTDataset, G =
``train.global_batch``; data-parallel rank ``d`` takes its ``G / dp`` consecutive slice, cut into micro-batches.
So the samples a step sees depend only on the step and the global batch -- not on the layout -- which is what
makes DP/TP/PP runs comparable to the single-process run, and makes resume exact: the data position is the
step number (``consumed_samples = step * G``), stored in every checkpoint.

Every micro-batch's token ids (inputs and labels) are checked against the vocabulary on the host, before they
reach the model (one ``aminmax`` per tensor): an id outside ``[0, vocab_size)`` -- a ``.bin`` corrupted after it
was tokenized, whose sidecar still vouches for it -- becomes a :class:`~elas_megatron.utils.errors.DataError`
naming the data file, the document and token, the sample and the step, instead of an ``IndexError`` in the
embedding (CPU) or a device-side assert (CUDA). Raised at once, or (training, :meth:`StepBatches.host_batches`
with an ``errors`` list) collected while the ids are clamped, so that the trainer can stop every rank together.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from elas_megatron.utils.errors import DataError

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _first_out_of_range(values: torch.Tensor, vocab_size: int) -> tuple[int, int] | None:
    """(row, column) of the first id outside ``[0, vocab_size)`` of a 2-D id tensor, else None (the common case
    costs one ``aminmax``)."""
    low, high = torch.aminmax(values)
    if int(low) >= 0 and int(high) < vocab_size:
        return None
    bad = ((values < 0) | (values >= vocab_size)).nonzero()[0]
    return int(bad[0]), int(bad[1])


class StepBatches:
    """Micro-batch iterators for one data-parallel rank, indexed by optimizer step.

    ``vocab_size``: when given, token ids outside ``[0, vocab_size)`` raise :class:`DataError` (see the module
    docstring); ``what`` names the dataset in that message (``train``, ``validation``).
    """

    def __init__(self, dataset, *, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                 device: torch.device, vocab_size: int | None = None, what: str = "train") -> None:
        if global_batch % (micro_batch * dp_size) != 0:
            raise ValueError(f"global batch {global_batch} is not divisible by micro_batch * dp = "
                             f"{micro_batch} * {dp_size}")
        self.dataset = dataset
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.device = device
        self.vocab_size, self.what = vocab_size, what  # the id check (None: off) and the data's name in its errors
        self.num_microbatches = global_batch // (micro_batch * dp_size)

    def _collate(self, indices: range, where: str, errors: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The samples ``indices`` as one micro-batch on the host, token ids checked; ``where`` (e.g. ``step 3``)
        goes into the error message. With an ``errors`` list, a bad id is not raised: its message is appended and
        the batch's ids are clamped into the vocabulary (so that a step can still run in lockstep with the other
        ranks, which must then learn of the error and stop before the optimizer step)."""
        n = len(self.dataset)
        items = [self.dataset[i % n] for i in indices]  # wraps around: an epoch boundary, never an error
        out = {key: torch.stack([torch.as_tensor(np.asarray(it[key])) for it in items]) for key in KEYS}
        out["tokens"] = out["tokens"].long()
        out["labels"] = out["labels"].long()
        out["position_ids"] = out["position_ids"].long()
        out["loss_mask"] = out["loss_mask"].float()
        if self.vocab_size is not None:
            try:
                self._check_ids(out, indices, where)
            except DataError as exc:
                if errors is None:
                    raise
                errors.append(str(exc))
                out["tokens"].clamp_(0, self.vocab_size - 1)
                out["labels"].clamp_(0, self.vocab_size - 1)
        return out

    def _check_ids(self, batch: dict[str, torch.Tensor], indices: range, where: str) -> None:
        for key, shift in (("tokens", 0), ("labels", 1)):  # labels[p] is token p + 1 of the sample's text
            bad = _first_out_of_range(batch[key], self.vocab_size)
            if bad is None:
                continue
            row, col = bad
            value = int(batch[key][row, col])
            sample = indices[row] % len(self.dataset)
            from elas_megatron.data.datasets import locate_token

            place = locate_token(self.dataset, sample, col + shift)
            source = (f"{place}, {self.what} sample {sample}" if place
                      else f"{self.what} sample {sample} (position {col + shift})")
            fix = ("re-tokenize that file with `elas-prep tokenize` (or re-copy it): its tokens changed after its "
                   ".meta.json was written" if place else "check the dataset's token ids")
            raise DataError(f"token id {value} outside the vocabulary [0, {self.vocab_size}) at {where}: {source}; "
                            f"{fix}")

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in batch.items()}

    def host_batches(self, step: int, errors: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
        """The ``num_microbatches`` micro-batches of this rank for optimizer step ``step`` (0-based), on the host,
        checked: raises :class:`DataError`, or with an ``errors`` list appends to it and clamps (see
        :meth:`_collate`)."""
        per_rank = self.global_batch // self.dp_size
        start = step * self.global_batch + self.dp_rank * per_rank
        return [self._collate(range(lo, lo + self.micro_batch), f"step {step + 1}", errors)
                for lo in range(start, start + self.num_microbatches * self.micro_batch, self.micro_batch)]

    def step_iterator(self, step: int, host: list[dict] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The ``num_microbatches`` micro-batches of this rank for optimizer step ``step``, on the device
        (``host``: what :meth:`host_batches` returned for this step, to skip reading them again)."""
        for batch in (host if host is not None else self.host_batches(step)):
            yield self._to_device(batch)

    def eval_host_batches(self, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        """The validation micro-batches of :meth:`eval_iterator`, on the host, checked."""
        return [self._eval_batch(m) for m in range(num_microbatches)]

    def _eval_batch(self, m: int) -> dict[str, torch.Tensor]:
        lo = (m * self.dp_size + self.dp_rank) * self.micro_batch
        return self._collate(range(lo, lo + self.micro_batch), f"validation batch {m + 1}")

    def eval_iterator(self, num_microbatches: int, host: list[dict] | None = None
                      ) -> Iterator[dict[str, torch.Tensor]]:
        """A fixed set of validation micro-batches (the same every evaluation, split over DP ranks)."""
        for m in range(num_microbatches):
            yield self._to_device(host[m] if host is not None else self._eval_batch(m))
