"""GGUF transformer files (city96's ComfyUI-GGUF layout: original BFL key names, one tensor per weight).

GGUF lists a tensor's dimensions fastest-first, so a Linear weight [out, in] is stored as ne = (in, out) and a
quantised row of `in` values is `in / block_size` blocks of `type_size` bytes. Quantised Linear weights stay as
those raw bytes ([out, bytes per row] uint8) and are dequantised on the fly: in torch for the types below, and
through the `gguf` package's numpy code (`gguf.quants.dequantize`, also the tests' oracle) for the rest.
The torch block decoders follow the block layouts of ggml's `ggml-common.h`, as the `gguf` package reads them.
"""

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as GGML
from torch import Tensor

from flux2.checkpoints import CheckpointError
from flux2.checkpoints.quantized import QuantizedWeight, TransformerCheckpoint

GGUF_MAGIC = b"GGUF"
QK_K = 256  # values per K-quant super-block


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_gguf(path: str | Path, device: str | torch.device = "cpu") -> TransformerCheckpoint:
    reader = gguf.GGUFReader(str(path))
    dense: dict[str, Tensor] = {}
    quantized: dict[str, QuantizedWeight] = {}
    for t in reader.tensors:
        qtype = GGML(int(t.tensor_type))
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions fastest-first
        data = torch.from_numpy(np.array(t.data)).to(device)  # a copy: the reader's arrays are read-only memmaps
        if qtype in DENSE_TYPES:
            dense[t.name] = DENSE_TYPES[qtype](data).reshape(shape)
        elif t.name.endswith(".weight") and len(shape) == 2:
            _check_supported(t.name, qtype)
            quantized[t.name.removesuffix(".weight")] = QuantizedWeight(
                "gguf", (shape[0], shape[1]), {"weight": data.reshape(shape[0], -1)}, qtype=int(qtype)
            )
        else:
            dense[t.name] = dequantize_gguf(data, int(qtype), shape)
    return TransformerCheckpoint(dense, quantized)


def _check_supported(name: str, qtype: GGML) -> None:
    if qtype not in TORCH_DECODERS and qtype not in gguf.quants._type_traits:
        supported = sorted({t.name for t in TORCH_DECODERS} | {t.name for t in gguf.quants._type_traits})
        raise CheckpointError(f"{name}: GGUF type {qtype.name} is not supported; supported: {supported}")


def dequantize_gguf(raw: Tensor, qtype: int, shape: tuple[int, ...]) -> Tensor:
    """Raw GGML blocks (uint8, any shape) -> float32 tensor of `shape`: torch where we have a decoder, else numpy."""
    qt = GGML(qtype)
    if qt in TORCH_DECODERS:
        _, type_size = gguf.GGML_QUANT_SIZES[qt]
        return TORCH_DECODERS[qt](raw.reshape(-1, type_size)).reshape(shape)
    values = gguf.quants.dequantize(raw.cpu().numpy().reshape(shape[0], -1), qt)
    return torch.from_numpy(values).to(raw.device).reshape(shape)


# ----------------------------------------------------------------------------- torch block decoders
# Each takes blocks [n, type_size] uint8 and returns [n, block_size] float32.


def _f16(b: Tensor) -> Tensor:
    """Little-endian half-precision numbers from byte pairs: [n, 2k] -> [n, k] float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: Tensor) -> Tensor:
    """[n, m] bytes -> [n, 2m]: all low nibbles, then all high nibbles (the order of Q4_0 / Q4_1 / Q5_x)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits32(qh: Tensor) -> Tensor:
    """[n, 4] bytes of a little-endian uint32 -> [n, 32] bits, bit i first."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh[:, :, None] >> shifts) & 1).reshape(qh.shape[0], 32)


def q8_0(b: Tensor) -> Tensor:  # d: f16, 32 x int8
    return _f16(b[:, :2]) * b[:, 2:].contiguous().view(torch.int8).float()


def q4_0(b: Tensor) -> Tensor:  # d: f16, 16 bytes of nibbles; value = d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).float() - 8)


def q4_1(b: Tensor) -> Tensor:  # d, m: f16, 16 bytes of nibbles; value = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def q5_0(b: Tensor) -> Tensor:  # d: f16, qh: 32 high bits, 16 bytes of nibbles; value = d * (q - 16)
    q = _nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)
    return _f16(b[:, :2]) * (q.float() - 16)


def q5_1(b: Tensor) -> Tensor:  # d, m: f16, qh: 32 high bits, 16 bytes of nibbles; value = d * q + m
    q = _nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)
    return _f16(b[:, :2]) * q.float() + _f16(b[:, 2:4])


def _k_scales_mins(scales: Tensor) -> tuple[Tensor, Tensor]:
    """The eight 6-bit (scale, min) pairs of a Q4_K / Q5_K super-block, packed in 12 bytes."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.float(), mn.float()


def _k_low_nibbles(qs: Tensor) -> Tensor:
    """128 bytes -> 8 sub-blocks of 32: each 32-byte group gives its low nibbles, then its high nibbles."""
    n = qs.shape[0]
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=qs.device).reshape(1, 1, 2, 1)
    return ((qs.reshape(n, 4, 1, 32) >> shifts) & 0x0F).reshape(n, 8, 32)


def q4_k(b: Tensor) -> Tensor:  # d, dmin: f16, 12 bytes of scales/mins, 128 bytes of nibbles
    n = b.shape[0]
    sc, mn = _k_scales_mins(b[:, 4:16])
    d, dmin = _f16(b[:, :2]) * sc, _f16(b[:, 2:4]) * mn
    return (d[..., None] * _k_low_nibbles(b[:, 16:]).float() - dmin[..., None]).reshape(n, QK_K)


def q5_k(b: Tensor) -> Tensor:  # as Q4_K plus 32 bytes of high bits (bit j of byte i: sub-block j, value i)
    n = b.shape[0]
    sc, mn = _k_scales_mins(b[:, 4:16])
    d, dmin = _f16(b[:, :2]) * sc, _f16(b[:, 2:4]) * mn
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).reshape(1, 8, 1)
    high = (b[:, 16:48].reshape(n, 1, 32) >> shifts) & 1
    q = _k_low_nibbles(b[:, 48:]) | (high << 4)
    return (d[..., None] * q.float() - dmin[..., None]).reshape(n, QK_K)


def q6_k(b: Tensor) -> Tensor:  # 128 bytes low nibbles, 64 bytes high 2-bits, 16 int8 scales, d: f16
    n = b.shape[0]
    ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
    low = (ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).float() - 32
    dl = _f16(d) * scales.contiguous().view(torch.int8).float()  # [n, 16]: one scale per 16 values
    return (dl[..., None] * q.reshape(n, 16, 16)).reshape(n, QK_K)


TORCH_DECODERS = {GGML.Q8_0: q8_0, GGML.Q4_0: q4_0, GGML.Q4_1: q4_1, GGML.Q5_0: q5_0, GGML.Q5_1: q5_1,
                  GGML.Q4_K: q4_k, GGML.Q5_K: q5_k, GGML.Q6_K: q6_k}  # fmt: skip
DENSE_TYPES = {
    GGML.F32: lambda d: d,
    GGML.F16: lambda d: d,
    GGML.BF16: lambda d: d.contiguous().view(torch.bfloat16),  # the reader hands BF16 over as raw bytes
}
