"""The decoder's "nearest ×2 upsample, then 3×3 conv" computed on the low-resolution input.

After a nearest ×2 upsample every 3×3 window holds only 2×2 distinct source pixels, and which ones depends on the
output pixel's parity (a, b): for even rows the kernel's rows (0 | 1+2) fall on source rows (i-1 | i), for odd
rows (0+1 | 2) fall on (i | i+1); the same for columns. So the four parities are four 2×2 convs of the source with
row/column sums of the 3×3 kernel, run as one conv with 4·C_out outputs and interleaved. Same maths, 16 instead of
36 multiply-adds per output pixel and channel pair, and the 4× upsampled tensor is never made: the three upsample
convs are ~28% of the real autoencoder's decode work, and each runs ~1.8× faster on a CPU (oneDNN, fp32; outputs
agree to float rounding, ~2e-6 of the largest value). Measured by `benchmarks/ae_speed.py`; GPUs unmeasured.

`fold_upsample_convs(ae)` swaps the decoder's `Upsample` modules for `FoldedUpsample` ones holding the same conv
(state-dict keys unchanged; the folded kernel is made from the current weights at every call);
`unfold_upsample_convs(ae)` swaps them back.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2.autoencoder import AutoEncoder, Upsample

# FOLD[parity, tap, kernel row]: which 3×3 kernel rows add up to each of the two taps, for even and odd outputs.
FOLD = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def folded_kernels(weight: Tensor) -> Tensor:
    """[C_out, C_in, 3, 3] -> [4·C_out, C_in, 2, 2], output groups ordered by parity (row, column)."""
    fold = FOLD.to(weight)
    kernels = torch.einsum("ary,oiyx,bcx->aboirc", fold, weight, fold)
    return kernels.reshape(4 * weight.shape[0], weight.shape[1], 2, 2)


def upsample_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(nearest_upsample_2x(x)) for a 3×3, stride 1, padding 1 conv; channels-last out when x is."""
    b, _, h, w = x.shape
    c_out = conv.out_channels
    weight = folded_kernels(conv.weight)
    bias = conv.bias.repeat(4) if conv.bias is not None else None
    parts = F.conv2d(F.pad(x, (1, 1, 1, 1)), weight.contiguous(memory_format=_format(x)), bias)  # [B, 4C, h+1, w+1]
    out = x.new_empty(b, h, 2, w, 2, c_out)  # NHWC storage of [B, C, 2h, 2w]
    for row in range(2):
        for col in range(2):
            group = parts[:, (2 * row + col) * c_out : (2 * row + col + 1) * c_out]
            out[:, :, row, :, col, :] = group[:, :, row : row + h, col : col + w].permute(0, 2, 3, 1)
    out = out.view(b, 2 * h, 2 * w, c_out).permute(0, 3, 1, 2)
    return out if _format(x) == torch.channels_last else out.contiguous()


def _format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


class FoldedUpsample(nn.Module):
    """`Upsample` (nearest ×2, then its 3×3 conv) run on the low-resolution input."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(x, self.conv)


def fold_upsample_convs(ae: AutoEncoder) -> AutoEncoder:
    """Swap the decoder's upsample modules for folded ones, in place."""
    for level in ae.decoder.up:
        if isinstance(level.upsample, Upsample):
            level.upsample = FoldedUpsample(level.upsample.conv)
    return ae


def unfold_upsample_convs(ae: AutoEncoder) -> AutoEncoder:
    """Undo `fold_upsample_convs`, in place."""
    for level in ae.decoder.up:
        if isinstance(level.upsample, FoldedUpsample):
            conv = level.upsample.conv
            with torch.device("meta"):  # a shell: its own conv is replaced at once
                plain = Upsample(conv.in_channels)
            plain.conv = conv
            level.upsample = plain
    return ae
