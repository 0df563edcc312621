"""Winograd F(4×4, 3×3) for the autoencoder's wide 3×3 convs on a CPU: 4× fewer multiply-adds than a direct conv.

Each 4×4 output tile is A^T [(G g G^T) ⊙ (B^T d B)] A for the 6×6 input tile d around it and the 3×3 kernel g, so a
conv becomes: gather the overlapping 6×6 tiles, transform them (one small matmul), 36 independent matmuls over
channels [tiles, C_in] @ [C_in, C_out] (the work: 36 multiply-adds per tile and channel pair instead of 144), and
transform back. The transformed kernels are made once per weight. The tiles go through in chunks of tile rows, so
the transformed tiles (2.25× the chunk's input) stay small and cache-warm.

On a 2-core CPU (oneDNN direct convs, fp32, channels-last; `benchmarks/ae_speed.py`) a 512-wide conv runs in ~0.5×
the time at 32²-64², a 256-wide one in ~0.6-0.75× at 128²; 128-wide layers gain little and narrower ones lose, so
they are left alone (`min_channels`). Accuracy: the transforms round differently from a direct conv; a 256-wide
layer agrees with a float64 conv to ~4e-6 of its largest output (the direct channels-last fp32 conv: ~1.5e-6;
Lavin & Gray's points: ~1e-5), and the whole decoder with diffusers' to ~1e-5. Only fp32 / fp64 weights are swapped:
in bf16 the transforms would lose too much. CPU only (GPU libraries choose their own algorithms).

`winograd_convs(ae)` swaps the autoencoder's eligible `nn.Conv2d` for `WinogradConv2d` (a Conv2d subclass sharing the
same parameters, so state-dict keys do not change); `plain_convs(ae)` swaps them back.
"""

from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2.autoencoder import AutoEncoder
from flux2.transforms.derived import Derived

TILE = 4  # output tile side: F(4×4, 3×3) reads 6×6 input tiles
KERNEL = 3
WINDOW = TILE + KERNEL - 1
# Interpolation points (and ∞): {0, ±1, 1/2, -2} rounds ~2.5× less than Lavin & Gray's {0, ±1, ±2}
# (tests/test_winograd.py; Barabasz et al. 2020 study the choice).
POINTS = (0.0, 1.0, -1.0, 0.5, -2.0)
CHUNK_ELEMENTS = 2**21  # transformed input tiles per chunk (8 MiB in fp32): keeps them cache-warm
MIN_CHANNELS = 256  # narrower convs are as fast or faster direct (oneDNN) on the CPU measured


def vandermonde(columns: int) -> Tensor:
    """[WINDOW, columns]: row j holds the powers of point j; the last row (the point at ∞) picks the top power."""
    v = torch.zeros(WINDOW, columns, dtype=torch.float64)
    for j, point in enumerate(POINTS):
        v[j] = torch.tensor([point**i for i in range(columns)], dtype=torch.float64)
    v[-1, -1] = 1.0
    return v


def transforms_1d() -> tuple[Tensor, Tensor, Tensor]:
    """(A^T [4, 6], G [6, 3], B^T [6, 6]) with y = A^T [(G g) ⊙ (B^T d)] the correlation of a 6-long d with a 3-tap g.

    Toom-Cook: a linear convolution is V_n^-1 [(V_4 h) ⊙ (V_3 g)] (evaluate, multiply, interpolate); the
    correlation is its transpose in h, hence A^T = V_4^T, G = V_3, B^T = V_6^-T."""
    return vandermonde(TILE).T, vandermonde(KERNEL), torch.linalg.inv(vandermonde(WINDOW)).T


