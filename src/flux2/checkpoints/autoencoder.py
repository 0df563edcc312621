"""Autoencoder key mapping: original (BFL `ae.safetensors`) <-> diffusers `AutoencoderKLFlux2`.

The layout is data: `AE_KEY_MAP` pairs key templates with placeholders. Everything that is not a rename
is a small named function below it:
- the mid-block attention q/k/v/proj_out are 1×1 convs [C, C, 1, 1] in BFL and Linear [C, C] in diffusers;
- the decoder levels are numbered in opposite orders (BFL `up.i` is diffusers `up_blocks.K-1-i`);
- quant_conv / post_quant_conv sit inside BFL's encoder / decoder and at the top level in diffusers.
Both directions are pure renames and reshapes, so a round trip is bit-exact.
"""

import re
from collections.abc import Callable, Mapping

from torch import Tensor

from flux2.autoencoder import AutoEncoderParams

# Placeholders in the key templates, with what they match. `u` is a decoder level, renumbered on the way.
_PLACEHOLDERS = {
    "s": r"encoder|decoder",
    "i": r"\d+",
    "j": r"\d+",
    "u": r"\d+",
    "r": r"norm1|conv1|norm2|conv2",  # ResnetBlock layers whose name is the same in both layouts
    "qkv": r"q|k|v",
    "p": r"weight|bias",
    "stat": r"running_mean|running_var|num_batches_tracked",  # the latent BatchNorm has no affine params
}

# (original key, diffusers key)
AE_KEY_MAP: list[tuple[str, str]] = [
    ("{s}.conv_in.{p}", "{s}.conv_in.{p}"),
    ("{s}.conv_out.{p}", "{s}.conv_out.{p}"),
    ("{s}.norm_out.{p}", "{s}.conv_norm_out.{p}"),
    ("encoder.quant_conv.{p}", "quant_conv.{p}"),
    ("decoder.post_quant_conv.{p}", "post_quant_conv.{p}"),
    ("encoder.down.{i}.block.{j}.{r}.{p}", "encoder.down_blocks.{i}.resnets.{j}.{r}.{p}"),
    ("encoder.down.{i}.block.{j}.nin_shortcut.{p}", "encoder.down_blocks.{i}.resnets.{j}.conv_shortcut.{p}"),
    ("encoder.down.{i}.downsample.conv.{p}", "encoder.down_blocks.{i}.downsamplers.0.conv.{p}"),
    ("decoder.up.{u}.block.{j}.{r}.{p}", "decoder.up_blocks.{u}.resnets.{j}.{r}.{p}"),
    ("decoder.up.{u}.block.{j}.nin_shortcut.{p}", "decoder.up_blocks.{u}.resnets.{j}.conv_shortcut.{p}"),
    ("decoder.up.{u}.upsample.conv.{p}", "decoder.up_blocks.{u}.upsamplers.0.conv.{p}"),
    ("{s}.mid.block_1.{r}.{p}", "{s}.mid_block.resnets.0.{r}.{p}"),
    ("{s}.mid.block_2.{r}.{p}", "{s}.mid_block.resnets.1.{r}.{p}"),
    ("{s}.mid.attn_1.norm.{p}", "{s}.mid_block.attentions.0.group_norm.{p}"),
    ("{s}.mid.attn_1.{qkv}.{p}", "{s}.mid_block.attentions.0.to_{qkv}.{p}"),
    ("{s}.mid.attn_1.proj_out.{p}", "{s}.mid_block.attentions.0.to_out.0.{p}"),
    ("bn.{stat}", "bn.{stat}"),
]
# The rows whose weights are 1×1 convs [C, C, 1, 1] in BFL and Linear [C, C] in diffusers.
_ATTN_PROJECTIONS = {"{s}.mid.attn_1.{qkv}.{p}", "{s}.mid.attn_1.proj_out.{p}"}

# Prefixes found only in the diffusers layout.
_DIFFUSERS_MARKERS = ("encoder.down_blocks.", "decoder.up_blocks.", "quant_conv.", "post_quant_conv.")


def _template_regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ..., literal
    body = "".join(
        re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})" for n, part in enumerate(parts)
    )
    return re.compile(rf"^{body}$")


_Rule = tuple[re.Pattern[str], str, bool]  # (source key pattern, target key template, is_linear)
_ORIGINAL_RULES: list[_Rule] = [(_template_regex(o), d, o in _ATTN_PROJECTIONS) for o, d in AE_KEY_MAP]
_DIFFUSERS_RULES: list[_Rule] = [(_template_regex(d), o, o in _ATTN_PROJECTIONS) for o, d in AE_KEY_MAP]


def conv1x1_to_linear(key: str, w: Tensor) -> Tensor:
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ValueError(f"{key}: expected a 1×1 conv weight [C, C, 1, 1], got {tuple(w.shape)}")
    return w.flatten(1)


