"""Block offload (flux2.transforms.block_offload): the schedule, observed with synchronous movers.

The CUDA mover (side stream, pinned memory, events) needs a GPU; here the same schedule drives a mover that
really copies on the CPU (so the forward must use the copies) and one that moves to "meta" (so where every
block is shows in its tensors' device).
"""

import dataclasses
import math

import pytest
import torch
from torch import nn

from flux2.registry import TINY_PARAMS
from flux2.sampling import batched_prc_img, batched_prc_txt, denoise, get_schedule
from flux2.tiny import random_flow_model
from flux2.transforms.block_offload import BlockOffload, CopyMover, Visit, block_offload, remove_block_offload
from flux2.transforms.offload import visit
from flux2.transforms.step_cache import active_step_cache, disable_step_cache, enable_step_cache


class CloningMover(CopyMover):
    """Copies every tensor on load, and logs every move."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.log: list[tuple[str, int]] = []
        self.blocks: list[nn.Module] = []
        self.loaded: set[int] = set()
        self.most = 0  # most blocks loaded at once

    def load(self, block: nn.Module) -> Visit:
        index = self.blocks.index(block)
        self.log.append(("load", index))
        self.loaded.add(index)
        self.most = max(self.most, len(self.loaded))
        placed = visit(block, self.device)
        for table, name, tensor in placed:
            table[name] = nn.Parameter(tensor.clone(), False) if isinstance(tensor, nn.Parameter) else tensor.clone()
        return Visit(placed, copied=index)  # a CPU move has no event: keep the index to log the unload

    def unload(self, placed: Visit) -> None:
        self.log.append(("unload", placed.copied))
        self.loaded.remove(placed.copied)
        super().unload(placed)


@pytest.fixture
def model(one_thread):
    return random_flow_model(TINY_PARAMS)


def blocks(model) -> list[nn.Module]:
    return [*model.double_blocks._modules.values(), *model.single_blocks._modules.values()]


def inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    img, img_ids = batched_prc_img(torch.randn(1, TINY_PARAMS.in_channels, 4, 4, generator=g))
    txt, txt_ids = batched_prc_txt(torch.randn(1, 8, TINY_PARAMS.context_in_dim, generator=g))
    return [t.to(device) for t in (img, img_ids, txt, txt_ids)]


def on_device(model, device_type: str) -> list[int]:
    return [i for i, block in enumerate(blocks(model)) if next(block.parameters()).device.type == device_type]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_same_output_and_a_bounded_window(model, prefetch):
    img, img_ids, txt, txt_ids = inputs()
    schedule = get_schedule(3, img.shape[1])
    plain = denoise(model, img, img_ids, txt, txt_ids, schedule, None)
    home = {name: p for name, p in model.named_parameters()}

    mover = CloningMover()
    mover.blocks = blocks(model)
    offload = block_offload(model, "cpu", prefetch=prefetch, mover=mover)

    def check(block, args):
        assert all(p is not home[n] for n, p in _named(model, block))  # it runs on its copy

    handles = [block.register_forward_pre_hook(check) for block in mover.blocks]
    offloaded = denoise(model, img, img_ids, txt, txt_ids, schedule, None)
    for handle in handles:
        handle.remove()
    assert torch.equal(offloaded, plain)
    assert mover.most == 1 + prefetch
    assert len(offload.resident) == prefetch  # the next forward's first blocks, already on their way

    n = len(mover.blocks)
    loads = [i for op, i in mover.log if op == "load"]
    assert loads[: 1 + prefetch] == list(range(1 + prefetch))  # block 0, then the ones ahead
    assert loads == [i % n for i in range(len(loads))]  # in call order, each once per forward

    assert remove_block_offload(model) is offload
    assert {name: p for name, p in model.named_parameters()} == home  # the very same CPU tensors
    assert len([op for op, _ in mover.log if op == "load"]) == len([op for op, _ in mover.log if op == "unload"])


def _named(model, block):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for p in block.parameters()]


def test_blocks_on_the_device_only_in_their_window(model):
    """On "meta" (shapes only), a block's weights show where it is; the rest of the model lives there too.
    As block i runs, i+1 is there (prefetched while i-1 ran); i+2 is fetched once i's work is queued."""
    offload = block_offload(model, "meta", prefetch=2)
    seen = []
    all_blocks = blocks(model)
    handles = [b.register_forward_pre_hook(lambda b, a: seen.append(on_device(model, "meta"))) for b in all_blocks]
    img, img_ids, txt, txt_ids = inputs("meta")
    with torch.no_grad():
        for _ in range(2):
            out = model(img, img_ids, torch.ones(1, device="meta"), txt, txt_ids, None)
    assert out.shape == img.shape and out.device.type == "meta"
    n = len(all_blocks)
    windows = [sorted({i, (i + 1) % n}) for i in range(n)]
    assert seen == [[0], *windows[1:], *windows]  # the first forward starts with nothing prefetched
    assert model.img_in.weight.device.type == "meta"
    with offload("sample"):
        pass
    assert on_device(model, "meta") == []  # a stage's end sends the prefetched blocks home
    for handle in handles:
        handle.remove()
    remove_block_offload(model)
    assert on_device(model, "cpu") == list(range(n))


