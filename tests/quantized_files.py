"""Tiny quantised transformer files in each published layout, written from OUR weights by our own quantisers.

Every writer takes an original-layout state dict and returns the written path. Linear weights are the 2-D
`*.weight` tensors; everything else (QK-norm scales) is written in bf16. `keep_dense` names layers left in bf16
(the "mixed" files BFL and ComfyUI publish).
"""

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GGML
from safetensors.torch import save_file
from torch import Tensor

from flux2.checkpoints.quantized import E2M1_VALUES, QuantizedWeight, swap_nibbles, swizzle_block_scales
from flux2.transforms.quantized import quantize_fp8

E2M1_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # between the 8 magnitudes of E2M1
PREFIX = "model.diffusion_model."  # ComfyUI's single-file key prefix


def linear_layers(sd: dict[str, Tensor], keep_dense: tuple[str, ...] = ()) -> list[str]:
    return [k.removesuffix(".weight") for k, v in sd.items() if v.ndim == 2 and not k.startswith(keep_dense)]


def _dense(sd: dict[str, Tensor], layers: list[str]) -> dict[str, Tensor]:
    return {k: v.to(torch.bfloat16) for k, v in sd.items() if k.removesuffix(".weight") not in layers}


def _comfy_quant(fmt: str) -> Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


# ----------------------------------------------------------------------------- float8


def write_fp8_bfl(sd, path: Path, keep_dense=()) -> Path:
    """BFL's official layout: original keys, per-tensor scales, formats in the header's `_quantization_metadata`."""
    layers = linear_layers(sd, keep_dense)
    out = _dense(sd, layers)
    for layer in layers:
        q = quantize_fp8(sd[f"{layer}.weight"])
        out |= {f"{layer}.weight": q.tensors["weight"], f"{layer}.weight_scale": q.tensors["weight_scale"],
                f"{layer}.input_scale": torch.tensor(0.01)}  # fmt: skip
    meta = {"format_version": "1.0", "layers": {layer: {"format": "float8_e4m3fn"} for layer in layers}}
    save_file(out, path, metadata={"_quantization_metadata": json.dumps(meta)})
    return path


def write_fp8_comfy(sd, path: Path, keep_dense=(), dtype=torch.float8_e4m3fn, rowwise: bool = False) -> Path:
    """ComfyUI's current layout: `model.diffusion_model.` keys, a `.comfy_quant` JSON tensor per quantised layer.
    `rowwise`: one scale per output row ([out, 1]), as some converters write."""
    layers = linear_layers(sd, keep_dense)
    out = _dense(sd, layers)
    for layer in layers:
        q = quantize_fp8_rows(sd[f"{layer}.weight"], dtype) if rowwise else quantize_fp8(sd[f"{layer}.weight"], dtype)
        out |= {f"{layer}.weight": q.tensors["weight"], f"{layer}.weight_scale": q.tensors["weight_scale"],
                f"{layer}.comfy_quant": _comfy_quant(str(dtype).removeprefix("torch."))}  # fmt: skip
    save_file({PREFIX + k: v for k, v in out.items()}, path)
    return path


def write_fp8_plain(sd, path: Path) -> Path:
    """A plain float8 cast (the first FLUX fp8 files): float8 Linear weights, no scales, no marker."""
    layers = linear_layers(sd)
    save_file(_dense(sd, layers) | {f"{n}.weight": sd[f"{n}.weight"].to(torch.float8_e4m3fn) for n in layers}, path)
    return path


def quantize_fp8_rows(w: Tensor, dtype=torch.float8_e4m3fn):
    scale = (w.abs().amax(dim=1, keepdim=True).float() / torch.finfo(dtype).max).clamp(min=1e-12)
    q = (w.float() / scale).to(dtype)
    return QuantizedWeight("fp8", tuple(w.shape), {"weight": q, "weight_scale": scale})


