"""Loading models: the reference's `load_flow_model`, `load_ae`, `load_text_encoder`, plus device choice.

Weights are found by `flux2.weights` and read by `flux2.checkpoints`; models are built on the meta device and
the checkpoint tensors are assigned, so a model never exists twice in memory.
"""

import json
import logging
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from flux2.autoencoder import AutoEncoder, AutoEncoderParams
from flux2.checkpoints import CheckpointError, load_strict, read_safetensors, read_safetensors_metadata
from flux2.checkpoints.autoencoder import (
    ae_diffusers_to_original,
    ae_params_from_state_dict,
    is_diffusers_ae,
    with_decoder,
)
from flux2.checkpoints.gguf import is_gguf, read_gguf
from flux2.checkpoints.quantized import TransformerCheckpoint, is_quantized, split_quantized
from flux2.checkpoints.transformer import (
    is_diffusers_transformer,
    params_from_state_dict,
    strip_original_prefix,
    transformer_diffusers_to_original,
)
from flux2.model import Flux2, Flux2Params
from flux2.registry import FLUX2_MODEL_INFO, ModelInfo, RandomWeights, model_info
from flux2.transforms.quantized import QuantizedLinear, quantize_linears
from flux2.weights import find_ae, find_text_encoder, find_transformer, resolve_weights_dir

__all__ = [
    "FLUX2_MODEL_INFO",
    "default_device",
    "default_dtype",
    "detect_model_name",
    "load_ae",
    "load_flow_model",
    "load_text_encoder",
    "read_transformer_checkpoint",
    "read_transformer_state_dict",
]

log = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when present, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(info: ModelInfo, device: torch.device) -> torch.dtype:
    """bf16 (the checkpoints' dtype) for real models; the entry's own dtype for random weights (fp32 for `tiny`);
    fp32 on Apple MPS, where bf16 runs have given NaN / black images (the studio app's finding)."""
    if (random := _random_weights(info)) is not None:
        return random.torch_dtype
    return torch.float32 if device.type == "mps" else torch.bfloat16


def _random_weights(info: ModelInfo | None) -> RandomWeights | None:
    """The entry's random-weight source, or None when its weights are files (or there is no entry)."""
    return info.weights if info is not None and isinstance(info.weights, RandomWeights) else None


# ----------------------------------------------------------------------------- transformer


def read_transformer_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> TransformerCheckpoint:
    """An original single file, a diffusers folder, a quantised safetensors file (float8 / nvfp4, ComfyUI and BFL
    layouts) or a GGUF file, in the original (BFL) key layout; quantised Linear weights are kept quantised."""
    if is_gguf(path):
        checkpoint = read_gguf(path, device)
        return TransformerCheckpoint(strip_original_prefix(checkpoint.dense), _strip_layers(checkpoint.quantized))
    sd = read_safetensors(path, device)
    metadata = read_safetensors_metadata(path)
    if not is_quantized(sd, metadata):
        return TransformerCheckpoint(transformer_diffusers_to_original(sd) if is_diffusers_transformer(sd) else
                                     strip_original_prefix(sd))  # fmt: skip
    if is_diffusers_transformer(sd):
        raise CheckpointError(
            f"{path}: quantised diffusers-layout transformers are not supported (their q/k/v would need re-fusing "
            "across scales); use an original-layout (BFL / ComfyUI) quantised file"
        )
    return split_quantized(strip_original_prefix(sd), metadata)


def _strip_layers(layers: dict) -> dict:
    """GGUF layer names carry the same `model.diffusion_model.` prefix as keys do in some exports."""
    stripped = strip_original_prefix({f"{name}.weight": weight for name, weight in layers.items()})
    return {key.removesuffix(".weight"): weight for key, weight in stripped.items()}


