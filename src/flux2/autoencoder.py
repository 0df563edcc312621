"""The FLUX.2 autoencoder: a KL-VAE (×8 downsampling, 32 latent channels) plus a 2×2 patchify and a
BatchNorm-statistics normalisation, giving [B, 128, H/16, W/16] latents for the transformer.

`state_dict()` keys are the original (BFL) checkpoint keys. The diffusers layout is converted in
`flux2.checkpoints.autoencoder`.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# The sizes live in flux2.params (torch-free, for the CLI's checks); this module's public names include them.
from flux2.params import AutoEncoderParams as AutoEncoderParams

GROUPNORM_EPS = 1e-6
# The reference's latent BatchNorm: eps 1e-4 (not torch's default 1e-5), momentum 0.1, no affine.
BN_EPS = 1e-4
BN_MOMENTUM = 0.1
PATCH = 2  # latents are patchified 2×2 before normalisation


def norm_swish(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """swish(norm(x)). The norm's output is a fresh tensor, so F.silu may overwrite it: one kernel instead of
    x·sigmoid(x)'s two, and no new activation-sized buffer. In place only without autograd (SiLU's backward
    needs its input)."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS, affine=True)


def conv3x3(c_in: int, c_out: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=padding)


def patchify(z: Tensor) -> Tensor:
    """[B, C, H, W] -> [B, 4C, H/2, W/2]; new channel index = c·4 + pi·2 + pj for offset (pi, pj)."""
    return rearrange(z, "b c (h pi) (w pj) -> b (c pi pj) h w", pi=PATCH, pj=PATCH)


def unpatchify(z: Tensor) -> Tensor:
    """Inverse of `patchify`: [B, 4C, h, w] -> [B, C, 2h, 2w]."""
    return rearrange(z, "b (c pi pj) h w -> b c (h pi) (w pj)", pi=PATCH, pj=PATCH)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = conv3x3(c_in, c_out)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = conv3x3(c_out, c_out)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # One expression, so conv1's output is freed once norm2 has read it, before conv2 allocates its own: three
        # activations live at a time instead of four (-512 MiB at the real decoder's 1024² level).
        h = norm_swish(self.norm2, self.conv1(norm_swish(self.norm1, x)))
        return self.conv2(h).add_(self.nin_shortcut(x))  # conv2's output is not needed by autograd: add in place


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions; q/k/v/proj_out are 1×1 convs (the checkpoint's shapes).

    The 1×1 convs run as linears on a [B, H·W, C] view so that q/k/v reach SDPA contiguous: strided q/k/v
    (a rearranged NCHW conv output) send SDPA to its math kernel, which builds the whole [H·W, H·W] score
    matrix (+2.3 GiB and 7× the time at 1024² with the real AE).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x).flatten(2).transpose(1, 2)  # [B, H·W, C]; a free view when x is channels-last
        q, k, v = (conv1x1_as_linear(f, hn).unsqueeze(1) for f in (self.q, self.k, self.v))  # [B, 1, H·W, C]
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # scale 1/√C
        out = conv1x1_as_linear(self.proj_out, a).transpose(1, 2).reshape(b, c, h, w)  # channels-last strides
        return x + out.contiguous(memory_format=memory_format(x))


def conv1x1_as_linear(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A 1×1 conv applied to [B, L, C_in] -> [B, L, C_out], contiguous."""
    return F.linear(x, conv.weight.flatten(1), conv.bias)


def memory_format(x: Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric zero padding (right and bottom only), as in the reference.
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnet_stack(c_in: int, c_out: int, n: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n))


class DownLevel(nn.Module):
    """One encoder resolution: `block.{j}` resnets, then `downsample` (absent on the last level)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, downsample: bool):
        super().__init__()
        self.block = resnet_stack(c_in, c_out, n_blocks, groups)
        self.downsample = Downsample(c_out) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.downsample(x)


class UpLevel(nn.Module):
    """One decoder resolution: `block.{j}` resnets, then `upsample` (absent on level 0)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, upsample: bool):
        super().__init__()
        self.block = resnet_stack(c_in, c_out, n_blocks, groups)
        self.upsample = Upsample(c_out) if upsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return self.upsample(x)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """[B, 3, H, W] -> moments [B, 2·z, H/8, W/8] (mean, then logvar)."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = list(p.encoder_widths)
        c_ins = [p.ch, *widths[:-1]]
        self.conv_in = conv3x3(p.in_channels, p.ch)
        self.down = nn.ModuleList(
            DownLevel(c_in, c_out, p.num_res_blocks, p.norm_groups, downsample=i != len(widths) - 1)
            for i, (c_in, c_out) in enumerate(zip(c_ins, widths, strict=True))
        )
        self.mid = MidBlock(widths[-1], p.norm_groups)
        self.norm_out = group_norm(widths[-1], p.norm_groups)
        self.conv_out = conv3x3(widths[-1], 2 * p.z_channels)
        # FLUX.2 keeps quant_conv inside the encoder (FLUX.1 had it at the top level).
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.quant_conv(self.conv_out(norm_swish(self.norm_out, h)))


