"""The sizes of the FLUX.2 networks, and the latent geometry: plain dataclasses, importable without torch.

The registry and the request checks use them, so `flux2 --help` and a mistyped option answer before torch loads.
`flux2.model` and `flux2.autoencoder` build the networks from them.
"""

from dataclasses import dataclass

PIXELS_PER_TOKEN = 16  # side of one latent token in pixels: 8x VAE downsampling, then the 2x2 patchify


@dataclass(frozen=True)
class Flux2Params:
    """Sizes of FLUX.2 [dev]; the klein presets override them."""

    in_channels: int = 128
    context_in_dim: int = 15360  # 3 x 5120, three Mistral-Small hidden states per token
    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8  # double-stream blocks
    depth_single_blocks: int = 48
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)  # rope dims per axis (t, h, w, l)
    theta: int = 2000
    mlp_ratio: float = 3.0
    use_guidance_embed: bool = True

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(self.axes_dim))  # presets are shared: keep them immutable

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclass(frozen=True)
class Klein9BParams(Flux2Params):
    context_in_dim: int = 12288  # 3 x 4096, Qwen3-8B
    hidden_size: int = 4096
    num_heads: int = 32
    depth: int = 8
    depth_single_blocks: int = 24
    use_guidance_embed: bool = False


@dataclass(frozen=True)
class Klein4BParams(Flux2Params):
    context_in_dim: int = 7680  # 3 x 2560, Qwen3-4B
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5
    depth_single_blocks: int = 20
    use_guidance_embed: bool = False


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int = 256  # unused, kept for parity with the reference
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32  # GroupNorm groups; not a reference field (tiny test models need fewer)
    # Per-level decoder widths when the decoder is narrower than the encoder: BFL's FLUX.2 small decoder is
    # (96, 192, 384, 384) against the encoder's (128, 256, 512, 512). None: the encoder's widths.
    decoder_widths: tuple[int, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))  # presets are shared: keep them immutable
        if self.decoder_widths is not None:
            object.__setattr__(self, "decoder_widths", tuple(self.decoder_widths))

    @property
    def encoder_widths(self) -> tuple[int, ...]:
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def decoder_block_widths(self) -> tuple[int, ...]:
        return self.decoder_widths or self.encoder_widths
