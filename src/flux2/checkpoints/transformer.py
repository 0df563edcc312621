"""Transformer checkpoint layouts: original (BFL) <-> diffusers `Flux2Transformer2DModel`, and sizes from shapes.

The layouts are data: one rename table, one table of fused q/k/v that diffusers splits, and one table of
weights whose two halves diffusers stores swapped. `{n}` stands for a block index.
"""

import re

import torch
from torch import Tensor

from flux2.model import Flux2Params

RENAMES: list[tuple[str, str]] = [
    ("img_in.weight", "x_embedder.weight"),
    ("txt_in.weight", "context_embedder.weight"),
    ("time_in.in_layer.weight", "time_guidance_embed.timestep_embedder.linear_1.weight"),
    ("time_in.out_layer.weight", "time_guidance_embed.timestep_embedder.linear_2.weight"),
    ("guidance_in.in_layer.weight", "time_guidance_embed.guidance_embedder.linear_1.weight"),
    ("guidance_in.out_layer.weight", "time_guidance_embed.guidance_embedder.linear_2.weight"),
    ("double_stream_modulation_img.lin.weight", "double_stream_modulation_img.linear.weight"),
    ("double_stream_modulation_txt.lin.weight", "double_stream_modulation_txt.linear.weight"),
    ("single_stream_modulation.lin.weight", "single_stream_modulation.linear.weight"),
    ("final_layer.linear.weight", "proj_out.weight"),
    ("double_blocks.{n}.img_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_q.weight"),
    ("double_blocks.{n}.img_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_k.weight"),
    ("double_blocks.{n}.txt_attn.norm.query_norm.scale", "transformer_blocks.{n}.attn.norm_added_q.weight"),
    ("double_blocks.{n}.txt_attn.norm.key_norm.scale", "transformer_blocks.{n}.attn.norm_added_k.weight"),
    ("double_blocks.{n}.img_attn.proj.weight", "transformer_blocks.{n}.attn.to_out.0.weight"),
    ("double_blocks.{n}.txt_attn.proj.weight", "transformer_blocks.{n}.attn.to_add_out.weight"),
    ("double_blocks.{n}.img_mlp.0.weight", "transformer_blocks.{n}.ff.linear_in.weight"),
    ("double_blocks.{n}.img_mlp.2.weight", "transformer_blocks.{n}.ff.linear_out.weight"),
    ("double_blocks.{n}.txt_mlp.0.weight", "transformer_blocks.{n}.ff_context.linear_in.weight"),
    ("double_blocks.{n}.txt_mlp.2.weight", "transformer_blocks.{n}.ff_context.linear_out.weight"),
    ("single_blocks.{n}.linear1.weight", "single_transformer_blocks.{n}.attn.to_qkv_mlp_proj.weight"),
    ("single_blocks.{n}.linear2.weight", "single_transformer_blocks.{n}.attn.to_out.weight"),
    ("single_blocks.{n}.norm.query_norm.scale", "single_transformer_blocks.{n}.attn.norm_q.weight"),
    ("single_blocks.{n}.norm.key_norm.scale", "single_transformer_blocks.{n}.attn.norm_k.weight"),
]

# Fused [q; k; v] rows in the original, three tensors in diffusers.
QKV_SPLITS: list[tuple[str, tuple[str, str, str]]] = [
    (
        "double_blocks.{n}.img_attn.qkv.weight",
        (
            "transformer_blocks.{n}.attn.to_q.weight",
            "transformer_blocks.{n}.attn.to_k.weight",
            "transformer_blocks.{n}.attn.to_v.weight",
        ),
    ),
    (
        "double_blocks.{n}.txt_attn.qkv.weight",
        (
            "transformer_blocks.{n}.attn.add_q_proj.weight",
            "transformer_blocks.{n}.attn.add_k_proj.weight",
            "transformer_blocks.{n}.attn.add_v_proj.weight",
        ),
    ),
]