@cache
def matrices(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(B^T ⊗ B^T [36, 36], A^T ⊗ A^T [16, 36]): the 2-D transforms as single matmuls on flattened tiles."""
    a_t, _, b_t = transforms_1d()
    return tuple(torch.kron(m, m).to(device=device, dtype=dtype) for m in (b_t, a_t))


def transformed_kernels(weight: Tensor) -> Tensor:
    """[C_out, C_in, 3, 3] -> G g G^T for every channel pair, as [36, C_in, C_out] (one matmul operand per tile
    position). Made in float64 so the kernel side adds no rounding of its own."""
    g = transforms_1d()[1].to(weight.device)
    c_out, c_in = weight.shape[:2]
    taps = weight.double().permute(2, 3, 1, 0).reshape(KERNEL * KERNEL, c_in * c_out)  # [9, C_in·C_out]
    return torch.mm(torch.kron(g, g), taps).view(WINDOW * WINDOW, c_in, c_out).to(weight.dtype)


def winograd_conv3x3(x: Tensor, kernels: Tensor, bias: Tensor | None, chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """A 3×3, stride 1, padding 1 conv of x [B, C_in, H, W] with `transformed_kernels` -> channels-last output."""
    b, c_in, h, w = x.shape
    c_out = kernels.shape[-1]
    rows, cols = -(-h // TILE), -(-w // TILE)
    b_t2, a_t2 = matrices(x.dtype, x.device)
    # NHWC, zero-padded by 1 (the conv's padding) plus up to 3 to whole tiles: [B, 4·rows + 2, 4·cols + 2, C_in]
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, TILE * cols + 1 - w, 1, TILE * rows + 1 - h))
    out = x.new_empty(b, rows, TILE, cols, TILE, c_out)  # NHWC storage of [B, C_out, 4·rows, 4·cols]
    s_b, s_h, s_w, s_c = padded.stride()
    step = max(1, chunk_elements // (WINDOW * WINDOW * b * cols * c_in))  # tile rows per chunk
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        tiles = padded.as_strided(  # [6, 6, B, n, cols, C_in]: overlapping windows, a view
            (WINDOW, WINDOW, b, n, cols, c_in),
            (s_h, s_w, s_b, TILE * s_h, TILE * s_w, s_c),
            padded.storage_offset() + TILE * r0 * s_h,
        )
        v = torch.mm(b_t2, tiles.reshape(WINDOW * WINDOW, -1))  # the reshape gathers the tiles once
        m = torch.bmm(v.view(WINDOW * WINDOW, -1, c_in), kernels)  # [36, B·n·cols, C_out]
        y = torch.mm(a_t2, m.view(WINDOW * WINDOW, -1)).view(TILE, TILE, b, n, cols, c_out)
        chunk = out[:, r0 : r0 + n]  # [B, n, 4, cols, 4, C_out]
        y = y.permute(2, 3, 0, 4, 1, 5)
        if bias is None:
            chunk.copy_(y)
        else:
            torch.add(y, bias, out=chunk)
    image = out.view(b, TILE * rows, TILE * cols, c_out)[:, :h, :w].permute(0, 3, 1, 2)
    return image.contiguous(memory_format=torch.channels_last)  # a copy only when cropped


class WinogradConv2d(nn.Conv2d):
    """An `nn.Conv2d` (3×3, stride 1, padding 1) that runs as Winograd F(4×4, 3×3), its kernels transformed once
    per weight. With autograd on, off the CPU or in another dtype than fp32/fp64 it runs the plain conv."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = Derived(transformed_kernels)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "WinogradConv2d":
        with torch.device("meta"):  # a shell: the parameters are the conv's own
            fast = cls(conv.in_channels, conv.out_channels, 3, padding=1, bias=conv.bias is not None)
        fast.weight, fast.bias = conv.weight, conv.bias
        return fast

    def forward(self, x: Tensor) -> Tensor:
        plain = torch.is_grad_enabled() and self.weight.requires_grad
        if plain or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return super().forward(x)
        return winograd_conv3x3(x, self.kernels(self.weight), self.bias)


def eligible(conv: nn.Module, min_channels: int) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and min(conv.in_channels, conv.out_channels) >= min_channels
        and conv.weight.dtype in (torch.float32, torch.float64)
        and conv.weight.device.type == "cpu"
    )


def winograd_convs(ae: AutoEncoder, min_channels: int = MIN_CHANNELS) -> AutoEncoder:
    """Swap the eligible 3×3 convs (stride 1, both widths ≥ `min_channels`, fp32/fp64, on the CPU), in place."""
    for parent in ae.modules():
        for name, child in parent.named_children():
            if eligible(child, min_channels):
                setattr(parent, name, WinogradConv2d.from_conv(child))
    return ae


def plain_convs(ae: AutoEncoder) -> AutoEncoder:
    """Undo `winograd_convs`, in place."""
    for parent in ae.modules():
        for name, child in parent.named_children():
            if isinstance(child, WinogradConv2d):
                with torch.device("meta"):
                    plain = nn.Conv2d(child.in_channels, child.out_channels, 3, padding=1, bias=child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
    return ae