class Decoder(nn.Module):
    """[B, z, h, w] -> image [B, 3, 8h, 8w]. `up.{i}` is level i; they run from the last to `up.0`."""

    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = list(p.decoder_block_widths)
        c_ins = [*widths[1:], widths[-1]]  # level i takes the output of level i + 1
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, kernel_size=1)
        self.conv_in = conv3x3(p.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1], p.norm_groups)
        self.up = nn.ModuleList(
            UpLevel(c_in, c_out, p.num_res_blocks + 1, p.norm_groups, upsample=i != 0)
            for i, (c_in, c_out) in enumerate(zip(c_ins, widths, strict=True))
        )
        self.norm_out = group_norm(widths[0], p.norm_groups)
        self.conv_out = conv3x3(widths[0], p.out_ch)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        h = h.to(next(self.up.parameters()).dtype)  # as the reference: the up levels set the dtype
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(norm_swish(self.norm_out, h))


class AutoEncoder(nn.Module):
    """`encode`: image in [-1, 1] -> normalised latents [B, 4·z, H/16, W/16]; `decode` inverts it.

    Runs in the dtype of its weights (the reference builds it in fp32 and loads with `assign=True`).
    """

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        # Only the running statistics are used (see `normalize`); it never updates them.
        self.bn = nn.BatchNorm2d(
            PATCH * PATCH * params.z_channels,
            eps=BN_EPS,
            momentum=BN_MOMENTUM,
            affine=False,
            track_running_stats=True,
        )

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's ×8 downsampling times the 2×2 patch (16)."""
        return 2 ** (len(self.params.ch_mult) - 1) * PATCH

    def train(self, mode: bool = True) -> "AutoEncoder":
        super().train(mode)
        self.bn.eval()  # the reference forces eval: batch statistics are never used
        return self

    def normalize(self, z: Tensor) -> Tensor:
        """Patchified latents -> transformer space: (z - running_mean) / sqrt(running_var + eps)."""
        mean, std = self._bn_mean_std()
        return (z - mean) / std

    def inv_normalize(self, z: Tensor) -> Tensor:
        mean, std = self._bn_mean_std()
        return z * std + mean

    def _bn_mean_std(self) -> tuple[Tensor, Tensor]:
        mean = self.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps)
        return mean, std

    def encode(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] in [-1, 1], H and W multiples of 16 -> [B, 4·z, H/16, W/16] (posterior mean)."""
        self._check_image(x)
        moments = self.encoder(x.to(self.encoder.conv_in.weight.dtype))
        mean = moments[:, : self.params.z_channels]  # no sampling: the logvar half is unused
        return self.normalize(patchify(mean))

    def decode(self, z: Tensor) -> Tensor:
        """z: [B, 4·z, h, w] normalised latents -> image [B, 3, 16h, 16w] in about [-1, 1] (not clamped)."""
        self._check_latents(z)
        z = unpatchify(self.inv_normalize(z))
        return self.decoder(z.to(self.decoder.post_quant_conv.weight.dtype))

    def _check_image(self, x: Tensor) -> None:
        c, m = self.params.in_channels, self.size_multiple
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"encode: expected an image batch [B, {c}, H, W], got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % m or w % m:
            raise ValueError(
                f"encode: image height and width must be multiples of {m} "
                f"(×{m // PATCH} VAE downsampling, then {PATCH}×{PATCH} patchify); got {h}×{w}"
            )

    def _check_latents(self, z: Tensor) -> None:
        c = PATCH * PATCH * self.params.z_channels
        if z.ndim != 4 or z.shape[1] != c:
            raise ValueError(f"decode: expected latents [B, {c}, h, w], got shape {tuple(z.shape)}")


def channels_last(ae: AutoEncoder) -> AutoEncoder:
    """Store the conv weights channels-last (NHWC), in place; the convs then run, and hand on, NHWC activations.

    For CPU (oneDNN convs; `benchmarks/ae_speed.py`, 2-core CPU, fp32): decode ~12-17% faster than NCHW and a
    ~19% lower peak (real width, 512²). GPUs unmeasured. Same maths as NCHW: the outputs agree to float rounding.
    Undo with `ae.to(memory_format=torch.contiguous_format)`.
    """
    return ae.to(memory_format=torch.channels_last)
