"""Quantised transformer checkpoints in safetensors: which layers are quantised, how, and their canonical tensors.

Everything is detected from keys, dtypes and metadata (never from file names). Per layer `<l>` (a Linear):

- ComfyUI / BFL (current): `<l>.comfy_quant` (uint8 JSON `{"format": ...}`) or the header metadata's
  `_quantization_metadata` `layers[<l>]` names the format; tensors `<l>.weight`, `<l>.weight_scale`, and for nvfp4
  `<l>.weight_scale_2`; maybe `<l>.input_scale` (a calibrated activation scale, not needed for weight-only use).
- ComfyUI (older): a `scaled_fp8` marker key; `<l>.weight` float8 with `<l>.scale_weight` / `<l>.scale_input`.
- No marker (plain float8 casts, ModelOpt nvfp4): the weight's dtype says it (float8, or uint8 next to a
  `<l>.weight_scale_2`); the same tensor names as the current layout.
- Mixed files: any layer may stay bf16/fp32 and loads as a plain weight.

Conventions (ComfyUI `QUANTIZATION.md`, comfy-kitchen `backends/eager/quantization.py` and `tensor/nvfp4.py`;
BFL's FLUX.2 fp8/nvfp4 files are written for that stack, per sglang #20137 / #23625 and vllm-omni #7835):
- float8: W = fp8.float() * weight_scale, the scale a per-tensor fp32 scalar (a per-row [out] / [out, 1] scale
  from other converters is accepted too). A layer with no scale at all is a plain cast (scale 1).
- nvfp4: W = e2m1 * block_scale * weight_scale_2 over blocks of 16 inputs. Comfy packs the FIRST element of a pair
  in the HIGH nibble (`hi_first=True`) and stores the float8_e4m3fn block scales in cuBLAS's swizzled 128x4 tile
  layout, shape (roundup(out, 128), roundup(in / 16, 4)); NVIDIA ModelOpt packs the first element in the LOW nibble
  and stores plain [out, in / 16] scales. Both are converted here to the canonical form the module keeps:
  low nibble first, plain scales.
"""

import json
from dataclasses import dataclass, field

import torch
from torch import Tensor

from flux2.checkpoints import CheckpointError
from flux2.checkpoints.transformer import ORIGINAL_PREFIXES

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
NVFP4_BLOCK = 16  # inputs per float8 block scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

# comfy_quant / _quantization_metadata format name -> our module format.
COMFY_FORMATS = {"float8_e4m3fn": "fp8", "float8_e5m2": "fp8", "nvfp4": "nvfp4"}
LEGACY_RENAMES = {"scale_weight": "weight_scale", "scale_input": "input_scale"}
LEGACY_MARKER = "scaled_fp8"
METADATA_KEY = "_quantization_metadata"
SIDE_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "comfy_quant")


@dataclass(frozen=True)
class Nvfp4Packing:
    """Where the first element of a pair sits in a byte, and whether block scales are in cuBLAS tiles."""

    high_nibble_first: bool
    swizzled_scales: bool


COMFY_NVFP4 = Nvfp4Packing(high_nibble_first=True, swizzled_scales=True)
MODELOPT_NVFP4 = Nvfp4Packing(high_nibble_first=False, swizzled_scales=False)


@dataclass
class QuantizedWeight:
    """One Linear's weight kept quantised: `tensors` are the module's buffers in canonical layout.

    fp8: weight (float8 [out, in]), weight_scale (fp32, [] or [out, 1]).
    nvfp4: weight (uint8 [out, in / 2], low nibble first), weight_scale (float8_e4m3fn [out, in / 16]),
    weight_scale_2 (fp32 []).
    gguf: weight (uint8 [out, bytes per row], raw GGML blocks), with `qtype` the GGML type number.
    """

    format: str
    shape: tuple[int, int]  # logical [out, in]
    tensors: dict[str, Tensor]
    qtype: int | None = None


@dataclass
class TransformerCheckpoint:
    """A transformer checkpoint split into dense tensors and quantised Linear weights (original key layout)."""

    dense: dict[str, Tensor]
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)

    def logical_state_dict(self) -> dict[str, Tensor]:
        """Dense tensors plus a meta tensor of each quantised weight's logical shape (for reading sizes)."""
        shapes = {f"{layer}.weight": torch.empty(q.shape, device="meta") for layer, q in self.quantized.items()}
        return {**self.dense, **shapes}


# ----------------------------------------------------------------------------- detection


