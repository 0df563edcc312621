"""Reading checkpoints from disk in either published layout, and loading them strictly into a model.

Original (BFL) single files are the native layout; diffusers folders are converted on load.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: names the missing, unexpected or mis-shaped keys."""


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """One .safetensors file, or every shard of a folder (following a *.safetensors.index.json if present)."""
    path = Path(path)
    if path.is_file():
        return _load_file(path, device)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    shards = _shards(path)
    if not shards:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(_load_file(shard, device))
    return state


def _load_file(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    """One file; a truncated or corrupt one is a CheckpointError naming the file and what to do."""
    from safetensors import SafetensorError

    from flux2.weights import unreadable_advice

    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({err}; truncated or corrupt download? "
            f"{unreadable_advice(path)})"
        ) from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a file's header (every shard's, merged, for a folder); {} when there is none.

    Quantised files say there how their layers are quantised (ComfyUI's `_quantization_metadata`)."""
    path = Path(path)
    metadata: dict[str, str] = {}
    for shard in [path] if path.is_file() else _shards(path):
        with safe_open(str(shard), framework="pt") as f:
            metadata.update(f.metadata() or {})
    return metadata


def _shards(folder: Path) -> list[Path]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def check_state_dict(model: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    """Raise CheckpointError unless sd has exactly the model's keys with the model's shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mis_shaped = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(sd))
        if sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"{what} checkpoint does not match the model:"]
        lines += _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
        lines += _listing("shape mismatches", mis_shaped)
        raise CheckpointError("\n".join(lines))


def _listing(title: str, items: list[str], limit: int = 20) -> list[str]:
    if not items:
        return []
    more = [f"    ... and {len(items) - limit} more"] if len(items) > limit else []
    return [f"  {title} ({len(items)}):"] + [f"    {item}" for item in items[:limit]] + more


def load_strict(model: nn.Module, sd: dict[str, Tensor], what: str) -> nn.Module:
    """Assign sd's tensors into a (meta-built) model after a strict key and shape check.

    With assign=True the parameters become the checkpoint's tensors: no second copy is ever made.
    """
    check_state_dict(model, sd, what)
    model.load_state_dict(sd, strict=True, assign=True)
    return model
