"""Finding a model's weights: environment variables, then a weights folder, then the Hugging Face cache/Hub.

A weights folder may be laid out like the studio app's (`flux-2-klein-9b.safetensors`, `ae.safetensors`,
optional `vae/`, `text_encoder/`, `tokenizer/` side by side) or like a diffusers model repository
(`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`); both work as they are.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from flux2.registry import ModelInfo, TextEncoderInfo

WEIGHTS_DIR_ENV = "FLUX2_WEIGHTS_DIR"
AE_ENV = "AE_MODEL_PATH"
TEXT_ENCODER_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


class WeightsNotFoundError(FileNotFoundError):
    """No weights were found locally and they could not be downloaded; the message says what to set."""


@dataclass(frozen=True)
class WeightPaths:
    transformer: Path  # a .safetensors file (original layout) or a diffusers `transformer/` folder
    ae: Path  # `ae.safetensors` or a diffusers `vae/` folder
    text_encoder: Path
    tokenizer: Path


def weights_dir_from_env() -> Path | None:
    value = os.environ.get(WEIGHTS_DIR_ENV)
    return Path(value) if value else None


def _env_path(var: str) -> Path | None:
    if not var or not os.environ.get(var):
        return None
    path = Path(os.environ[var]).expanduser()
    if not path.exists():
        raise WeightsNotFoundError(f"{var} is set to {path}, which does not exist")
    return path


def _first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.exists()), None)


def _is_folder_with(path: Path, pattern: str) -> bool:
    return path.is_dir() and any(path.glob(pattern))


def find_transformer(info: ModelInfo, weights_dir: Path | None, download: bool = True) -> Path:
    if (path := _env_path(info.env_var)) is not None:
        return path
    if weights_dir is not None:
        found = _first_existing(weights_dir / info.filename, weights_dir / "transformer")
        if found is not None:
            return found
    return _hub_file(info.repo_id, info.filename, download, f"the {info.name} transformer", info.env_var)


def find_ae(info: ModelInfo, weights_dir: Path | None, download: bool = True) -> Path:
    if (path := _env_path(AE_ENV)) is not None:
        return path
    if weights_dir is not None:
        found = _first_existing(weights_dir / info.filename_ae)
        if found is None and _is_folder_with(weights_dir / "vae", "*.safetensors"):
            found = weights_dir / "vae"
        if found is not None:
            return found
    return _hub_file(info.ae_repo_id, info.filename_ae, download, "the autoencoder", AE_ENV)


def find_text_encoder(enc: TextEncoderInfo, weights_dir: Path | None, download: bool = True) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) of the text encoder."""
    model = _env_path(enc.env_var)
    tokenizer = _env_path(enc.tokenizer_env_var)
    if model is None and weights_dir is not None and _is_folder_with(weights_dir / "text_encoder", "*.json"):
        model = weights_dir / "text_encoder"
    if tokenizer is None and weights_dir is not None and _is_folder_with(weights_dir / "tokenizer", "*"):
        tokenizer = weights_dir / "tokenizer"
    if model is None:
        model = _hub_snapshot(enc.repo_id, download, f"the text encoder {enc.repo_id}", enc.env_var)
    if tokenizer is None:
        if _is_folder_with(model, "tokenizer*") and enc.tokenizer_repo_id == enc.repo_id:
            tokenizer = model
        else:
            what = f"the tokenizer {enc.tokenizer_repo_id}"
            tokenizer = _hub_snapshot(enc.tokenizer_repo_id, download, what, enc.tokenizer_env_var)
    return model, tokenizer


def find_weights(info: ModelInfo, weights_dir: Path | str | None = None, download: bool = True) -> WeightPaths:
    """Resolve every component of a model, in the documented order."""
    if info.is_tiny:
        raise ValueError("the tiny model has no weight files: it is built from random weights")
    folder = Path(weights_dir).expanduser() if weights_dir is not None else weights_dir_from_env()
    if folder is not None and not folder.is_dir():
        raise WeightsNotFoundError(f"weights folder {folder} does not exist")
    text_encoder, tokenizer = find_text_encoder(info.text_encoder, folder, download)
    return WeightPaths(
        transformer=find_transformer(info, folder, download),
        ae=find_ae(info, folder, download),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def _not_found(what: str, env_var: str, repo_id: str, reason: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"could not find {what} ({reason}). Set {env_var} to its path, or {WEIGHTS_DIR_ENV} (or --weights-dir) "
        f"to a folder that holds it, or download it from the Hugging Face Hub repo {repo_id} "
        f"(`flux2 download`, or run once with network access)."
    )


def _hub_file(repo_id: str, filename: str, download: bool, what: str, env_var: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=not download))
    except Exception as err:  # offline, gated, missing: all become one clear message
        raise _not_found(what, env_var, repo_id, _reason(err)) from err


def _hub_snapshot(repo_id: str, download: bool, what: str, env_var: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=TEXT_ENCODER_PATTERNS, local_files_only=not download))
    except Exception as err:
        raise _not_found(what, env_var, repo_id, _reason(err)) from err


def _reason(err: Exception) -> str:
    name = type(err).__name__
    if "LocalEntryNotFound" in name or "Offline" in name or "Connect" in name:
        return "not in the local Hugging Face cache and the Hub is not reachable"
    if "Gated" in name:
        return "the Hub repository is gated: accept its licence on the Hub and log in with `hf auth login`"
    return f"{name}: {str(err).splitlines()[0] if str(err) else ''}".strip()
