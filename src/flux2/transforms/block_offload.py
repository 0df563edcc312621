"""Block offload: a transformer larger than the card runs with its blocks on the CPU, a few at a time on the device.

Every double and single block lives on the CPU (in pinned memory when the device is CUDA, so copies can be
asynchronous); embeddings, modulation and the final layer stay on the device. Blocks run in one order, the
double blocks then the single ones, so as soon as block i's work is queued, blocks i+1 .. i+prefetch are copied
over on a side CUDA stream, each recording an event the compute stream waits on before that block runs. A
block goes home once it has run, so at most 1 + prefetch blocks are on the device at once. The window wraps
around: the next forward's first blocks arrive while the rest of this one (final layer, Euler step) runs.

The CPU tensors are kept while a block visits the device (flux2.transforms.offload.visit), so sending a block
home costs no copy. Which block is resident when is decided by `BlockOffload` alone; moving is a `Mover`'s job,
so the schedule runs (and is tested) with a synchronous mover on "cpu" or "meta" where no CUDA stream exists.

    offload = block_offload(pipe.flow_model, "cuda", prefetch=1)
    pipe.stage_hooks.append(offload)  # sends the prefetched blocks home when a stage ends
    ...
    remove_block_offload(pipe.flow_model)  # blocks stay on the CPU; the rest stays on the device
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from flux2.transforms.blocks import intercept, restore
from flux2.transforms.offload import HOME, Placement, send_home, visit

BLOCK_LISTS = ("double_blocks", "single_blocks")  # in the order Flux2._run calls them


@dataclass
class Visit:
    """A block's tensors on the device: what to put back, and (CUDA) the event its copy recorded."""

    home: Placement
    copied: object | None = None


class Mover(Protocol):
    def load(self, block: nn.Module) -> Visit: ...  # start the copy of `block` to the device

    def ready(self, visit: Visit) -> None: ...  # the work about to use the block waits for its copy

    def unload(self, visit: Visit) -> None: ...  # back home; the device copy is freed


class CopyMover:
    """Synchronous moves, for devices without streams (and for testing the schedule on "cpu" or "meta")."""

    def __init__(self, device: torch.device):
        self.device = device

    def load(self, block: nn.Module) -> Visit:
        return Visit(visit(block, self.device))

    def ready(self, visit: Visit) -> None:
        pass

    def unload(self, visit: Visit) -> None:
        send_home(visit.home)


class StreamMover(CopyMover):
    """Copies from pinned memory on a side stream, ordered against the compute stream by events.

    The CPU queues work far ahead of the GPU, so a block sent home may still be computing. Before copying
    another block over, the CPU waits until those have finished: the device then really holds no more than
    the window (the block queued last, and the ones being prefetched), and the GPU stays busy meanwhile with
    the block queued last.
    """

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.stream = torch.cuda.Stream(device)
        self.in_flight: list[torch.cuda.Event] = []  # one per block sent home: its work is done when it fires

    def load(self, block: nn.Module) -> Visit:
        for done in self.in_flight:
            done.synchronize()
        self.in_flight.clear()
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            placed = visit(block, self.device)
            copied = torch.cuda.Event()
            copied.record(self.stream)
        for table, name, _ in placed:
            # Allocated on the side stream but used on the compute one: without this the allocator could hand
            # the memory to the next prefetch as soon as the block is sent home, while its kernels still run.
            table[name].record_stream(compute)
        return Visit(placed, copied)

    def ready(self, visit: Visit) -> None:
        torch.cuda.current_stream(self.device).wait_event(visit.copied)

    def unload(self, visit: Visit) -> None:
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        self.in_flight.append(done)
        super().unload(visit)


class BlockOffload:
    """Keeps blocks i .. i+prefetch (in call order, wrapping around) on the device while block i runs."""

    def __init__(self, blocks: list[nn.Module], prefetch: int, mover: Mover):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.blocks, self.mover = blocks, mover
        self.prefetch = min(prefetch, len(blocks) - 1)
        self.resident: dict[int, Visit] = {}  # block position in call order -> its visit

    def run(self, index: int, block: Callable, *args):
        window = [(index + k) % len(self.blocks) for k in range(self.prefetch + 1)]
        for other in [i for i in self.resident if i not in window]:
            self.mover.unload(self.resident.pop(other))  # after skipped blocks (step cache): not needed now
        if index not in self.resident:
            self.resident[index] = self.mover.load(self.blocks[index])  # the first block, or after skips
        self.mover.ready(self.resident[index])
        out = block(*args)
        # Prefetch once this block's work is queued, so its copy overlaps that work.
        for i in window[1:]:
            if i not in self.resident:
                self.resident[i] = self.mover.load(self.blocks[i])
        if len(window) < len(self.blocks):  # else every block fits and all stay
            self.mover.unload(self.resident.pop(index))
        return out

    def release(self) -> None:
        """Send every block home (the window's prefetched blocks stay on the device between forwards)."""
        for i in list(self.resident):
            self.mover.unload(self.resident.pop(i))

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Pipeline stage hook: the device holds no block once a stage is over."""
        try:
            yield
        finally:
            self.release()


def block_offload(
    model: nn.Module, device: str | torch.device, prefetch: int = 1, mover: Mover | None = None
) -> BlockOffload:
    """Put `model`'s (a Flux2's) blocks on the CPU and everything else on `device`; blocks then visit `device`
    one forward position ahead (`prefetch` of them). `mover` defaults to side-stream copies on CUDA."""
    device = torch.device(device)
    for name, child in model.named_children():
        if name not in BLOCK_LISTS:
            child.to(device)
    blocks = [block for name in BLOCK_LISTS for block in getattr(model, name)._modules.values()]
    for block in blocks:
        block.to(HOME)
        if device.type == "cuda":
            _pin(block)
    mover = mover if mover is not None else (StreamMover(device) if device.type == "cuda" else CopyMover(device))
    offload = BlockOffload(blocks, prefetch, mover)
    num_double = len(model.double_blocks)
    intercept(
        model,
        offload,
        lambda i, block, *args: offload.run(i, block, *args),
        lambda i, block, *args: offload.run(num_double + i, block, *args),
    )
    return offload


def remove_block_offload(model: nn.Module) -> BlockOffload:
    """Undo `block_offload` (the last block transform applied): every block back on the CPU, the rest where it is."""
    offload = restore(model, BlockOffload)
    offload.release()
    return offload


def _pin(block: nn.Module) -> None:
    """Page-locked CPU memory, which the device can copy from asynchronously."""
    for module in block.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None and not tensor.is_pinned():
                    pinned = tensor.pin_memory()
                    table[name] = (
                        nn.Parameter(pinned, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else pinned
                    )
