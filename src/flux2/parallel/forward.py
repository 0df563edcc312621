"""The transform that runs a built `Flux2`'s forward over several ranks: CFG halves over ranks when the batch
divides in two, and the sequence of each half split over the remaining ranks (Ulysses).

    groups = Groups()                        # after init_group, on every rank
    parallel_forward(model, groups)          # model(...) now splits its work; every rank gets the whole result
    restore_forward(model)

The model is not changed: its `forward` is shadowed on the instance by a `ParallelForward`, which runs the
class's own forward on each rank's part under a swapped attention (`flux2.model.sdpa`, as
flux2.transforms.attention does). The klein KV forwards (forward_kv_extract / forward_kv_cached) are left as they
are: they run whole on every rank.
"""

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from flux2 import model as flux2_model
from flux2.parallel.cfg import gather_batch, take_batch
from flux2.parallel.group import Axis, Groups
from flux2.parallel.sequence import Layout, check_heads, gather_sequence, ulysses
from flux2.transforms.attention import swapped_sdpa


@dataclass(frozen=True)
class ForwardInputs:
    """The arguments of Flux2.forward, in its order."""

    x: Tensor  # [B, L_img, C], target then reference tokens
    x_ids: Tensor
    timesteps: Tensor  # [B]
    ctx: Tensor  # [B, L_txt, C]
    ctx_ids: Tensor  # [B, L_txt + n_extra, 4]
    guidance: Tensor | None
    txt_extra: Tensor | None  # [B, n_extra, hidden]

    def batch_part(self, axis: Axis) -> "ForwardInputs":
        fields = ("x", "x_ids", "timesteps", "ctx", "ctx_ids", "guidance", "txt_extra")
        return replace(self, **{name: take_batch(getattr(self, name), axis) for name in fields})


class ParallelForward:
    """Stands in for `Flux2.forward` on one instance; same arguments, same result, work split over ranks."""

    def __init__(self, model: nn.Module, groups: Groups):
        self.plain = model.forward  # the class's forward, bound to the model
        self.num_heads = model.params.num_heads
        self.groups = groups

    def __call__(self, x: Tensor, x_ids: Tensor, timesteps: Tensor, ctx: Tensor, ctx_ids: Tensor,
                 guidance: Tensor | None, *, txt_extra: Tensor | None = None) -> Tensor:  # fmt: skip
        split = self.groups.for_batch(x.shape[0])
        inputs = ForwardInputs(x, x_ids, timesteps, ctx, ctx_ids, guidance, txt_extra).batch_part(split.batch)
        return gather_batch(self.sequence_parallel(inputs, split.sequence), split.batch)

    def sequence_parallel(self, inputs: ForwardInputs, axis: Axis) -> Tensor:
        if axis.size == 1:
            return self._plain(inputs)
        check_heads(self.num_heads, axis.size)
        num_ctx = inputs.ctx.shape[1]
        lengths = (num_ctx, *(() if inputs.txt_extra is None else (inputs.txt_extra.shape[1],)), inputs.x.shape[1])
        layout = Layout.of(lengths, axis.size).on(inputs.x.device)
        ctx_stream, *extra_stream, img_stream = layout.streams
        r = axis.rank
        ctx_ids = [ctx_stream.take(inputs.ctx_ids[:, :num_ctx], r)]
        if extra_stream:
            ctx_ids.append(extra_stream[0].take(inputs.ctx_ids[:, num_ctx:], r))
        local = replace(
            inputs,
            x=img_stream.take(inputs.x, r),
            x_ids=img_stream.take(inputs.x_ids, r),
            ctx=ctx_stream.take(inputs.ctx, r),
            ctx_ids=torch.cat(ctx_ids, dim=1),
            txt_extra=extra_stream[0].take(inputs.txt_extra, r) if extra_stream else None,
        )
        with swapped_sdpa(ulysses(flux2_model.sdpa, layout, axis)):
            out = self._plain(local)
        return gather_sequence(out, img_stream, axis)

    def _plain(self, i: ForwardInputs) -> Tensor:
        return self.plain(i.x, i.x_ids, i.timesteps, i.ctx, i.ctx_ids, i.guidance, txt_extra=i.txt_extra)


def parallel_forward(model: nn.Module, groups: Groups) -> ParallelForward:
    """Make `model(...)` split its work over the ranks of `groups` (call on every rank, same model everywhere)."""
    if isinstance(model.__dict__.get("forward"), ParallelForward):
        raise ValueError("this model's forward is already parallel")
    model.forward = ParallelForward(model, groups)
    return model.forward


def restore_forward(model: nn.Module) -> None:
    if not isinstance(model.__dict__.get("forward"), ParallelForward):
        raise ValueError("this model's forward is not parallel: nothing to restore")
    del model.forward