def read_transformer_state_dict(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """Every transformer weight as a dense tensor in the original (BFL) key layout; quantised weights are
    dequantised to `dtype` (plain files come back exactly as stored)."""
    checkpoint = read_transformer_checkpoint(path, device)
    dense = {f"{name}.weight": QuantizedLinear(w).dense_weight(dtype) for name, w in checkpoint.quantized.items()}
    return {**checkpoint.dense, **dense}


def detect_model_name(params: Flux2Params) -> str | None:
    """The first registry name with this architecture (None if none). Shapes cannot tell the base and KV
    variants from the distilled model they share an architecture with: pass a name to get those."""
    for name, info in FLUX2_MODEL_INFO.items():
        if info.needs_files and asdict(info.params) == asdict(params):
            return name
    return None


def load_flow_model(
    name: str | None = None,
    debug_mode: bool = False,
    device: str | torch.device | None = None,
    *,
    path: str | Path | None = None,
    weights_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    dequantize: bool = False,
) -> Flux2:
    """Build the transformer and load its weights (strict keys; architecture from the registry or shapes).

    With no name, `path` is required and the architecture is read from the tensor shapes. `debug_mode` (as in
    the reference) builds one block of each kind with random weights and loads nothing. Quantised files (float8,
    nvfp4, GGUF) keep their Linear weights quantised as `flux2.transforms.quantized.QuantizedLinear` unless
    `dequantize` asks for a plain dense model (in `dtype`, bf16 when None). `dtype` casts only the dense tensors
    of a quantised model.
    """
    device = torch.device(device) if device is not None else default_device()
    if name is None and path is None:
        raise ValueError("load_flow_model needs a model name or a checkpoint path")
    info = model_info(name) if name is not None else None
    if (random := _random_weights(info)) is not None:
        return _random_flow_model(info.params, device, dtype or random.torch_dtype, random.seed)
    if debug_mode:
        if info is None:
            raise ValueError("debug_mode needs a model name (it builds that architecture with random weights)")
        small = replace(info.params, depth=1, depth_single_blocks=1)
        return _random_flow_model(small, device, dtype or torch.bfloat16)
    if path is None:
        path = find_transformer(info, resolve_weights_dir(weights_dir))
    log.info("Loading %s for the FLUX.2 weights", path)
    checkpoint = read_transformer_checkpoint(path, device)
    params = params_from_state_dict(checkpoint.logical_state_dict())
    if info is None:
        log.info("architecture read from the tensor shapes matches %s", detect_model_name(params) or "no preset")
    else:
        _warn_if_not_preset(path, info.name, "transformer", params, info.params)
    with torch.device("meta"):
        model = Flux2(params)
    model = _load_transformer(model, checkpoint, dequantize, dtype)
    return model.to(device=device, dtype=dtype) if dtype is not None else model


def _load_transformer(model: Flux2, checkpoint: TransformerCheckpoint, dequantize: bool, dtype) -> Flux2:
    """Quantised layers become QuantizedLinear (or, with dequantize, dense weights in dtype or bf16); then every
    tensor is checked and assigned strictly."""
    if dequantize:
        dense = {f"{n}.weight": QuantizedLinear(w).dense_weight(dtype or torch.bfloat16)
                 for n, w in checkpoint.quantized.items()}  # fmt: skip
        return load_strict(model, {**checkpoint.dense, **dense}, "transformer").eval()
    expected = model.state_dict()
    unknown = sorted(name for name in checkpoint.quantized if f"{name}.weight" not in expected)
    if unknown:
        raise CheckpointError(f"transformer checkpoint has quantised layers the model does not have: {unknown[:20]}")
    quantize_linears(model, checkpoint.quantized)
    buffers = {f"{n}.{b}": t for n, w in checkpoint.quantized.items() for b, t in w.tensors.items()}
    return load_strict(model, {**checkpoint.dense, **buffers}, "transformer").eval()


def _warn_if_not_preset(path, name: str, part: str, found, preset) -> None:
    """The architecture is read from the checkpoint, so any size loads; a surprise is still worth a word."""
    differences = [
        f"{key} {value} (preset {preset_value})"
        for (key, value), preset_value in zip(asdict(found).items(), asdict(preset).values(), strict=True)
        if value != preset_value
    ]
    if differences:
        log.warning(
            "the %s at %s is not the %s architecture (%s): loading it as its shapes say; if this is not the file "
            "you meant, check its path", part, path, name, ", ".join(differences)
        )  # fmt: skip


def _random_flow_model(params: Flux2Params, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Flux2:
    from flux2.tiny import random_flow_model

    return random_flow_model(params, seed).to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------- autoencoder


def read_ae_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    sd = read_safetensors(path, device)
    return ae_diffusers_to_original(sd) if is_diffusers_ae(sd) else sd


def _vae_norm_groups(path: str | Path) -> int:
    """GroupNorm's group count is not in the weights: a diffusers vae/ folder's config.json says it, and a single
    file is FLUX's 32."""
    config = Path(path) / "config.json"
    if config.is_file():
        return int(json.loads(config.read_text()).get("norm_num_groups", AutoEncoderParams.norm_groups))
    return AutoEncoderParams.norm_groups


def load_ae(
    name: str = "flux.2-dev",
    device: str | torch.device | None = None,
    *,
    path: str | Path | None = None,
    weights_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    params: AutoEncoderParams | None = None,
    decoder_path: str | Path | None = None,
) -> AutoEncoder:
    """The FLUX.2 autoencoder from `ae.safetensors` or a diffusers `vae/` folder; fp32 unless dtype is given.

    `decoder_path` swaps in another decoder, such as BFL's FLUX.2 small decoder (narrower, faster, a little less
    detail): a decoder-only file or a whole autoencoder file whose decoder is taken. Its widths are read from the
    shapes."""
    device = torch.device(device) if device is not None else default_device()
    info = model_info(name)
    if (random := _random_weights(info)) is not None and path is None:
        from flux2.tiny import random_ae

        ae = random_ae(info.ae_params, random.seed).to(device=device, dtype=dtype or random.torch_dtype).eval()
        if decoder_path is None:
            return ae
        sd, params, dtype = ae.state_dict(), None, dtype or random.torch_dtype
    else:
        path = path if path is not None else find_ae(info, resolve_weights_dir(weights_dir))
        log.info("Loading %s for the AutoEncoder weights", path)
        sd = read_ae_state_dict(path, device)
    if decoder_path is not None:
        log.info("Loading %s for the AutoEncoder's decoder", decoder_path)
        sd = with_decoder(sd, read_safetensors(decoder_path, device))
        params = None  # its widths are the new decoder's
    if params is None:
        groups = _vae_norm_groups(path) if path is not None else info.ae_params.norm_groups
        params = replace(ae_params_from_state_dict(sd), norm_groups=groups)
        if decoder_path is None:
            _warn_if_not_preset(path, info.name, "autoencoder", params, info.ae_params)
    with torch.device("meta"):
        ae = AutoEncoder(params)
    ae = load_strict(ae, sd, "autoencoder").eval()
    return ae.to(device=device, dtype=dtype or torch.float32)


# ----------------------------------------------------------------------------- text encoder


def load_text_encoder(
    name: str,
    device: str | torch.device | None = None,
    *,
    path: str | Path | None = None,
    tokenizer_path: str | Path | None = None,
    weights_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
):
    """The model's text encoder: Qwen3 for [klein], Mistral-Small-3.2 for [dev], a tiny Qwen3 for `tiny`."""
    from flux2.text_encoder import Mistral3SmallEmbedder, Qwen3Embedder

    device = torch.device(device) if device is not None else default_device()
    info = model_info(name)
    if (random := _random_weights(info)) is not None:
        return _random_text_encoder(info, random, device, dtype or random.torch_dtype)
    if path is None:
        path, tokenizer_path = find_text_encoder(info.text_encoder, resolve_weights_dir(weights_dir))
    model_path, tokenizer_path = path, tokenizer_path or path
    dtype = dtype or torch.bfloat16
    log.info("Loading %s for the text encoder weights", model_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        if info.text_encoder.kind == "mistral3":
            return Mistral3SmallEmbedder(model_path, device, processor=tokenizer_path, dtype=dtype).eval()
        return Qwen3Embedder(model_path, device, tokenizer=tokenizer_path, dtype=dtype).eval()


def _random_text_encoder(info: ModelInfo, random: RandomWeights, device: torch.device, dtype: torch.dtype):
    """The text encoder of a random-weight entry; only the tiny Qwen3 exists with random weights (a random 4B or
    24B encoder would cost what the real one does and say nothing)."""
    from flux2.text_encoder import Qwen3Embedder
    from flux2.tiny_text_encoders import tiny_qwen3

    if info.text_encoder.kind != "tiny":
        raise ValueError(
            f"{info.name} has random weights, but its {info.text_encoder.kind} text encoder cannot be built from "
            f"random weights: only the 'tiny' text encoder can"
        )
    model, tokenizer = tiny_qwen3(random.seed)
    return Qwen3Embedder(model, device, tokenizer=tokenizer, dtype=dtype).eval()
