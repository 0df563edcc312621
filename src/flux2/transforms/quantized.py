"""Weight-only quantised Linears: the weight stays quantised in memory and is dequantised one layer at a time.

    model = load_flow_model(path="flux-2-klein-9b-fp8.safetensors")   # quantised layers become QuantizedLinear
    quantize_linears(model, {"double_blocks.0.img_attn.qkv": weight})  # or swap them in by hand
    dequantize_linears(model)                                          # back to plain nn.Linear

`model.py` never branches on this: a QuantizedLinear is called exactly like the nn.Linear it replaces. On a CUDA
GPU with float8 tensor cores (compute capability >= 8.9) an e4m3 weight runs through `torch._scaled_mm` (fp8
compute, weights and activations): with a per-tensor weight scale the input is quantised per tensor, with a
row-wise one ([out, 1]) per row (token). Everywhere else the layer dequantises and calls F.linear (weight-only:
the memory halves, the maths stays bf16). `compute="scaled_mm"` forces the float8 GEMM (torch also has one on
the CPU: slow, but the same float8 inputs, which is how `benchmarks/fp8_quality.py` measures its cost here).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2.checkpoints.gguf import dequantize_gguf
from flux2.checkpoints.quantized import E2M1_VALUES, FP8_DTYPES, NVFP4_BLOCK, QuantizedWeight

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALED_MM_CAPABILITY = (8, 9)  # Ada / Hopper and newer have float8 tensor cores
SCALED_MM_MULTIPLE = 16  # cuBLASLt's float8 GEMM needs K and N divisible by 16
# How a QuantizedLinear computes: "auto" (the float8 GEMM where the hardware has it, else dequantise),
# "scaled_mm" (always the float8 GEMM), "dequantize" (never).
COMPUTE_MODES = ("auto", "scaled_mm", "dequantize")


class QuantizedLinear(nn.Module):
    """A bias-free Linear whose weight is a `QuantizedWeight` (its tensors are this module's buffers)."""

    def __init__(self, weight: QuantizedWeight, compute: str = "auto"):
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {', '.join(COMPUTE_MODES)}, got {compute!r}")
        self.compute = compute
        self.format, self.qtype = weight.format, weight.qtype
        self.out_features, self.in_features = weight.shape
        for name, t in weight.tensors.items():
            self.register_buffer(name, t)

    def extra_repr(self) -> str:
        kind = self.format if self.qtype is None else f"{self.format} type {self.qtype}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantised [out, in] weight, in `dtype` (float32 when None)."""
        return DEQUANTIZE[self.format](self, dtype or torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        if use_scaled_mm(self, x):
            return fp8_scaled_mm(x, self.weight, self.weight_scale)
        return F.linear(x, self.dense_weight(x.dtype))

    def _apply(self, fn, recurse=True):
        """`.to(device)` moves the buffers; a dtype change (`.to(torch.bfloat16)`, `.half()`) would destroy them,
        so only the device is taken from what `fn` does to a float tensor. The compute dtype is the input's."""
        probe = fn(torch.zeros((), device=self.weight.device))
        for name, t in self._buffers.items():
            if t is not None:
                self._buffers[name] = t.to(probe.device)
        return self


def dequantize_fp8(m: QuantizedLinear, dtype: torch.dtype) -> Tensor:
    # Every float8 value is exact in bf16/fp16, and the in-place product with the fp32 scale is computed in fp32
    # and rounded once: the same bits as (fp8.float() * scale).to(dtype), at a fraction of the memory traffic.
    return m.weight.to(dtype).mul_(m.weight_scale)


def dequantize_nvfp4(m: QuantizedLinear, dtype: torch.dtype) -> Tensor:
    """e2m1 codes (low nibble = first of the pair) * float8 block scale * fp32 global scale."""
    lut = torch.tensor(E2M1_VALUES, device=m.weight.device)
    codes = torch.stack([m.weight & 0x0F, m.weight >> 4], dim=-1).flatten(-2)  # [out, in]
    blocks = lut[codes.long()].unflatten(-1, (-1, NVFP4_BLOCK))  # [out, in / 16, 16]
    scale = m.weight_scale.float() * m.weight_scale_2
    return (blocks * scale[..., None]).flatten(-2)[: m.out_features, : m.in_features].to(dtype)


def dequantize_gguf_layer(m: QuantizedLinear, dtype: torch.dtype) -> Tensor:
    return dequantize_gguf(m.weight, m.qtype, (m.out_features, m.in_features)).to(dtype)


DEQUANTIZE = {"fp8": dequantize_fp8, "nvfp4": dequantize_nvfp4, "gguf": dequantize_gguf_layer}


# ----------------------------------------------------------------------------- the float8 fast path


def use_scaled_mm(m: QuantizedLinear, x: Tensor) -> bool:
    """The float8 GEMM for an e4m3 weight with a per-tensor or row-wise scale and GEMM-friendly sizes, on a device
    that has float8 tensor cores (or when the layer's `compute` asks for it); everything else dequantises."""
    eligible = (
        m.format == "fp8"
        and m.weight.dtype == torch.float8_e4m3fn
        and m.weight_scale.numel() in (1, m.out_features)
        and m.in_features % SCALED_MM_MULTIPLE == 0
        and m.out_features % SCALED_MM_MULTIPLE == 0
    )
    if m.compute != "auto":
        return eligible and m.compute == "scaled_mm"
    return eligible and has_fp8_tensor_cores(x.device)


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """A CUDA GPU of compute capability >= 8.9. (torch also has a CPU `_scaled_mm`; the CPU keeps the plain
    dequantise-then-F.linear path, which is the reference the fast path is tested against.)"""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= SCALED_MM_CAPABILITY


def fp8_scaled_mm(x: Tensor, weight: Tensor, weight_scale: Tensor) -> Tensor:
    """x @ W.T with x quantised to e4m3 (scale amax / 448): per tensor for a per-tensor weight scale, per row for a
    row-wise one (cuBLASLt takes both operands' scales the same way; its row-wise GEMM writes bf16)."""
    rows = x.reshape(-1, x.shape[-1])
    rowwise = weight_scale.numel() > 1
    amax = rows.abs().amax(dim=1, keepdim=True) if rowwise else rows.abs().amax()
    x_scale = (amax.float() / FP8_E4M3_MAX).clamp(min=1e-12)
    xq = (rows.float() / x_scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    w_scale = weight_scale.float().reshape(1, -1) if rowwise else weight_scale.float().reshape(())
    # _scaled_mm wants the second operand column-major: W [out, in] row-major, transposed, is exactly that.
    out = torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=w_scale,
                           out_dtype=torch.bfloat16 if rowwise else x.dtype)  # fmt: skip
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


# ----------------------------------------------------------------------------- swapping modules


def quantize_linears(model: nn.Module, weights: dict[str, QuantizedWeight], compute: str = "auto") -> nn.Module:
    """Replace the nn.Linear at each name (e.g. `single_blocks.0.linear1`) with a QuantizedLinear holding `weights`.

    Raises ValueError naming the layer when it is not a bias-free Linear or the shapes differ."""
    for name, weight in weights.items():
        parent, attr = _parent(model, name)
        old = getattr(parent, attr, None)
        if not isinstance(old, nn.Linear) or old.bias is not None:
            raise ValueError(f"{name}: quantised weights are only for bias-free nn.Linear layers, found {type(old)}")
        if (old.out_features, old.in_features) != weight.shape:
            raise ValueError(
                f"{name}: quantised weight is [out, in] = {list(weight.shape)}, the model's Linear is "
                f"{[old.out_features, old.in_features]}"
            )
        setattr(parent, attr, QuantizedLinear(weight, compute))
    return model


def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every QuantizedLinear with a plain nn.Linear holding its dequantised weight in `dtype`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            parent, attr = _parent(model, name)
            dense = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
            dense.weight = nn.Parameter(module.dense_weight(dtype), requires_grad=False)
            setattr(parent, attr, dense)
    return model


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


# ----------------------------------------------------------------------------- our own quantisers


def quantize_fp8(w: Tensor, dtype: torch.dtype = torch.float8_e4m3fn, rowwise: bool = False) -> QuantizedWeight:
    """Absmax float8: scale = amax / max, W ~ fp8 * scale; one scale for the tensor (ComfyUI's `float8_e4m3fn`
    recipe) or, `rowwise`, one per output row ([out, 1]: an outlier row no longer costs the others precision)."""
    if dtype not in FP8_DTYPES:
        raise ValueError(f"float8 dtype must be one of {FP8_DTYPES}, got {dtype}")
    amax = w.abs().amax(dim=1, keepdim=True) if rowwise else w.abs().amax()
    scale = (amax.float() / torch.finfo(dtype).max).clamp(min=1e-12)
    q = (w.float() / scale).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype)
    return QuantizedWeight("fp8", (w.shape[0], w.shape[1]), {"weight": q, "weight_scale": scale})


def quantize_model_fp8(model: nn.Module, dtype: torch.dtype = torch.float8_e4m3fn, rowwise: bool = False,
                       compute: str = "auto") -> nn.Module:  # fmt: skip
    """Every bias-free nn.Linear of a built model becomes a float8 QuantizedLinear (per-tensor or row-wise
    scales), one layer at a time (so the dense and the quantised copy of the whole model never coexist)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and m.bias is None:
            quantize_linears(model, {name: quantize_fp8(m.weight.detach(), dtype, rowwise)}, compute)
    return model