def test_composes_with_the_step_cache(model):
    img, img_ids, txt, txt_ids = inputs()
    schedule = get_schedule(4, img.shape[1])
    plain = denoise(model, img, img_ids, txt, txt_ids, schedule, None)
    offload = block_offload(model, "cpu", prefetch=1)
    cache = enable_step_cache(model, 0.0)
    assert torch.equal(denoise(model, img, img_ids, txt, txt_ids, schedule, None), plain)
    assert active_step_cache(model) is cache
    disable_step_cache(model)
    cache = enable_step_cache(model, math.inf)
    skipping = denoise(model, img, img_ids, txt, txt_ids, schedule, None)  # skipped blocks are never fetched
    assert cache.stats["skipped"] == 3
    assert len(offload.resident) <= 1 + offload.prefetch
    with pytest.raises(ValueError, match="StepCache"):
        remove_block_offload(model)  # the cache came last: it comes off first
    disable_step_cache(model)
    assert active_step_cache(model) is None
    assert remove_block_offload(model) is offload
    enable_step_cache(model, math.inf)
    assert torch.equal(denoise(model, img, img_ids, txt, txt_ids, schedule, None), skipping)
    disable_step_cache(model)


def test_rejects_a_negative_prefetch():
    with pytest.raises(ValueError, match="prefetch"):
        BlockOffload([nn.Linear(1, 1)], -1, CopyMover(torch.device("cpu")))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="the side-stream mover needs CUDA")


@CUDA
def test_cuda_prefetch_on_a_side_stream_matches_and_holds_only_the_window():
    params = dataclasses.replace(TINY_PARAMS, hidden_size=512, num_heads=4, axes_dim=(32, 32, 32, 32), depth=4,
                                 depth_single_blocks=8)  # fmt: skip
    model = random_flow_model(params).to("cuda")
    img, img_ids, txt, txt_ids = inputs("cuda")
    schedule = get_schedule(4, img.shape[1])
    plain = denoise(model, img, img_ids, txt, txt_ids, schedule, None)
    block_bytes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks(model)]

    assert block_offload(model, "cuda", prefetch=1).resident == {}
    assert all(p.is_pinned() for b in blocks(model) for p in b.parameters())
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    offloaded = denoise(model, img, img_ids, txt, txt_ids, schedule, None)
    torch.cuda.synchronize()
    assert torch.equal(offloaded, plain)
    assert torch.cuda.max_memory_allocated() - base < sum(block_bytes) / 2  # a window of 2 of 12 blocks
    remove_block_offload(model)
    assert all(p.device.type == "cpu" for b in blocks(model) for p in b.parameters())
