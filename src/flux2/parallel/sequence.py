"""Ulysses sequence parallelism for the FLUX.2 transformer: every rank holds a slice of the joint sequence and
all the heads; around attention an all-to-all trades that for the whole sequence and a slice of the heads.

Each stream is cut into equal contiguous slices, one per rank, the last ones padded with zeros: rank r holds
[txt slice r, txt_extra slice r, img slice r]. Every per-token part of the model (projections, norms, RoPE, MLPs,
modulation) runs on the slices as it would on the whole. Attention is the only place tokens meet: there the
gathered slices are put back into the exact single-device order [txt, txt_extra, img] with the padding dropped,
so each head attends over the very sequence it would on one device (see `Layout`).

Needs num_heads divisible by the number of ranks (the heads are what the all-to-all deals out); any sequence
length works. Runs the plain forward (no reference K/V cache: the klein KV path slices the sequence inside
attention).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from flux2.parallel.group import Axis

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]  # [B, heads, L, D] -> [B, heads, L, D]
PAD = -1  # the global position of a padding slot


@dataclass(frozen=True)
class Stream:
    """One run of tokens of the joint sequence, cut into `ranks` equal contiguous slices (the last padded)."""

    length: int
    ranks: int

    @property
    def slice_len(self) -> int:
        return -(-self.length // self.ranks)

    def take(self, t: Tensor, rank: int) -> Tensor:
        """Rank `rank`'s slice of t along dim 1, zero-padded to slice_len."""
        start = min(rank * self.slice_len, self.length)
        part = t[:, start : start + self.slice_len]
        return F.pad(part, (0, 0) * (t.dim() - 2) + (0, self.slice_len - part.shape[1]))

    def positions(self, rank: int, offset: int) -> Tensor:
        """Global position (offset + index in the stream) of each slot of rank's slice; PAD for padding."""
        index = torch.arange(rank * self.slice_len, (rank + 1) * self.slice_len)
        return torch.where(index < self.length, index + offset, PAD)


@dataclass(frozen=True)
class Layout:
    """Where the tokens of the joint sequence sit after the all-to-all.

    The gathered sequence is every rank's local one in rank order: [txt_0, img_0, txt_1, img_1, ...] with padding.
    `order[g]` is the slot holding global token g, so `index_select(order)` gives [txt, img] exactly as one
    device has it, and `index_copy(order)` puts the results back (padding slots get zeros).
    """

    streams: tuple[Stream, ...]
    order: Tensor  # [L], int64

    @classmethod
    def of(cls, lengths: tuple[int, ...], ranks: int) -> "Layout":
        streams = tuple(Stream(n, ranks) for n in lengths)
        offsets = torch.tensor((0, *lengths)).cumsum(0).tolist()
        gathered = torch.cat([s.positions(r, o) for r in range(ranks) for s, o in zip(streams, offsets, strict=False)])
        slots = torch.arange(len(gathered))
        order = torch.empty(sum(lengths), dtype=torch.long)
        order[gathered[gathered != PAD]] = slots[gathered != PAD]
        return cls(streams, order)

    @property
    def local_len(self) -> int:
        return sum(s.slice_len for s in self.streams)

    def on(self, device: torch.device) -> "Layout":
        return Layout(self.streams, self.order.to(device))


def heads_to_sequence(t: Tensor, layout: Layout, axis: Axis) -> Tensor:
    """[B, H, L_local, D] (all heads, my slots) -> [B, H / n, L, D] (my heads, the whole sequence in order)."""
    n = axis.size
    send = t.unflatten(1, (n, -1)).movedim(1, 0).contiguous()  # [n, B, H/n, L_local, D]: part j goes to rank j
    received = torch.empty_like(send)  # part j: rank j's slots of my heads
    dist.all_to_all_single(received, send, group=axis.group)
    return received.movedim(0, 2).flatten(2, 3).index_select(2, layout.order)


def sequence_to_heads(t: Tensor, layout: Layout, axis: Axis) -> Tensor:
    """The inverse of heads_to_sequence: [B, H / n, L, D] -> [B, H, L_local, D]."""
    n = axis.size
    batch, heads, _, dim = t.shape
    slots = t.new_zeros(batch, heads, n * layout.local_len, dim).index_copy_(2, layout.order, t)
    send = slots.unflatten(2, (n, -1)).movedim(2, 0).contiguous()  # [n, B, H/n, L_local, D]: rank j's slots
    received = torch.empty_like(send)  # part j: my slots of rank j's heads
    dist.all_to_all_single(received, send, group=axis.group)
    return received.movedim(0, 1).flatten(1, 2)


def ulysses(inner: Attention, layout: Layout, axis: Axis) -> Attention:
    """An attention over local slots that runs `inner` over the whole sequence for a slice of the heads."""

    def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k, v = (heads_to_sequence(t, layout, axis) for t in (q, k, v))
        return sequence_to_heads(inner(q, k, v), layout, axis)

    return attention


def check_heads(num_heads: int, ranks: int) -> None:
    if num_heads % ranks != 0:
        raise ValueError(
            f"sequence parallelism deals the {num_heads} attention heads out over {ranks} ranks: the number of "
            f"ranks must divide {num_heads} (use a divisor of it, or tensor parallelism)"
        )


def gather_sequence(local: Tensor, stream: Stream, axis: Axis) -> Tensor:
    """Every rank's slice of one stream [B, slice_len, C] -> the stream [B, length, C] on every rank."""
    parts = [torch.empty_like(local) for _ in range(axis.size)]
    dist.all_gather(parts, local.contiguous(), group=axis.group)
    return torch.cat(parts, dim=1)[:, : stream.length]  # slices are contiguous: the padding is all at the end
