"""The decoder's "nearest ×2 upsample, then 3×3 conv" as one stride-2 transposed conv on the low-resolution input.

After a nearest ×2 upsample every 3×3 window holds only 2×2 distinct source pixels, and which ones depends on the
output pixel's parity: for even rows the kernel's rows (0 | 1+2) fall on source rows (i-1 | i), for odd rows
(0+1 | 2) fall on (i | i+1); the same for columns. A transposed conv with stride 2, padding 1 and a 4×4 kernel
reaches exactly those taps: output row 2i+a takes source row j through kernel row 2i+a+1-2j, so its kernel rows
are (row 2 | row 0+1 | row 1+2 | row 0) of the 3×3 kernel. Same maths, 16 instead of 36 multiply-adds per output
pixel and channel pair, and neither the 4× upsampled tensor nor an interleaving copy is made: oneDNN writes the
output in place. The three upsample convs are ~28% of the real autoencoder's decode work; on a CPU (oneDNN, fp32)
each runs 1.7-2.4× faster than upsample-then-conv, outputs agreeing to float rounding (~4e-6 of the largest value).
Measured by `benchmarks/ae_speed.py`; GPUs unmeasured.

`fold_upsample_convs(ae)` swaps the decoder's `Upsample` modules for `FoldedUpsample` ones holding the same conv
(state-dict keys unchanged; the 4×4 kernel is derived from the conv's weight and re-derived whenever it changes);
`unfold_upsample_convs(ae)` swaps them back.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2.autoencoder import AutoEncoder, Upsample, memory_format
from flux2.transforms.derived import Derived

# TAPS[k, y]: which 3×3 kernel rows add up to row k of the 4×4 transposed-conv kernel (columns alike).
TAPS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def transposed_kernel(weight: Tensor) -> Tensor:
    """[C_out, C_in, 3, 3] conv weight -> [C_in, C_out, 4, 4] transposed-conv weight, in the weight's layout."""
    taps = TAPS.to(weight)
    kernel = torch.einsum("ky,oiyx,lx->iokl", taps, weight, taps)
    return kernel.contiguous(memory_format=memory_format(weight))


def upsample_conv(x: Tensor, conv: nn.Conv2d, kernel: Tensor | None = None) -> Tensor:
    """conv(nearest_upsample_2x(x)) for a 3×3, stride 1, padding 1 conv: [B, C_in, h, w] -> [B, C_out, 2h, 2w]."""
    kernel = transposed_kernel(conv.weight) if kernel is None else kernel
    return F.conv_transpose2d(x, kernel.to(memory_format=memory_format(x)), conv.bias, stride=2, padding=1)


class FoldedUpsample(nn.Module):
    """`Upsample` (nearest ×2, then its 3×3 conv) run as one transposed conv on the low-resolution input."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        self.kernel = Derived(transposed_kernel)  # the 4×4 kernel, derived once per weight

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv(x, self.conv, self.kernel(self.conv.weight))


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
