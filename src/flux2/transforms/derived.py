"""A tensor derived from a weight (a transformed kernel), made once and made again only when the weight changes."""

from collections.abc import Callable

import torch
from torch import Tensor


class Derived:
    """`derived(weight)` returns `derive(weight)`, cached: a new weight tensor (`load_state_dict` with assign,
    `.to`) or an in-place update outside inference mode (`load_state_dict`, `mul_`) derives it again. With autograd
    recording through the weight it is derived in the graph each call and never cached."""

    def __init__(self, derive: Callable[[Tensor], Tensor]):
        self.derive = derive
        self._cached: tuple[tuple, Tensor] | None = None

    def __call__(self, weight: Tensor) -> Tensor:
        if weight.requires_grad and torch.is_grad_enabled():
            return self.derive(weight)
        version = None if weight.is_inference() else weight._version  # inference tensors keep no version counter
        key = (weight.data_ptr(), version, weight.dtype, weight.device, weight.stride())
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, self.derive(weight))
        return self._cached[1]