def linear_to_conv1x1(key: str, w: Tensor) -> Tensor:
    if w.ndim != 2:
        raise ValueError(f"{key}: expected a Linear weight [C, C], got {tuple(w.shape)}")
    return w[:, :, None, None]


def _num_up_levels(sd: Mapping[str, Tensor], level_prefix: str) -> int:
    """K, the number of decoder levels: 1 + the largest level index among keys under `level_prefix`."""
    levels = [int(k[len(level_prefix) :].split(".", 1)[0]) for k in sd if k.startswith(level_prefix)]
    return max(levels, default=-1) + 1


def _convert(
    sd: Mapping[str, Tensor],
    rules: list[_Rule],
    num_up: int,
    reshape: Callable[[str, Tensor], Tensor],
    direction: str,
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        for pattern, target, is_linear in rules:
            m = pattern.match(key)
            if m is None:
                continue
            fields = m.groupdict()
            if fields.get("u") is not None:
                fields["u"] = str(num_up - 1 - int(fields["u"]))  # the level order is reversed
            new_key = target.format(**fields)
            if new_key in out:
                raise ValueError(f"{direction}: two keys map to {new_key!r} (the second is {key!r})")
            out[new_key] = reshape(key, value) if is_linear and fields["p"] == "weight" else value
            break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{direction}: {len(unknown)} unknown autoencoder key(s): {sorted(unknown)}")
    return out


def ae_original_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """BFL autoencoder state dict -> diffusers `AutoencoderKLFlux2` state dict (same tensors, renamed)."""
    num_up = _num_up_levels(sd, "decoder.up.")
    return _convert(sd, _ORIGINAL_RULES, num_up, conv1x1_to_linear, "original -> diffusers")


def ae_diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers `AutoencoderKLFlux2` state dict -> BFL autoencoder state dict (same tensors, renamed)."""
    num_up = _num_up_levels(sd, "decoder.up_blocks.")
    return _convert(sd, _DIFFUSERS_RULES, num_up, linear_to_conv1x1, "diffusers -> original")


def is_diffusers_ae(sd: Mapping[str, Tensor]) -> bool:
    """True if the keys are in the diffusers layout; False means they are not (e.g. the BFL layout)."""
    return any(k.startswith(_DIFFUSERS_MARKERS) for k in sd)


def diffusers_ae_config(params: AutoEncoderParams) -> dict:
    """`AutoencoderKLFlux2` config of the same architecture; both add one resnet per decoder level."""
    config = dict(
        block_out_channels=params.encoder_widths,
        layers_per_block=params.num_res_blocks,
        latent_channels=params.z_channels,
        norm_num_groups=params.norm_groups,
    )
    if params.decoder_widths is not None:  # the small decoder (diffusers >= 0.37)
        config["decoder_block_out_channels"] = params.decoder_widths
    return config


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    """How many numbered children `prefix.N.` the state dict holds."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for key in sd if (m := pattern.match(key))}
    return max(indices) + 1 if indices else 0


def with_decoder(sd: Mapping[str, Tensor], decoder_file: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`sd` with its decoder taken from another original-layout file: a whole autoencoder (its `decoder.*` keys,
    as in BFL's `full_encoder_small_decoder.safetensors`) or a decoder alone, whose keys lack the `decoder.`
    prefix (BFL's `small_decoder.safetensors`)."""
    if any(key.startswith("decoder.") for key in decoder_file):
        decoder = {key: value for key, value in decoder_file.items() if key.startswith("decoder.")}
    else:
        decoder = {f"decoder.{key}": value for key, value in decoder_file.items()}
    return {key: value for key, value in sd.items() if not key.startswith("decoder.")} | decoder


def ae_params_from_state_dict(sd: Mapping[str, Tensor]) -> AutoEncoderParams:
    """Architecture of an original-layout autoencoder state dict, read from its tensor shapes.

    GroupNorm's group count is not in the weights: it is FLUX's 32, which every channel count here must divide.
    """
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise ValueError("not a FLUX.2 autoencoder checkpoint: missing encoder.conv_in / decoder.conv_in")
    ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
    levels = _count(sd, "encoder.down")
    ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    decoder_widths = tuple(sd[f"decoder.up.{i}.block.0.conv1.weight"].shape[0] for i in range(_count(sd, "decoder.up")))
    return AutoEncoderParams(
        in_channels=in_channels,
        ch=ch,
        out_ch=sd["decoder.conv_out.weight"].shape[0],
        ch_mult=ch_mult,
        num_res_blocks=_count(sd, "encoder.down.0.block"),
        z_channels=sd["decoder.conv_in.weight"].shape[1],
        # a narrower decoder (the FLUX.2 small decoder) is recorded; the usual one is the encoder's widths
        decoder_widths=None if decoder_widths == tuple(ch * m for m in ch_mult) else decoder_widths,
    )
