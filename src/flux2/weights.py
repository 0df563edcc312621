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
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"]
# transformers-format shards only: Mistral repos also hold a `consolidated.safetensors` copy of the same weights.
TEXT_ENCODER_PATTERNS = [*TOKENIZER_PATTERNS, "model*.safetensors"]


class WeightsNotFoundError(FileNotFoundError):
    """No weights were found locally and they could not be downloaded; the message says what to set."""


ALL_PARTS = ("transformer", "ae", "text_encoder")


@dataclass(frozen=True)
class WeightPaths:
    """Where each part lives; None for a part that was not asked for."""

    transformer: Path | None  # a .safetensors file (original layout) or a diffusers `transformer/` folder
    ae: Path | None  # `ae.safetensors` or a diffusers `vae/` folder
    text_encoder: Path | None
    tokenizer: Path | None


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
    what = f"the {info.name} transformer ({info.filename} or transformer/)"
    return _hub_file(info.repo_id, info.filename, download, what, info.env_var)


def find_ae(info: ModelInfo, weights_dir: Path | None, download: bool = True) -> Path:
    if (path := _env_path(AE_ENV)) is not None:
        return path
    if weights_dir is not None:
        found = _first_existing(weights_dir / info.filename_ae)
        if found is None and _is_folder_with(weights_dir / "vae", "*.safetensors"):
            found = weights_dir / "vae"
        if found is not None:
            return found
    return _hub_file(
        info.ae_repo_id, info.filename_ae, download, f"the autoencoder ({info.filename_ae} or vae/)", AE_ENV
    )


def find_text_encoder(enc: TextEncoderInfo, weights_dir: Path | None, download: bool = True) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) of the text encoder."""
    model = _env_path(enc.env_var)
    tokenizer = _env_path(enc.tokenizer_env_var)
    if model is None and weights_dir is not None and _is_folder_with(weights_dir / "text_encoder", "*.json"):
        model = weights_dir / "text_encoder"
    if tokenizer is None and weights_dir is not None and _is_folder_with(weights_dir / "tokenizer", "*"):
        tokenizer = weights_dir / "tokenizer"
    if model is None:
        what = f"the text encoder {enc.repo_id} (text_encoder/)"
        model = _hub_snapshot(enc.repo_id, TEXT_ENCODER_PATTERNS, download, what, enc.env_var)
    if tokenizer is None:
        if _is_folder_with(model, "tokenizer*") and enc.tokenizer_repo_id == enc.repo_id:
            tokenizer = model
        else:
            what = f"the tokenizer {enc.tokenizer_repo_id} (tokenizer/)"
            tokenizer = _hub_snapshot(enc.tokenizer_repo_id, TOKENIZER_PATTERNS, download, what, enc.tokenizer_env_var)
    return model, tokenizer


def resolve_weights_dir(weights_dir: Path | str | None) -> Path | None:
    """The weights folder given, else $FLUX2_WEIGHTS_DIR; one that does not exist is an error, not ignored."""
    folder = Path(weights_dir).expanduser() if weights_dir is not None else weights_dir_from_env()
    if folder is not None and not folder.is_dir():
        source = "--weights-dir" if weights_dir is not None else WEIGHTS_DIR_ENV
        raise WeightsNotFoundError(f"weights folder {folder} ({source}) does not exist")
    return folder


def find_weights(
    info: ModelInfo, weights_dir: Path | str | None = None, download: bool = True, parts: tuple[str, ...] = ALL_PARTS
) -> WeightPaths:
    """Resolve every component of a model, in the documented order.

    Everything is first looked up locally; only then are the missing parts downloaded, transformer first
    (the gated repos), so nothing large is fetched before an unavailable part is known. Every part that cannot
    be found is named in one error.
    """
    if info.is_tiny:
        raise ValueError("the tiny model has no weight files: it is built from random weights")
    folder = resolve_weights_dir(weights_dir)
    finders = {
        "transformer": lambda dl: find_transformer(info, folder, dl),
        "ae": lambda dl: find_ae(info, folder, dl),
        "text_encoder": lambda dl: find_text_encoder(info.text_encoder, folder, dl),
    }
    finders = {part: finders[part] for part in parts}
    found, errors = {}, {}
    for allow_download in [False, True] if download else [False]:
        for part in [p for p in finders if p not in found]:
            try:
                found[part] = finders[part](allow_download)
                errors.pop(part, None)
            except WeightsNotFoundError as err:
                errors[part] = str(err)
    if errors:
        raise WeightsNotFoundError("\n".join(errors.values()))
    text_encoder, tokenizer = found.get("text_encoder", (None, None))
    return WeightPaths(found.get("transformer"), found.get("ae"), text_encoder, tokenizer)


def _not_found(what: str, env_var: str, repo_id: str, reason: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"could not find {what}: {reason}. Set {env_var} to its path, or {WEIGHTS_DIR_ENV} (or --weights-dir) "
        f"to a folder that holds it, or download the Hugging Face Hub repo {repo_id} "
        f"(`hf download {repo_id}`, or run once with network access)."
    )


def _hub_file(repo_id: str, filename: str, download: bool, what: str, env_var: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=not download))
    except Exception as err:  # offline, gated, missing: all become one clear message
        raise _not_found(what, env_var, repo_id, _reason(err)) from err


def _hub_snapshot(repo_id: str, patterns: list[str], download: bool, what: str, env_var: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=not download))
    except Exception as err:
        raise _not_found(what, env_var, repo_id, _reason(err)) from err


def _reason(err: Exception) -> str:
    name = type(err).__name__
    if "LocalEntryNotFound" in name or "Offline" in name or "Connect" in name:
        return "not in the local Hugging Face cache and the Hub is not reachable"
    if "Gated" in name:
        return "the Hub repository is gated: accept its licence on the Hub and log in with `hf auth login`"
    return f"{name}: {str(err).splitlines()[0] if str(err) else ''}".strip()
