"""LoRA files as a pipeline uses them: each file read once, the request's set applied unfused for that request
(switching costs no reload and no copy of the base weights), a set fused for speed until unfused, and what was
applied written into every image's record.

    pipe.generate("a fox", loras=[("style.safetensors", 0.8)])   # this request only
    pipe.fuse_loras([("style.safetensors", 0.8)])                 # every request, at full speed
    pipe.unfuse_loras()                                           # the weights exactly as loaded
"""

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from flux2.checkpoints.lora import Lora, load_lora
from flux2.request import LoraChoice
from flux2.transforms.lora import active_loras, fuse_loras, set_loras, unfuse_loras

MAX_CACHED_FILES = 8  # LoRA files kept read between requests (a few MB to a few hundred MB each)


@dataclass
class LoraFiles:
    """The LoRAs of one transformer: files read (by path, size and modification time) and the fused set."""

    model: nn.Module
    fused: list[tuple[Lora, float]] = field(default_factory=list)
    _read: dict[tuple[str, int, int], Lora] = field(default_factory=dict)

    def use(self, choices: tuple[LoraChoice, ...]) -> list[tuple[Lora, float]]:
        """Apply `choices` unfused (on top of the fused set), replacing the previous request's; returns them."""
        wanted = [(self.read(choice.path), float(choice.strength)) for choice in choices]
        if _identity(wanted) != _identity(active_loras(self.model)):
            set_loras(self.model, wanted)
        return wanted

    def fuse(self, choices: tuple[LoraChoice, ...]) -> None:
        """Merge `choices` into the weights (any earlier fused set is unfused first)."""
        self.unfuse()
        set_loras(self.model, [])
        wanted = [(self.read(choice.path), float(choice.strength)) for choice in choices]
        fuse_loras(self.model, wanted)
        self.fused = wanted

    def unfuse(self) -> None:
        if self.fused:
            unfuse_loras(self.model)
            self.fused = []

    def read(self, path: str) -> Lora:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
        stat = file.stat()
        key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._read:
            if len(self._read) >= MAX_CACHED_FILES:
                self._read.pop(next(iter(self._read)))
            self._read[key] = load_lora(file)
        return self._read[key]

    def record(self, applied: list[tuple[Lora, float]]) -> tuple[dict, ...]:
        """What an image's record says: each LoRA's file name, content hash and strength, fused ones first."""
        fused = [_entry(lora, strength, fused=True) for lora, strength in self.fused]
        return tuple(fused + [_entry(lora, strength, fused=False) for lora, strength in applied])


def _identity(loras: list[tuple[Lora, float]]) -> list[tuple[str, float]]:
    return [(lora.sha256, strength) for lora, strength in loras]


def _entry(lora: Lora, strength: float, fused: bool) -> dict:
    return {"name": Path(lora.path).name, "sha256": lora.sha256, "strength": strength, "fused": fused}
