"""Seeing every block call of a built `Flux2` without touching model.py: `Flux2._run` calls its blocks by
iterating `double_blocks` / `single_blocks`, so a transform swaps in a list that holds the very same blocks but
yields each one wrapped. Step caching and block offload are made this way; they nest, and come off in reverse.
"""

import functools
from collections.abc import Callable, Iterator

from torch import nn


class InterceptedBlocks(nn.ModuleList):
    """The very same blocks (same children, same state_dict keys), but iterating yields `around(i, block)`.

    `Flux2._run` calls its blocks by iterating `double_blocks` / `single_blocks`, so a transform that swaps in one
    of these sees every block call without model.py knowing. Lists nest: the inner list's iteration (itself
    perhaps intercepted) is what gets wrapped, so transforms compose and come off in reverse order.
    """

    def __init__(self, inner: nn.ModuleList, around: Callable[[int, Callable], Callable], owner: object):
        super().__init__()
        self._modules = inner._modules  # shared: indexing, .to(), state_dict all see the original blocks
        self.__dict__["inner"] = inner  # not a child: its blocks are already ours
        self.__dict__["around"] = around
        self.__dict__["owner"] = owner

    def __iter__(self) -> Iterator[Callable]:
        for i, block in enumerate(self.inner):
            yield functools.partial(self.around, i, block)


def intercept(model: nn.Module, owner: object, around_double, around_single) -> None:
    model.double_blocks = InterceptedBlocks(model.double_blocks, around_double, owner)
    model.single_blocks = InterceptedBlocks(model.single_blocks, around_single, owner)


def restore(model: nn.Module, owner_type: type) -> object:
    """Undo `intercept` for the transform of `owner_type`, which must be the last one applied; returns its owner."""
    blocks = model.double_blocks
    if not isinstance(blocks, InterceptedBlocks) or not isinstance(blocks.owner, owner_type):
        applied = type(blocks.owner).__name__ if isinstance(blocks, InterceptedBlocks) else "nothing"
        raise ValueError(f"the last block transform on this model is {applied}, not {owner_type.__name__}")
    model.double_blocks, model.single_blocks = blocks.inner, model.single_blocks.inner
    return blocks.owner
