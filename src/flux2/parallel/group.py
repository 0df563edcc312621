"""Process groups for one image over several devices: start and stop them, pick each rank's device, and cut
the ranks into the groups a forward splits its work over.

Ranks are laid out as a grid `batch x sequence`: rank r = b * sequence + s. Ranks with the same b split one
batch item's sequence (Ulysses); ranks with the same s split the batch (CFG's [uncond; cond] halves).
"""

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = {"cpu": "gloo", "cuda": "nccl"}
DEVICE_KINDS = tuple(BACKENDS)
# How long a collective may wait for the other ranks before it fails: long enough for the slowest step of the
# largest model, short enough that a rank that died does not leave the others waiting for ever.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


def check_device_kind(device: str) -> None:
    if device not in BACKENDS:
        raise ValueError(f"device must be one of {', '.join(DEVICE_KINDS)}, got {device!r}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the rendezvous of rank 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_device(device: str, rank: int) -> torch.device:
    """One GPU per rank on CUDA (rank r uses GPU r); every rank on the CPU otherwise."""
    check_device_kind(device)
    if device == "cpu":
        return torch.device("cpu")
    if rank >= torch.cuda.device_count():
        raise ValueError(f"rank {rank} needs GPU {rank} but only {torch.cuda.device_count()} are visible")
    return torch.device("cuda", rank)


def init_group(rank: int, world_size: int, port: int, device: str = "cpu") -> torch.device:
    """Join the default process group (rendezvous on 127.0.0.1:port) and return this rank's device."""
    here = rank_device(device, rank)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    elif "OMP_NUM_THREADS" not in os.environ:  # ranks on one CPU share its cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(
        BACKENDS[device],
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return here


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Axis:
    """One way of splitting work: the group of ranks that share it, its size, and this rank's index in it."""

    group: dist.ProcessGroup | None  # None when the size is 1: nothing to talk about
    size: int
    rank: int


@dataclass(frozen=True)
class Split:
    batch: Axis
    sequence: Axis


class Groups:
    """The process groups of every grid a forward may use, made once (making a group is itself collective).

    A forward whose batch divides in two (CFG) runs on the grid 2 x (world / 2); any other on 1 x world.
    """

    def __init__(self):
        self.world = dist.get_world_size()
        self.rank = dist.get_rank()
        self._whole = Split(Axis(None, 1, 0), Axis(dist.group.WORLD if self.world > 1 else None, self.world, self.rank))
        self._halves = self._grid(2) if self.world % 2 == 0 and self.world > 1 else None

    def _grid(self, batch: int) -> Split:
        seq = self.world // batch
        b, s = divmod(self.rank, seq)
        rows = [[i * seq + j for j in range(seq)] for i in range(batch)]  # same b: split the sequence
        columns = [[i * seq + j for i in range(batch)] for j in range(seq)]  # same s: split the batch
        row_group = _subgroup(rows, b) if seq > 1 else None
        column_group = _subgroup(columns, s)
        return Split(Axis(column_group, batch, b), Axis(row_group, seq, s))

    def for_batch(self, batch: int) -> Split:
        """How a forward of this batch size splits over the ranks (every rank gets the same answer)."""
        if self._halves is not None and batch % 2 == 0:
            return self._halves
        return self._whole


def _subgroup(partition: list[list[int]], mine: int) -> dist.ProcessGroup:
    """Make one group per part (every rank makes all of them, in the same order) and return this rank's."""
    made = [dist.new_group(part) for part in partition]
    return made[mine]