def write_scaled_fp8(sd, path: Path) -> Path:
    """ComfyUI's older layout: a `scaled_fp8` marker, `.scale_weight` / `.scale_input` per layer."""
    layers = linear_layers(sd)
    out = _dense(sd, layers) | {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for layer in layers:
        q = quantize_fp8(sd[f"{layer}.weight"])
        out |= {f"{layer}.weight": q.tensors["weight"], f"{layer}.scale_weight": q.tensors["weight_scale"],
                f"{layer}.scale_input": torch.tensor(1.0)}  # fmt: skip
    save_file(out, path)
    return path


# ----------------------------------------------------------------------------- nvfp4


def quantize_nvfp4(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest NVFP4: (codes packed low nibble first [out, in/2], float8 block scales [out, in/16], fp32
    global scale) with global = amax / (448 * 6), block = amax_block / 6 / global."""
    global_scale = (w.abs().amax().float() / (448.0 * 6.0)).clamp(min=1e-12)
    blocks = w.float().unflatten(-1, (-1, 16))
    block_scale = (blocks.abs().amax(-1) / 6.0 / global_scale).to(torch.float8_e4m3fn)
    total = (block_scale.float() * global_scale).clamp(min=1e-30)[..., None]
    x = (blocks / total).flatten(-2)
    codes = torch.bucketize(x.abs().clamp(max=6.0), E2M1_MIDPOINTS).to(torch.uint8) | ((x < 0).to(torch.uint8) << 3)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, block_scale, global_scale


def dequantize_reference(packed: Tensor, block_scale: Tensor, global_scale: Tensor) -> Tensor:
    """The writer's own inverse (low nibble first, plain scales), for error bounds."""
    codes = torch.stack([packed & 15, packed >> 4], -1).flatten(-2)
    values = torch.tensor(E2M1_VALUES)[codes.long()].unflatten(-1, (-1, 16))
    return (values * (block_scale.float() * global_scale)[..., None]).flatten(-2)


def write_nvfp4_comfy(sd, path: Path, keep_dense=(), metadata: bool = True) -> Path:
    """BFL's official nvfp4 files (ComfyUI storage): first element in the high nibble, swizzled block scales,
    `weight_scale_2`, `input_scale`; formats in the header metadata or (metadata=False) `.comfy_quant` tensors."""
    layers = linear_layers(sd, keep_dense)
    out = _dense(sd, layers)
    for layer in layers:
        packed, block, global_scale = quantize_nvfp4(sd[f"{layer}.weight"])
        out |= {f"{layer}.weight": swap_nibbles(packed), f"{layer}.weight_scale": swizzle_block_scales(block),
                f"{layer}.weight_scale_2": global_scale, f"{layer}.input_scale": torch.tensor(0.01)}  # fmt: skip
        if not metadata:
            out[f"{layer}.comfy_quant"] = _comfy_quant("nvfp4")
    meta = {"format_version": "1.0", "layers": {layer: {"format": "nvfp4"} for layer in layers}}
    save_file(out, path, metadata={"_quantization_metadata": json.dumps(meta)} if metadata else None)
    return path


def write_nvfp4_modelopt(sd, path: Path) -> Path:
    """NVIDIA ModelOpt's export: no marker, first element in the low nibble, plain [out, in/16] block scales."""
    layers = linear_layers(sd)
    out = _dense(sd, layers)
    for layer in layers:
        packed, block, global_scale = quantize_nvfp4(sd[f"{layer}.weight"])
        out |= {f"{layer}.weight": packed, f"{layer}.weight_scale": block, f"{layer}.weight_scale_2": global_scale}
    save_file(out, path)
    return path


# ----------------------------------------------------------------------------- GGUF

GGUF_QUANTIZABLE = (GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1)  # gguf.quants.quantize can write these


def random_gguf_blocks(qtype: GGML, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid random blocks of a type the gguf package cannot quantise to: random bytes, with every f16 scale
    field replaced by a small finite half (random bytes there could be inf/NaN)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in F16_FIELDS[qtype]:
        halves = rng.uniform(1e-4, 2e-3, size=raw.shape[0]).astype(np.float16)
        raw[:, offset : offset + 2] = halves.view(np.uint8).reshape(-1, 2)
    return raw.reshape(rows, -1)


# Byte offsets of the f16 super-block scales (d, dmin) inside each K-quant block (ggml-common.h).
F16_FIELDS = {GGML.Q2_K: (80, 82), GGML.Q3_K: (108,), GGML.Q4_K: (0, 2), GGML.Q5_K: (0, 2), GGML.Q6_K: (208,)}


def gguf_type_for(layer: str, shape: tuple[int, int], qtypes: dict[str, GGML], default: GGML) -> GGML:
    """The type a layer is written in: F16 where the row is not a whole number of blocks (as city96's tool does)."""
    qtype = next((t for prefix, t in qtypes.items() if layer.startswith(prefix)), default)
    return qtype if shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0 else GGML.F16


def write_gguf(sd, path: Path, default: GGML = GGML.Q8_0, qtypes: dict[str, GGML] | None = None) -> Path:
    """city96-style GGUF: original key names, norms in F32, Linear weights in `default` (or per-prefix `qtypes`)."""
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, t in sd.items():
        if t.ndim != 2:
            writer.add_tensor(key, t.float().numpy())
            continue
        qtype = gguf_type_for(key.removesuffix(".weight"), tuple(t.shape), qtypes or {}, default)
        if qtype == GGML.F16:
            writer.add_tensor(key, t.to(torch.float16).numpy())
        elif qtype in GGUF_QUANTIZABLE:
            data = gguf.quants.quantize(t.float().numpy(), qtype)
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            data = random_gguf_blocks(qtype, *t.shape, seed=len(key))
            writer.add_tensor(key, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
