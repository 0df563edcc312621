"""Test-only writer: tiny LoRA files in each trainer's layout, all from one set of known factors per module.

The expected weights come from the factors alone (W + alpha/rank * up @ down, kron, Hadamard, the DoRA formula),
never from the loader, so a layout the loader reads wrongly shows up as a wrong model output.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from flux2.checkpoints.transformer import transformer_original_to_diffusers


@dataclass
class LowRank:
    """A LoRA of one module: delta = alpha / rank * up @ down; with `magnitude`, DoRA (norm per output row)."""

    down: Tensor  # [r, in]
    up: Tensor  # [out, r]
    alpha: float
    magnitude: Tensor | None = None  # [out]

    @property
    def scale(self) -> float:
        return self.alpha / self.down.shape[0]

    def new_weight(self, w: Tensor) -> Tensor:
        v = w + self.scale * self.up @ self.down
        if self.magnitude is None:
            return v
        return self.magnitude[:, None] * v / v.norm(dim=1, keepdim=True)


@dataclass
class Kron:
    """A LoKr of one module: delta = alpha / rank * kron(w1, w2_a @ w2_b) (w2 factored: alpha applies)."""

    w1: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float

    def new_weight(self, w: Tensor) -> Tensor:
        return w + self.alpha / self.w2_b.shape[0] * torch.kron(self.w1, self.w2_a @ self.w2_b)


@dataclass
class Hadamard:
    """A LoHa of one module: delta = alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)."""

    w1_a: Tensor
    w1_b: Tensor
    w2_a: Tensor
    w2_b: Tensor
    alpha: float

    def new_weight(self, w: Tensor) -> Tensor:
        return w + self.alpha / self.w1_b.shape[0] * (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def low_rank(model: nn.Module, names, rank: int = 4, seed: int = 0, dora: bool = False) -> dict[str, LowRank]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        m = linears(model)[name]
        down = 0.2 * torch.randn(rank, m.in_features, generator=g)
        up = 0.2 * torch.randn(m.out_features, rank, generator=g)
        factors = LowRank(down, up, alpha=float(rank) / 2)
        if dora:
            norm = factors.new_weight(m.weight.detach()).norm(dim=1)
            factors.magnitude = norm * (1 + 0.3 * torch.randn(m.out_features, generator=g))
        out[name] = factors
    return out


def kron(model: nn.Module, names, seed: int = 0, f1: int = 2, rank: int = 2) -> dict[str, Kron]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        m = linears(model)[name]
        w1 = torch.randn(f1, f1, generator=g)
        w2_a = 0.2 * torch.randn(m.out_features // f1, rank, generator=g)
        w2_b = 0.2 * torch.randn(rank, m.in_features // f1, generator=g)
        out[name] = Kron(w1, w2_a, w2_b, alpha=1.0)
    return out


def hadamard(model: nn.Module, names, seed: int = 0, rank: int = 3) -> dict[str, Hadamard]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in names:
        m = linears(model)[name]
        w = [0.4 * torch.randn(*s, generator=g) for s in [(m.out_features, rank), (rank, m.in_features)] * 2]
        out[name] = Hadamard(*w, alpha=1.5)
    return out


# ----------------------------------------------------------------------------- writers, one per layout


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _diffusers(name: str, tensor: Tensor, split_rows: bool) -> dict[str, Tensor]:
    """diffusers names for our module (via the checkpoint converter); rows split/swapped, or copied (down)."""
    if split_rows:
        converted = transformer_original_to_diffusers({f"{name}.weight": tensor})
        return {k.removesuffix(".weight"): v for k, v in converted.items()}
    names = transformer_original_to_diffusers({f"{name}.weight": torch.zeros(6)})  # only its keys
    return {k.removesuffix(".weight"): tensor for k in names}


BFL_PREFIXES = {
    "ai-toolkit": "diffusion_model.",
    "bare": "",
    "comfy": "model.diffusion_model.",
    "fal": "base_model.model.",
}


def lora_state_dict(factors: dict[str, LowRank], layout: str) -> dict[str, Tensor]:
    """A LoRA in `layout`; layouts without an alpha tensor get alpha/rank folded into up, as their trainers do."""
    sd = {}
    for name, f in factors.items():
        if layout == "kohya":
            base = f"lora_unet_{_underscored(name)}"
            sd |= {
                f"{base}.lora_down.weight": f.down,
                f"{base}.lora_up.weight": f.up,
                f"{base}.alpha": torch.tensor(f.alpha),
            }
            if f.magnitude is not None:
                sd[f"{base}.dora_scale"] = f.magnitude[:, None]  # LyCORIS wd_on_out: [out, 1]
        elif layout in BFL_PREFIXES:
            prefix = {
                "ai-toolkit": "diffusion_model.",
                "bare": "",
                "comfy": "model.diffusion_model.",
                "fal": "base_model.model.",
            }[layout]
            sd |= {f"{prefix}{name}.lora_A.weight": f.down, f"{prefix}{name}.lora_B.weight": f.up * f.scale}
        elif layout == "onetrainer":  # kohya tensors over underscored diffusers names
            for k, v in _diffusers(name, f.up, split_rows=True).items():
                base = f"lora_transformer_{_underscored(k)}"
                sd |= {f"{base}.lora_down.weight": f.down, f"{base}.lora_up.weight": v}
                sd[f"{base}.alpha"] = torch.tensor(f.alpha)
        elif layout in ("diffusers", "diffsynth"):
            prefix, suffix = ("transformer.", "") if layout == "diffusers" else ("pipe.dit.", ".default")
            for k, v in _diffusers(name, f.down, split_rows=False).items():
                sd[f"{prefix}{k}.lora_A{suffix}.weight"] = v
            for k, v in _diffusers(name, f.up * f.scale, split_rows=True).items():
                sd[f"{prefix}{k}.lora_B{suffix}.weight"] = v
            if f.magnitude is not None:
                for k, v in _diffusers(name, f.magnitude, split_rows=True).items():
                    sd[f"{prefix}{k}.lora_magnitude_vector"] = v
        else:
            raise ValueError(f"unknown test layout {layout!r}")
    return sd


def kron_state_dict(factors: dict[str, Kron]) -> dict[str, Tensor]:
    """LyCORIS LoKr with kohya (underscored BFL) names."""
    sd = {}
    for name, f in factors.items():
        base = f"lora_unet_{_underscored(name)}"
        sd |= {f"{base}.lokr_w1": f.w1, f"{base}.lokr_w2_a": f.w2_a, f"{base}.lokr_w2_b": f.w2_b}
        sd[f"{base}.alpha"] = torch.tensor(f.alpha)
    return sd


def hadamard_state_dict(factors: dict[str, Hadamard]) -> dict[str, Tensor]:
    """LyCORIS LoHa with BFL names (ai-toolkit prefix)."""
    sd = {}
    for name, f in factors.items():
        base = f"diffusion_model.{name}"
        sd |= {f"{base}.hada_w1_a": f.w1_a, f"{base}.hada_w1_b": f.w1_b, f"{base}.hada_w2_a": f.w2_a}
        sd |= {f"{base}.hada_w2_b": f.w2_b, f"{base}.alpha": torch.tensor(f.alpha)}
    return sd


def write(path: Path, sd: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.clone().contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path
