"""CFG parallelism: a forward over the batch [uncond; cond] runs one half per rank and gathers the velocities.

Each rank runs the plain forward on its part of the batch, so rank r's half is bit for bit what one device
gives for that half alone (the sequential CFG mode); the batched mode on one device differs from it only by the
rounding of batch-2 matrix products.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from flux2.parallel.group import Axis


def take_batch(t: Tensor | None, axis: Axis) -> Tensor | None:
    """This rank's part of a batch (dim 0); a batch must divide evenly (Groups.for_batch sees to it)."""
    if t is None or axis.size == 1:
        return t
    return t.chunk(axis.size)[axis.rank]


def gather_batch(local: Tensor, axis: Axis) -> Tensor:
    """Every rank's part of the batch -> the whole batch, in rank order, on every rank."""
    if axis.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(axis.size)]
    dist.all_gather(parts, local.contiguous(), group=axis.group)
    return torch.cat(parts)
