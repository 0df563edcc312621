"""Tiny random-weight checkpoints written where a user puts the real ones: the studio layout (single files side
by side) and a diffusers model repository. Both hold the same weights, so both must give the same image."""

import json
from pathlib import Path

from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
from safetensors.torch import save_file
from tiny_encoders import save_tiny_qwen3

from flux2.checkpoints.autoencoder import ae_original_to_diffusers, diffusers_ae_config
from flux2.checkpoints.transformer import diffusers_transformer_config, transformer_original_to_diffusers
from flux2.registry import TINY_AE_PARAMS, TINY_PARAMS, model_info
from flux2.tiny import random_ae, random_flow_model
from flux2.tiny_text_encoders import tiny_qwen3

FLOW_SEED, AE_SEED, TEXT_SEED = 11, 12, 13


def write_studio_layout(folder: Path, model: str = "flux.2-klein-4b") -> Path:
    """`flux-2-klein-4b.safetensors`, `ae.safetensors` and `text_encoder/` (with its tokenizer) in one folder."""
    info = model_info(model)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(random_flow_model(TINY_PARAMS, seed=FLOW_SEED).state_dict(), folder / info.filename)
    save_file(random_ae(TINY_AE_PARAMS, seed=AE_SEED).state_dict(), folder / info.filename_ae)
    save_tiny_qwen3(folder / "text_encoder", seed=TEXT_SEED)
    return folder


def write_diffusers_layout(folder: Path) -> Path:
    """`model_index.json`, `transformer/`, `vae/`, `text_encoder/`, `tokenizer/` as in a diffusers Hub repo."""
    flow = random_flow_model(TINY_PARAMS, seed=FLOW_SEED)
    transformer = Flux2Transformer2DModel(**diffusers_transformer_config(TINY_PARAMS))
    transformer.load_state_dict(transformer_original_to_diffusers(flow.state_dict()))
    transformer.save_pretrained(folder / "transformer")
    vae = AutoencoderKLFlux2(**diffusers_ae_config(TINY_AE_PARAMS))
    vae.load_state_dict(ae_original_to_diffusers(random_ae(TINY_AE_PARAMS, seed=AE_SEED).state_dict()))
    vae.save_pretrained(folder / "vae")
    model, tokenizer = tiny_qwen3(seed=TEXT_SEED)
    model.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}))
    return folder