def layer_formats(sd: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Declared format per layer (comfy names), from `.comfy_quant` tensors and the header metadata."""
    formats: dict[str, str] = {}
    if METADATA_KEY in metadata:
        layers = json.loads(metadata[METADATA_KEY]).get("layers", {})
        formats.update({_unprefixed(layer): conf["format"] for layer, conf in layers.items()})
    for key, t in sd.items():
        if key.endswith(".comfy_quant"):
            formats[key.removesuffix(".comfy_quant")] = json.loads(bytes(t.to(torch.uint8).tolist()))["format"]
    unknown = sorted({f"{layer}: {fmt!r}" for layer, fmt in formats.items() if fmt not in COMFY_FORMATS})
    if unknown:
        raise CheckpointError(f"unsupported quantisation format {unknown[:5]}; supported: {sorted(COMFY_FORMATS)}")
    return formats


def _unprefixed(layer: str) -> str:
    return next((layer.removeprefix(p) for p in ORIGINAL_PREFIXES if layer.startswith(p)), layer)


def is_quantized(sd: dict[str, Tensor], metadata: dict[str, str]) -> bool:
    return (
        METADATA_KEY in metadata
        or LEGACY_MARKER in sd
        or any(k.endswith((".comfy_quant", ".weight_scale", ".scale_weight")) for k in sd)
        or any(t.dtype in FP8_DTYPES for t in sd.values())
    )


def split_quantized(sd: dict[str, Tensor], metadata: dict[str, str]) -> TransformerCheckpoint:
    """Separate quantised Linear weights (converted to canonical form) from the dense tensors."""
    sd = _legacy_to_current(sd)
    declared = layer_formats(sd, metadata)
    comfy = bool(declared)
    dense: dict[str, Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    for key, w in sd.items():
        if _is_side(key):
            continue
        layer = key.removesuffix(".weight")
        fmt = _format_of(layer, w, sd, declared)
        if fmt is None or not key.endswith(".weight"):
            dense[key] = _fold_scale(key, w, sd)
        elif fmt == "fp8":
            quantized[layer] = fp8_weight(layer, w, sd.get(f"{layer}.weight_scale"))
        else:
            packing = COMFY_NVFP4 if comfy else MODELOPT_NVFP4
            scales = [_required(sd, f"{layer}.{name}", "nvfp4") for name in ("weight_scale", "weight_scale_2")]
            quantized[layer] = nvfp4_weight(layer, w, *scales, packing)
    _check_side_tensors(sd, quantized, dense)
    return TransformerCheckpoint(dense, quantized)


def _required(sd: dict[str, Tensor], key: str, fmt: str) -> Tensor:
    if key not in sd:
        raise CheckpointError(f"{key} is missing: an {fmt} layer needs weight, weight_scale and weight_scale_2")
    return sd[key]


def _legacy_to_current(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """ComfyUI's older `scaled_fp8` files: `.scale_weight` / `.scale_input` become `.weight_scale` / `.input_scale`."""
    if LEGACY_MARKER not in sd:
        return sd
    out = {}
    for key, t in sd.items():
        if key == LEGACY_MARKER:
            continue
        prefix, _, suffix = key.rpartition(".")
        out[f"{prefix}.{LEGACY_RENAMES[suffix]}" if suffix in LEGACY_RENAMES else key] = t
    return out


def _format_of(layer: str, w: Tensor, sd: dict[str, Tensor], declared: dict[str, str]) -> str | None:
    if layer in declared:
        return COMFY_FORMATS[declared[layer]]
    if w.dtype in FP8_DTYPES:
        return "fp8"
    if w.dtype == torch.uint8 and f"{layer}.weight_scale_2" in sd:
        return "nvfp4"
    return None


def _fold_scale(key: str, w: Tensor, sd: dict[str, Tensor]) -> Tensor:
    """A dense tensor: a high-precision weight that still carries a (usually dummy) scale gets it applied, as the
    layer would; a float8 non-Linear tensor is widened."""
    scale = sd.get(key.removesuffix(".weight") + ".weight_scale") if key.endswith(".weight") else None
    if w.dtype in FP8_DTYPES:  # a float8 norm scale in a plain-cast file: exact in bf16
        return w.to(torch.bfloat16)
    if scale is None or w.dtype == torch.uint8:
        return w
    return (w.float() * _scale_for_rows(key, scale, w.shape[0])).to(w.dtype)


def _check_side_tensors(sd: dict[str, Tensor], quantized: dict, dense: dict) -> None:
    """Every scale must belong to a weight we read; otherwise the file is not what we think it is."""
    owners = set(quantized) | {k.removesuffix(".weight") for k in dense if k.endswith(".weight")}
    orphans = [k for k in sd if _is_side(k) and k.rsplit(".", 1)[0] not in owners]
    if orphans:
        raise CheckpointError(f"scale tensors without a weight: {sorted(orphans)[:10]}")


def _is_side(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in SIDE_SUFFIXES


# ----------------------------------------------------------------------------- per format


def _scale_for_rows(key: str, scale: Tensor, rows: int) -> Tensor:
    """A per-tensor scalar or a per-row scale, as fp32 broadcastable against [out, in]."""
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == rows:
        return scale.reshape(rows, 1)
    raise CheckpointError(
        f"{key}: scale of shape {tuple(scale.shape)} is neither per-tensor (1 value) nor per-row ({rows} values)"
    )


def fp8_weight(layer: str, w: Tensor, scale: Tensor | None) -> QuantizedWeight:
    if w.dtype not in FP8_DTYPES:
        raise CheckpointError(f"{layer}.weight is declared float8 but is {w.dtype}; allowed: {FP8_DTYPES}")
    if scale is None:  # a plain cast
        scale = torch.ones((), device=w.device)
    scale = _scale_for_rows(f"{layer}.weight_scale", scale, w.shape[0])
    return QuantizedWeight("fp8", (w.shape[0], w.shape[1]), {"weight": w, "weight_scale": scale})


def nvfp4_weight(layer: str, packed: Tensor, block_scale: Tensor, global_scale: Tensor, packing: Nvfp4Packing):
    if packed.dtype != torch.uint8 or block_scale.dtype != torch.float8_e4m3fn:
        raise CheckpointError(
            f"{layer}: nvfp4 needs a uint8 weight and float8_e4m3fn weight_scale, got {packed.dtype} and "
            f"{block_scale.dtype}"
        )
    rows, cols = packed.shape[0], packed.shape[1] * 2
    if packing.high_nibble_first:
        packed = swap_nibbles(packed)
    if packing.swizzled_scales:
        block_scale = unswizzle_block_scales(block_scale, rows, cols // NVFP4_BLOCK)
    if tuple(block_scale.shape) != (rows, cols // NVFP4_BLOCK):
        raise CheckpointError(
            f"{layer}.weight_scale: shape {tuple(block_scale.shape)}, expected {(rows, cols // NVFP4_BLOCK)} "
            f"(one float8 scale per {NVFP4_BLOCK} inputs)"
        )
    tensors = {"weight": packed, "weight_scale": block_scale, "weight_scale_2": global_scale.float().reshape(())}
    return QuantizedWeight("nvfp4", (rows, cols), tensors)


def swap_nibbles(packed: Tensor) -> Tensor:
    return (packed << 4) | (packed >> 4)


def unswizzle_block_scales(blocked: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of cuBLAS's block-scale tiling (comfy-kitchen / torchao `to_blocked`).

    The padded [R, C] matrix (R = 128 * ceil(rows / 128), C = 4 * ceil(cols / 4)) is cut into 128x4 tiles in
    row-major tile order; inside a tile, element (row 32 a + b, col c) sits at offset 16 b + 4 a + c.
    """
    n_row, n_col = -(-rows // 128), -(-cols // 4)
    if blocked.numel() != n_row * n_col * 512:
        raise CheckpointError(
            f"swizzled block scales hold {blocked.numel()} values, expected {n_row * n_col * 512} for {rows}x{cols}"
        )
    tiles = blocked.reshape(n_row, n_col, 32, 4, 4)  # (i, j, b, a, c)
    plain = tiles.permute(0, 3, 2, 1, 4).reshape(n_row * 128, n_col * 4)  # (i, a, b, j, c)
    return plain[:rows, :cols].contiguous()


def swizzle_block_scales(plain: Tensor) -> Tensor:
    """cuBLAS's tiled layout of plain [rows, cols] block scales, as a (R, C) matrix (what ComfyUI stores)."""
    rows, cols = plain.shape
    n_row, n_col = -(-rows // 128), -(-cols // 4)
    padded = torch.zeros(n_row * 128, n_col * 4, dtype=plain.dtype, device=plain.device)
    padded[:rows, :cols] = plain
    tiles = padded.reshape(n_row, 4, 32, n_col, 4).permute(0, 3, 2, 1, 4)  # (i, j, b, a, c)
    return tiles.reshape(n_row * 128, n_col * 4)
