"""Step caching: skip most of the transformer on steps where its first block barely changed.

Adjacent Euler steps of a many-step sampler (50 on [dev] and the klein base models) feed the transformer nearly
the same input, and its output moves slowly. Each forward runs the first double block and compares that block's
image-stream residual with the one of the last forward that ran in full (relative L1). Below `threshold`, the
remaining double blocks and all single blocks are skipped: the single-stream output is the first block's output
plus the cached residual of the rest of the stack, [txt, img] alike. Otherwise everything runs and the cache is
refreshed. (The first-block residual is refreshed only on full forwards, so drift adds up until one runs.)

This is First Block Cache (https://github.com/chengzeyi/ParaAttention, docs/fastest_flux.md) adapted to FLUX.2's
double-then-single layout: the residual spans the switch from two streams to one, taken between the first double
block's outputs, concatenated [txt, img] as `Flux2._run` does, and the last single block's output.

Forwards are told apart by their timestep: a forward at the same t as the previous one is another pass of the
same step (sequential CFG's uncond then cond, an IP-Adapter pass), and each pass index keeps its own cache; a t
larger than the previous one starts a new generation and clears everything. `reset()` does that by hand, and the
cache is also a pipeline stage hook that resets as "sample" begins.

    cache = enable_step_cache(pipe.flow_model, threshold=0.1)
    pipe.stage_hooks.append(cache)
    ...; cache.stats  # {"steps": 50, "calls": 100, "skipped": 37} for the last generation
    disable_step_cache(pipe.flow_model)

Threshold 0 never skips and gives bit-exactly the uncached result.
"""

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flux2.transforms.blocks import InterceptedBlocks, intercept, restore

# The entry points of Flux2 that run the blocks; each takes the timesteps [B] as its third argument.
ENTRY_POINTS = ("forward", "forward_kv_extract", "forward_kv_cached")
TIMESTEPS_ARG = 2


@dataclass
class _Slot:
    """What one pass of a step (index 0, or 1 for the cond half of sequential CFG, ...) remembers."""

    first: Tensor | None = None  # image-stream residual of the first double block, at the last full forward
    rest: Tensor | None = None  # [B, L_txt + L_img, H]: last single block's output minus the first block's


class StepCache:
    """The skip decision and the cached residuals of every pass; `double` / `single` run in place of the blocks."""

    def __init__(self, num_single: int, threshold: float):
        if not threshold >= 0:
            raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
        self.threshold = threshold
        self.num_single = num_single
        self.totals = {"steps": 0, "calls": 0, "skipped": 0}  # since enabled
        self.reset()

    def reset(self) -> None:
        """Forget every cached residual and start counting a new generation."""
        self.slots: dict[int, _Slot] = {}
        self.stats = {"steps": 0, "calls": 0, "skipped": 0}  # this (or the last) generation
        self._t: float | None = None
        self._pass = 0
        self._skipping = False
        self._start: tuple[Tensor, Tensor] | None = None  # (txt, img) after the first double block

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Pipeline stage hook: a fresh cache for every "sample" stage."""
        if stage == "sample":
            self.reset()
        yield

    def begin(self, timesteps: Tensor) -> None:
        """Called as a forward starts: which step and pass it is."""
        t = float(timesteps.reshape(-1)[0])
        if self._t is None or t > self._t:
            self.reset()
        if t == self._t:
            self._pass += 1
        else:
            self._pass = 0
            self._count("steps")
        self._t = t
        self._count("calls")

    def _count(self, key: str) -> None:
        self.stats[key] += 1
        self.totals[key] += 1

    def double(self, i: int, block: Callable, img, txt, pe, mod_img, mod_txt, ref=None) -> tuple[Tensor, Tensor]:
        if i == 0:
            return self._first(block, img, txt, pe, mod_img, mod_txt, ref)
        if self._skipping:
            return img, txt
        return block(img, txt, pe, mod_img, mod_txt, ref)

    def single(self, i: int, block: Callable, x: Tensor, pe, mod, ref=None) -> Tensor:
        slot = self.slots[self._pass]
        if self._skipping:
            return x + slot.rest if i == 0 else x
        x = block(x, pe, mod, ref)
        if i == self.num_single - 1:
            slot.rest = x - self._concat_start()
        return x

    def _first(self, block: Callable, img, txt, pe, mod_img, mod_txt, ref) -> tuple[Tensor, Tensor]:
        out_img, out_txt = block(img, txt, pe, mod_img, mod_txt, ref)
        residual = out_img - img
        slot = self.slots.setdefault(self._pass, _Slot())
        extracting = ref is not None and ref.extract  # the KV path's first step must fill the reference K/V
        self._skipping = not extracting and self._close(slot, residual, out_txt.shape[1])
        if self._skipping:
            self._count("skipped")
        else:
            slot.first, self._start = residual, (out_txt, out_img)
        return out_img, out_txt

    def _concat_start(self) -> Tensor:
        start, self._start = torch.cat(self._start, dim=1), None  # [txt, img], as Flux2._run joins the streams
        return start

    def _close(self, slot: _Slot, residual: Tensor, num_txt: int) -> bool:
        """Relative L1 change of the first block's residual since the last full forward, below the threshold."""
        if self.threshold == 0 or slot.first is None or slot.rest is None:
            return False
        if slot.first.shape != residual.shape or slot.rest.shape[1] != num_txt + residual.shape[1]:
            return False  # another layout (the KV path's extract step, extra text tokens): not comparable
        change = (residual.float() - slot.first.float()).abs().mean() / slot.first.float().abs().mean()
        return bool(change < self.threshold)


def enable_step_cache(model: nn.Module, threshold: float = 0.1) -> StepCache:
    """Make `model` (a Flux2) skip its blocks after the first on steps that change little; returns the cache."""
    if len(model.double_blocks) == 0 or len(model.single_blocks) == 0:
        raise ValueError("the step cache needs at least one double and one single block")
    cache = StepCache(len(model.single_blocks), threshold)
    intercept(model, cache, cache.double, cache.single)
    for name in ENTRY_POINTS:
        setattr(model, name, _announcing(getattr(model, name), cache))
    return cache


def disable_step_cache(model: nn.Module) -> StepCache:
    """Undo `enable_step_cache` (it must be the last block transform applied); returns the cache, stats intact."""
    cache = restore(model, StepCache)
    for name in ENTRY_POINTS:
        del model.__dict__[name]  # the class's method shows through again
    return cache


def active_step_cache(model: nn.Module) -> StepCache | None:
    """The step cache enabled on `model`, under any other block transforms; None if there is none (for a
    pipeline to report `stats` without keeping the cache itself)."""
    blocks = model.double_blocks
    while isinstance(blocks, InterceptedBlocks):
        if isinstance(blocks.owner, StepCache):
            return blocks.owner
        blocks = blocks.inner
    return None


def _announcing(method: Callable, cache: StepCache) -> Callable:
    @functools.wraps(method)
    def call(*args, **kwargs):
        cache.begin(args[TIMESTEPS_ARG] if len(args) > TIMESTEPS_ARG else kwargs["timesteps"])
        return method(*args, **kwargs)

    return call
