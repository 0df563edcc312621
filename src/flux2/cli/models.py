"""`flux2 models`: every known model and which of its weights are on this machine; `flux2 download`: fetch them."""

import argparse
import json
import sys
from collections.abc import Collection
from pathlib import Path

from flux2.registry import CHAT_MODEL, DEFAULT_MODEL, FLUX2_MODEL_INFO, NSFW_CLASSIFIER, ModelInfo, model_info
from flux2.weights import (
    ALL_PARTS,
    WEIGHTS_DIR_ENV,
    LocalPart,
    disk_size,
    download_weights,
    local_parts,
    parts_wanted,
    resolve_weights_dir,
)

MODELS_EXAMPLES = """examples:
  flux2 models                              every model, and which of its parts are here and where
  flux2 models --weights-dir ~/weights      look in this folder too (default: $FLUX2_WEIGHTS_DIR)
  flux2 models --json                       the same as one JSON object
"""
DOWNLOAD_EXAMPLES = """examples:
  flux2 download flux.2-klein-4b                        every part, into the Hugging Face cache
  flux2 download flux.2-klein-9b --parts transformer    only the transformer
  flux2 download flux.2-klein-4b --safety classifier    also the NSFW classifier that --safety needs
  HF_ENDPOINT=https://my-mirror.example flux2 download flux.2-klein-4b

A gated repo (such as FLUX.2 [dev], which also holds the autoencoder) needs its licence accepted on the Hub
and a login with `hf auth login`. A transfer that breaks off is picked up where it stopped; stopping the
command keeps the files already fetched, and the next run fetches the rest.
"""
LABELS = {"transformer": "transformer", "ae": "autoencoder", "text_encoder": "text encoder", "tokenizer": "tokenizer"}
SIZE_UNITS = ("B", "kB", "MB", "GB", "TB")  # decimal, as the Hub shows sizes


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models", help="the models, and which of their weights are on this machine",
        description="List every model with its settings and, for each part, whether it is on this machine\n"
        "(variables, weights folder, Hugging Face cache), where, and its size. Nothing is downloaded.",
        epilog=MODELS_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    _weights_dir_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=list_models)

    p = sub.add_parser(
        "download", help="fetch a model's weights into the Hugging Face cache",
        description="Download the parts of MODEL that are not on this machine into the Hugging Face cache,\n"
        "where every flux2 command finds them.",
        epilog=DOWNLOAD_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("model", metavar="MODEL", help=f"registry name, e.g. {DEFAULT_MODEL} (see `flux2 models`)")
    p.add_argument(
        "--parts", default=",".join(ALL_PARTS), help=f"comma-separated, any of {','.join(ALL_PARTS)} (default: all)"
    )
    p.add_argument("--safety", choices=["off", "classifier", "full"], default="off",
                   help="also fetch the models this --safety mode loads")  # fmt: skip
    p.add_argument("--upsample", choices=["none", "local"], default="none",
                   help="also fetch the chat model that local prompt upsampling loads")  # fmt: skip
    p.add_argument("--nsfw-model", help="the classifier's Hub id, if not the default")
    p.add_argument("--upsample-model", help="the upsampling chat model's Hub id, if not the default")
    _weights_dir_option(p)
    p.set_defaults(handler=download)


def _weights_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights-dir", type=Path, help=f"folder holding the weights (default: ${WEIGHTS_DIR_ENV})")


# ----------------------------------------------------------------------------- flux2 models


def list_models(args: argparse.Namespace) -> int:
    folder = resolve_weights_dir(args.weights_dir)
    found = {name: local_parts(info, folder) if info.needs_files else None for name, info in FLUX2_MODEL_INFO.items()}
    if args.json:
        print(json.dumps(_models_json(folder, found), indent=2))
        return 0
    print(f"weights folder:     {folder or f'none (--weights-dir or ${WEIGHTS_DIR_ENV})'}")
    print(f"Hugging Face cache: {_hf_cache()}")
    for name, parts in found.items():
        print()
        print("\n".join(_describe_model(FLUX2_MODEL_INFO[name], parts)))
    print("\nloaded by options:")
    print("\n".join(_side_model_lines()))
    return 0


def _side_model_lines() -> list[str]:
    """The side models at their default ids: here or not (flux2.side_models)."""
    from flux2.side_models import local_side_model

    lines = []
    for model, used_by in ((NSFW_CLASSIFIER, "--safety classifier/full"), (CHAT_MODEL, "--safety full, --upsample "
                                                                           "local; [dev] uses its own")):  # fmt: skip
        path = local_side_model(model.repo_id)
        where = f"{human_size(disk_size(path))}  {path}" if path else "missing, not in the local Hugging Face cache"
        lines.append(f"  {model.repo_id} ({used_by}): {where}")
    return lines


def _describe_model(info: ModelInfo, parts: dict[str, LocalPart] | None) -> list[str]:
    default = " (default)" if info.name == DEFAULT_MODEL else ""
    settings = [info.description, info.licence, f"{info.num_steps} steps, guidance {info.guidance}"]
    about = "  " + "; ".join(filter(None, settings))
    if parts is None:
        return [f"{info.name}{default}: built in (random weights)", about]
    return [f"{info.name}{default}: {_readiness(info, parts)}", about, *_part_lines(parts)]


def _readiness(info: ModelInfo, parts: dict[str, LocalPart]) -> str:
    here = sum(part.present for part in parts.values())
    if here == len(parts):
        return "ready"
    return f"{here} of {len(parts)} parts here (`flux2 download {info.name}` fetches the rest)"


def _part_lines(parts: dict[str, LocalPart], downloaded: Collection[str] = ()) -> list[str]:
    reasons = {part.missing for part in parts.values() if part.path is None}
    if len(reasons) == 1 and not any(part.present for part in parts.values()):
        return [f"  {', '.join(LABELS[name] for name in parts)}: missing, {reasons.pop()}"]
    lines = []
    for name, part in parts.items():
        if part.path is None:
            lines.append(f"  {LABELS[name]:<13} {'missing':>9}  {part.missing}")
        else:
            note = "  (downloaded)" if name in downloaded else ""
            lines.append(f"  {LABELS[name]:<13} {human_size(disk_size(part.path)):>9}  {part.path}{note}")
    return lines


def _models_json(folder: Path | None, found: dict[str, dict[str, LocalPart] | None]) -> dict:
    models = []
    for name, parts in found.items():
        info = FLUX2_MODEL_INFO[name]
        models.append({
            "name": name, "default": name == DEFAULT_MODEL, "description": info.description,
            "licence": info.licence, "num_steps": info.num_steps, "guidance": info.guidance,
            "built_in": parts is None, "ready": parts is None or all(p.present for p in parts.values()),
            "parts": {key: _part_json(part) for key, part in (parts or {}).items()},
        })  # fmt: skip
    return {"weights_dir": str(folder) if folder else None, "hf_cache": _hf_cache(), "models": models}


def _part_json(part: LocalPart) -> dict:
    if part.path is None:
        return {"present": False, "path": None, "bytes": None, "missing": part.missing}
    return {"present": True, "path": str(part.path), "bytes": disk_size(part.path), "missing": None}


def human_size(size: int) -> str:
    value, unit = float(size), 0
    while value >= 1000 and unit < len(SIZE_UNITS) - 1:
        value, unit = value / 1000, unit + 1
    return f"{size} B" if unit == 0 else f"{value:.1f} {SIZE_UNITS[unit]}"


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


# ----------------------------------------------------------------------------- flux2 download


def download(args: argparse.Namespace) -> int:
    from flux2.side_models import download_side_models, side_models_needed

    info = model_info(args.model)
    side = side_models_needed(info, args.safety, args.upsample, args.nsfw_model, args.upsample_model)
    for name, path in download_side_models(side).items():
        print(f"{name}: {path}")
    if not info.needs_files:
        print(f"{info.name} needs no download: it is built in, with random weights (its images are noise)")
        return 0
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    wanted = parts_wanted(parts)
    folder = resolve_weights_dir(args.weights_dir)
    before = local_parts(info, folder)
    missing = [part for part in wanted if not before[part].present]
    for part in wanted:
        if before[part].present:
            print(f"{LABELS[part]}: already here, {before[part].path}", file=sys.stderr)
    if missing:
        names = ", ".join(LABELS[part] for part in missing)
        print(f"fetching {names} from the Hugging Face Hub into {_hf_cache()}", file=sys.stderr)
    download_weights(info, parts, folder)
    after = local_parts(info, folder)
    print(f"{info.name}: {_readiness(info, after)}")
    print("\n".join(_part_lines(after, downloaded=missing)))
    if missing:
        print("No environment variable is needed: flux2 finds the Hugging Face cache by itself.")
    if all(part.present for part in after.values()):
        print(f'Try: flux2 generate "a red fox in the snow" --model {info.name}')
    return 0
