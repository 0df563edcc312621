"""Tensor parallelism with DTensor: the big linears of the FLUX.2 transformer and of the text encoder (Mistral-3
for [dev], Qwen3 for klein) are sharded over the ranks, so each device holds about 1/n of their weights.

Megatron's pairing: a column-parallel linear (each rank: a slice of the output features, its own heads) feeds a
row-parallel one (each rank: the matching input features; the partial outputs are summed by an all-reduce). So
each attention and each MLP costs one all-reduce, and everything between them runs on the rank's own heads.

    mesh = init_device_mesh("cpu" | "cuda", (world_size,))
    tensor_parallel_transformer(model, mesh)
    tensor_parallel_text_encoder(embedder.model, mesh)

FLUX.2 fuses several projections into one linear ([q | k | v] in `qkv`; [q | k | v | gate | up] in a single
block's `linear1`; [gate | up] in an MLP's first layer). A plain column split would hand rank 0 all of q and half
of k, so the rows are first reordered to [q_0 k_0 v_0 | q_1 k_1 v_1 | ...] (and `linear2`'s input columns to
match), and the blocks' head counts and widths are set to the local ones. The weights are changed in place: after
this the model's state_dict holds sharded, reordered tensors, not the checkpoint.

Results differ from one device's by the rounding of the summed partial products (about 1e-7 relative in fp32).
Needs num_heads, the MLP width and (for the text encoder) the key/value head count divisible by the ranks.
"""

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from flux2.model import DoubleStreamBlock, SingleStreamBlock


def rank_major(sizes: list[int], ranks: int) -> Tensor:
    """Indices that reorder features laid out [part 0 | part 1 | ...] to [rank 0's slice of each part | rank 1's
    ...], so that an even split into `ranks` chunks gives each rank its slice of every part."""
    offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
    pieces = []
    for r in range(ranks):
        for offset, size in zip(offsets, sizes, strict=False):
            step = size // ranks
            pieces.append(torch.arange(offset + r * step, offset + (r + 1) * step))
    return torch.cat(pieces)


def _reorder(linear: nn.Linear, sizes: list[int], ranks: int, dim: int) -> None:
    index = rank_major(sizes, ranks).to(linear.weight.device)
    linear.weight.data = linear.weight.data.index_select(dim, index)


def check_divisible(what: str, count: int, ranks: int) -> None:
    if count % ranks != 0:
        raise ValueError(f"tensor parallelism over {ranks} ranks needs {what} ({count}) divisible by {ranks}")


def _double_block_plan(block: DoubleStreamBlock, prefix: str, ranks: int) -> dict:
    plan = {}
    for stream in ("img", "txt"):
        attn, mlp = getattr(block, f"{stream}_attn"), getattr(block, f"{stream}_mlp")
        width, hidden = attn.proj.in_features, mlp[2].in_features
        _reorder(attn.qkv, [width] * 3, ranks, dim=0)
        _reorder(mlp[0], [hidden] * 2, ranks, dim=0)  # [gate | up]: SiLUActivation chunks it in two
        attn.num_heads //= ranks
        plan |= {
            f"{prefix}.{stream}_attn.qkv": ColwiseParallel(),
            f"{prefix}.{stream}_attn.proj": RowwiseParallel(),
            f"{prefix}.{stream}_mlp.0": ColwiseParallel(),
            f"{prefix}.{stream}_mlp.2": RowwiseParallel(),
        }
    return plan


def _single_block_plan(block: SingleStreamBlock, prefix: str, ranks: int) -> dict:
    width, hidden = block.hidden_size, block.mlp_hidden
    _reorder(block.linear1, [width] * 3 + [hidden] * 2, ranks, dim=0)
    _reorder(block.linear2, [width, hidden], ranks, dim=1)  # input is [attention out | MLP activation]
    block.num_heads //= ranks
    block.hidden_size //= ranks
    block.mlp_hidden //= ranks
    return {f"{prefix}.linear1": ColwiseParallel(), f"{prefix}.linear2": RowwiseParallel()}


def tensor_parallel_transformer(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard the attention and MLP linears of every block of a built Flux2 over `mesh` (1-D, every rank calls
    this with the same weights). Embedders, modulation and the last layer stay whole on every rank; the model
    ends up on the mesh's device."""
    ranks = mesh.size()
    check_divisible("num_heads", model.params.num_heads, ranks)
    check_divisible("the MLP width", model.params.mlp_hidden, ranks)
    plan = {}
    for i, block in enumerate(model.double_blocks):
        plan |= _double_block_plan(block, f"double_blocks.{i}", ranks)
    for i, block in enumerate(model.single_blocks):
        plan |= _single_block_plan(block, f"single_blocks.{i}", ranks)
    parallelize_module(model, mesh, plan)
    return model.to(mesh.device_type)


DECODER_PLAN = {
    "self_attn.q_proj": ColwiseParallel,
    "self_attn.k_proj": ColwiseParallel,
    "self_attn.v_proj": ColwiseParallel,
    "self_attn.o_proj": RowwiseParallel,
    "mlp.gate_proj": ColwiseParallel,
    "mlp.up_proj": ColwiseParallel,
    "mlp.down_proj": RowwiseParallel,
}


def tensor_parallel_text_encoder(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard the decoder layers of a transformers Mistral / Qwen3 language model (its layers with `self_attn`
    and `mlp`; a vision tower is left whole) over `mesh`. Its attention infers the head count from the width,
    so the local heads need no bookkeeping."""
    text = model.config.get_text_config()
    ranks = mesh.size()
    for what, count in (("num_attention_heads", text.num_attention_heads),
                        ("num_key_value_heads", text.num_key_value_heads),
                        ("intermediate_size", text.intermediate_size)):  # fmt: skip
        check_divisible(what, count, ranks)
    plan = {
        f"{name}.{part}": style()
        for name, module in model.named_modules()
        if hasattr(module, "self_attn") and hasattr(module, "mlp")
        for part, style in DECODER_PLAN.items()
    }
    if not plan:
        raise ValueError(f"{type(model).__name__} has no decoder layers with self_attn and mlp to shard")
    parallelize_module(model, mesh, plan)
    return model.to(mesh.device_type)