# The final modulation is [shift; scale] in the original and [scale; shift] in diffusers.
HALF_SWAPS: list[tuple[str, str]] = [("final_layer.adaLN_modulation.1.weight", "norm_out.linear.weight")]

ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _regex(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{n\}", r"(?P<n>\d+)") + "$")


def _match(pattern: str, key: str) -> str | None:
    """The block index (or "" for a block-less key) if key matches the pattern, else None."""
    m = _regex(pattern).match(key)
    return None if m is None else m.groupdict().get("n", "") or ""


def _fill(pattern: str, n: str) -> str:
    return pattern.replace("{n}", n)


def swap_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def is_diffusers_transformer(sd: dict[str, Tensor]) -> bool:
    return "x_embedder.weight" in sd


def strip_original_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the `model.diffusion_model.` prefix that some single-file exports carry."""
    for prefix in ORIGINAL_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def transformer_original_to_diffusers(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for key, w in sd.items():
        if (converted := _convert_one_to_diffusers(key, w)) is None:
            unknown.append(key)
        else:
            out.update(converted)
    if unknown:
        raise ValueError(f"unknown keys in an original FLUX.2 transformer checkpoint: {sorted(unknown)[:20]}")
    return out


def _convert_one_to_diffusers(key: str, w: Tensor) -> dict[str, Tensor] | None:
    for src, dst in RENAMES:
        if (n := _match(src, key)) is not None:
            return {_fill(dst, n): w}
    for src, dsts in QKV_SPLITS:
        if (n := _match(src, key)) is not None:
            return {_fill(d, n): part for d, part in zip(dsts, w.chunk(3, dim=0), strict=True)}
    for src, dst in HALF_SWAPS:
        if _match(src, key) is not None:
            return {dst: swap_halves(w)}
    return None


def transformer_diffusers_to_original(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    remaining = dict(sd)
    out: dict[str, Tensor] = {}
    for key in list(sd):
        if key not in remaining:
            continue
        for dst, src in RENAMES:
            if (n := _match(src, key)) is not None:
                out[_fill(dst, n)] = remaining.pop(key)
                break
        else:
            _fuse_or_swap(key, remaining, out)
    if remaining:
        raise ValueError(f"unknown keys in a diffusers FLUX.2 transformer checkpoint: {sorted(remaining)[:20]}")
    return out


def _fuse_or_swap(key: str, remaining: dict[str, Tensor], out: dict[str, Tensor]) -> None:
    for dst, srcs in QKV_SPLITS:
        if (n := _match(srcs[0], key)) is not None:
            names = [_fill(s, n) for s in srcs]
            if all(name in remaining for name in names):
                out[_fill(dst, n)] = torch.cat([remaining.pop(name) for name in names], dim=0)
            return
    for dst, src in HALF_SWAPS:
        if _match(src, key) is not None:
            out[dst] = swap_halves(remaining.pop(key))
            return


def _count_blocks(sd: dict[str, Tensor], prefix: str) -> int:
    indices = {int(k.split(".")[1]) for k in sd if k.startswith(prefix + ".")}
    return max(indices) + 1 if indices else 0


def params_from_state_dict(sd: dict[str, Tensor]) -> Flux2Params:
    """Architecture of an original-layout transformer state dict, read from its tensor shapes."""
    required = (
        "img_in.weight",
        "txt_in.weight",
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.0.img_mlp.0.weight",
    )
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"not a FLUX.2 transformer checkpoint: missing {missing}")
    hidden, in_channels = sd["img_in.weight"].shape
    head_dim = sd["double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"].shape[0] // 2
    axis = head_dim // 4
    return Flux2Params(
        in_channels=in_channels,
        context_in_dim=sd["txt_in.weight"].shape[1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=_count_blocks(sd, "double_blocks"),
        depth_single_blocks=_count_blocks(sd, "single_blocks"),
        axes_dim=(axis, axis, axis, head_dim - 3 * axis),  # not stored in checkpoints: the published split
        mlp_ratio=mlp_hidden / hidden,
        use_guidance_embed="guidance_in.in_layer.weight" in sd,
    )


# The `scheduler/scheduler_config.json` of a diffusers FLUX.2 repository: FLUX.1-dev's published values, which the
# FLUX.2 repos are taken to share. With `mu` from the pipeline only use_dynamic_shifting, time_shift_type and
# shift_terminal change the schedule; without use_dynamic_shifting, `mu` is silently ignored.
DIFFUSERS_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
    shift_terminal=None,
)


def diffusers_transformer_config(params: Flux2Params) -> dict:
    """`Flux2Transformer2DModel` config of the same architecture (to write or read a diffusers folder)."""
    return dict(
        in_channels=params.in_channels,
        num_layers=params.depth,
        num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim,
        mlp_ratio=params.mlp_ratio,
        axes_dims_rope=tuple(params.axes_dim),
        rope_theta=params.theta,
        guidance_embeds=params.use_guidance_embed,
    )
