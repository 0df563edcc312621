"""Reading a LoRA file of any FLUX.2 trainer into adapters keyed by our module names.

The layout is detected from the keys (`lora_layouts`): the prefix names the trainer, the module path is resolved
against our names and diffusers' names, the suffix says which factor a tensor is. What reaches the model is one
`Adapter` per module of ours, whatever the file split or swapped:
- diffusers' separate q/k/v LoRAs become one adapter on our fused `qkv` (rows [q; k; v]);
- diffusers' `norm_out.linear` is our `final_layer.adaLN_modulation.1` with its row halves swapped ([scale; shift]
  there, [shift; scale] here), so the up factor's halves are swapped back. diffusers 0.42.1 forgets this when it
  converts a BFL-named LoRA (`_convert_non_diffusers_flux2_lora_to_diffusers`), applying it to the wrong half.

Scaling (delta = scale * dW, applied as W + strength * delta):
- LoRA: scale = alpha / rank, alpha from the file's `.alpha`, else PEFT's `lora_alpha` (safetensors metadata or an
  `adapter_config.json` beside the file), else rank. PEFT's rsLoRA uses alpha / sqrt(rank).
- LoKr (LyCORIS): dW = kron(w1, w2); alpha / rank only when a factor is itself low-rank (`_a @ _b`, rank = w2_b's
  rows, else w1_b's); with both factors full LyCORIS ignores alpha (scale 1).
- LoHa (LyCORIS): dW = (w1_a @ w1_b) * (w2_a @ w2_b), scale = alpha / rank (rank = w1_b's rows).
- DoRA: a magnitude m beside any of them (`dora_scale` or PEFT's `lora_magnitude_vector`); see `Adapter`.
"""

import hashlib
import json
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from flux2.checkpoints.lora_layouts import Target, resolve, split_prefix, split_suffix


class LoraError(ValueError):
    """A LoRA file that cannot be read, or a LoRA that does not fit the model."""


@dataclass(frozen=True, eq=False)
class Adapter:
    """One module's change, scale * dW, in one of four factor forms.

    kind "lora": (down [r, in], up [out, r]); "lokr": (w1, w2) with dW = kron(w1, w2); "loha": (w1_a, w1_b, w2_a,
    w2_b); "dense": (dW,). `magnitude` makes it DoRA: W' = m * (W + scale dW) / ||W + scale dW||, the norm taken
    per output row (axis 0: PEFT's `lora_magnitude_vector` [out], LyCORIS `dora_scale` [out, 1] with wd_on_out)
    or per input column (axis 1: LyCORIS `dora_scale` [1, in] without wd_on_out).
    """

    kind: str
    tensors: tuple[Tensor, ...]
    scale: float = 1.0
    magnitude: Tensor | None = None
    magnitude_axis: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the module it fits."""
        t = self.tensors
        if self.kind == "lora":
            return t[1].shape[0], t[0].shape[1]
        if self.kind == "lokr":
            return t[0].shape[0] * t[1].shape[0], t[0].shape[1] * t[1].shape[1]
        if self.kind == "loha":
            return t[0].shape[0], t[1].shape[1]
        return tuple(t[0].shape)

    def delta(self, device: torch.device | str | None = None) -> Tensor:
        """scale * dW in float32, [out, in], computed on `device` (default: where the factors are)."""
        t = [x.to(device, torch.float32) for x in self.tensors]
        if self.kind == "lora":
            dw = t[1] @ t[0]
        elif self.kind == "lokr":
            dw = torch.kron(t[0], t[1])
        elif self.kind == "loha":
            dw = (t[0] @ t[1]) * (t[2] @ t[3])
        else:
            dw = t[0]
        return dw * self.scale


@dataclass(frozen=True, eq=False)
class Lora:
    name: str  # the file stem
    path: Path
    sha256: str  # hex digest of the file bytes
    layout: str  # "ai-toolkit" | "kohya" | "diffusers" | "fal" | "diffsynth" | "lycoris-lokr" | "lycoris-loha" | ...
    adapters: dict[str, Adapter]  # by our module name, e.g. "double_blocks.0.img_attn.qkv"
    family: str = ""  # the key naming the layout was detected from (the trainer, for LyCORIS kinds)

    @property
    def is_dora(self) -> bool:
        return any(a.magnitude is not None for a in self.adapters.values())


@dataclass(frozen=True)
class PeftConfig:
    """The alpha a PEFT file keeps outside its tensors."""

    lora_alpha: float | None = None
    use_rslora: bool = False


# ----------------------------------------------------------------------------- reading the file


def load_lora(path: str | Path) -> Lora:
    """Read a `.safetensors` LoRA of any supported layout; raises LoraError listing every key that matched nothing."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise LoraError(f"{path}: LoRA files must be .safetensors (got {path.suffix or 'no extension'})")
    data = path.read_bytes()
    try:
        sd, metadata = load_safetensors(data), _metadata(data)
    except Exception as e:  # safetensors' own error type, or a header that is not JSON
        raise LoraError(f"{path}: not a readable safetensors file ({e})") from e
    config = peft_config(metadata, path.with_name("adapter_config.json"))
    layout, family, adapters = convert(sd, config, source=path.name)
    return Lora(path.stem, path, hashlib.sha256(data).hexdigest(), layout, adapters, family)


def _metadata(data: bytes) -> dict[str, str]:
    """The safetensors header's `__metadata__` (strings only, by the format)."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


def peft_config(metadata: dict[str, str], config_file: Path) -> PeftConfig:
    """PEFT's `lora_alpha`: from diffusers' `lora_adapter_metadata` JSON, plain metadata, or adapter_config.json."""
    fields: dict = {}
    if config_file.is_file():
        fields.update(json.loads(config_file.read_text()))
    fields.update({k: v for k, v in metadata.items() if k in ("lora_alpha", "use_rslora")})
    if "lora_adapter_metadata" in metadata:  # diffusers prefixes the keys with the component: "transformer.r"
        packed = json.loads(metadata["lora_adapter_metadata"])
        fields.update({k.rsplit(".", 1)[-1]: v for k, v in packed.items()})
    alpha = fields.get("lora_alpha")
    rslora = fields.get("use_rslora") in (True, "true", "True")
    return PeftConfig(None if alpha is None else float(alpha), rslora)


# ----------------------------------------------------------------------------- converting the keys


def convert(
    sd: dict[str, Tensor], config: PeftConfig = PeftConfig(), source: str = "LoRA"
) -> tuple[str, str, dict[str, Adapter]]:
    """(layout, family, adapters by our module name) of a LoRA state dict; LoraError lists every problem."""
    groups, targets, families, unmatched = _group(sd)
    problems, placed = [], defaultdict(list)
    for path, roles in groups.items():
        try:
            placed[targets[path].module].append((targets[path], _adapter(path, dict(roles), config)))
        except LoraError as e:
            problems.append(str(e))
    adapters = {}
    for module, items in placed.items():
        try:
            adapters[module] = _merge(module, items)
        except LoraError as e:
            problems.append(str(e))
    family = _family(families, targets.values())
    layout = _layout(family, [a for items in placed.values() for _, a in items])
    if unmatched:
        problems.insert(0, f"{len(unmatched)} keys match no FLUX.2 module: {', '.join(sorted(unmatched))}")
    if not adapters and not problems:
        problems.append("no LoRA tensors in the file")
    if problems:
        raise LoraError(f"{source} (read as the {layout} layout): " + "; ".join(problems))
    return layout, family, adapters


def _group(sd: dict[str, Tensor]):
    """Tensors grouped by module path and role; the target of each path; prefix families; unmatched keys."""
    groups: dict[str, dict[str, Tensor]] = defaultdict(dict)
    targets: dict[str, Target] = {}
    families: Counter = Counter()
    unmatched = []
    for key, tensor in sd.items():
        rest, family = split_prefix(key)
        split = split_suffix(rest)
        found = resolve(split[0]) if split else []
        if len(found) != 1:
            unmatched.append(key)
            continue
        path, role = split
        groups[path][role] = tensor
        targets[path] = found[0]
        families[family] += 1
    return groups, targets, families, unmatched


def _family(families: Counter, targets) -> str:
    if families:
        family = families.most_common(1)[0][0]
        if family is not None:
            return family
    namings = {t.naming for t in targets}
    return "diffusers" if namings == {"diffusers"} else "ai-toolkit"


def _layout(family: str, adapters: list[Adapter]) -> str:
    kinds = {a.kind for a in adapters}
    for kind in ("lokr", "loha"):
        if kind in kinds:
            return f"lycoris-{kind}"
    return family


# ----------------------------------------------------------------------------- one module's tensors


def _adapter(path: str, roles: dict[str, Tensor], config: PeftConfig) -> Adapter:
    magnitude = roles.pop("magnitude", None)
    if "down" in roles or "up" in roles:
        adapter = _lora(path, roles, config)
    elif any(r.startswith("lokr_") for r in roles):
        adapter = _lokr(path, roles)
    elif any(r.startswith("hada_") for r in roles):
        adapter = _loha(path, roles)
    else:
        has = sorted(roles) + (["magnitude"] if magnitude is not None else [])
        raise LoraError(f"{path}: no LoRA, LoKr or LoHa factors, only {has}")
    if roles:
        raise LoraError(f"{path}: unexpected tensors {sorted(roles)} beside a {adapter.kind} adapter")
    if magnitude is None:
        return adapter
    return replace(adapter, magnitude=magnitude.float().flatten(), magnitude_axis=_dora_axis(path, magnitude))


def _need(path: str, roles: dict[str, Tensor], *names: str) -> list[Tensor]:
    missing = [n for n in names if n not in roles]
    if missing:
        raise LoraError(f"{path}: missing {missing} (has {sorted(roles)})")
    return [roles.pop(n) for n in names]


def _alpha(roles: dict[str, Tensor]) -> float | None:
    alpha = roles.pop("alpha", None)
    return None if alpha is None else float(alpha.float().item())


def _lora(path: str, roles: dict[str, Tensor], config: PeftConfig) -> Adapter:
    down, up = _need(path, roles, "down", "up")
    rank = down.shape[0]
    if up.shape[1] != rank:
        raise LoraError(f"{path}: down {tuple(down.shape)} and up {tuple(up.shape)} disagree on the rank")
    alpha = _alpha(roles)
    if alpha is None:
        alpha = config.lora_alpha if config.lora_alpha is not None else rank
    scale = alpha / (rank**0.5 if config.use_rslora else rank)
    return Adapter("lora", (down, up), scale)


def _factor(path: str, roles: dict[str, Tensor], name: str) -> tuple[Tensor, int | None]:
    """A LoKr factor, full or as a @ b; with the rank of the product (None when full)."""
    if name in roles:
        return roles.pop(name), None
    a, b = _need(path, roles, f"{name}_a", f"{name}_b")
    return a.float() @ b.float(), b.shape[0]


def _lokr(path: str, roles: dict[str, Tensor]) -> Adapter:
    if "lokr_t2" in roles:
        raise LoraError(f"{path}: lokr_t2 (a Tucker core, used for convolutions) is not supported: FLUX.2 is linear")
    w1, rank1 = _factor(path, roles, "lokr_w1")
    w2, rank2 = _factor(path, roles, "lokr_w2")
    rank = rank2 if rank2 is not None else rank1
    alpha = _alpha(roles)
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return Adapter("lokr", (w1, w2), scale)


def _loha(path: str, roles: dict[str, Tensor]) -> Adapter:
    if "hada_t1" in roles or "hada_t2" in roles:
        raise LoraError(f"{path}: hada_t1/hada_t2 (Tucker cores, used for convolutions) are not supported")
    w1a, w1b, w2a, w2b = _need(path, roles, "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    rank = w1b.shape[0]
    alpha = _alpha(roles)
    return Adapter("loha", (w1a, w1b, w2a, w2b), (alpha if alpha is not None else rank) / rank)


def _dora_axis(path: str, magnitude: Tensor) -> int:
    """0: one norm per output row ([out] or [out, 1]); 1: one per input column ([1, in])."""
    if magnitude.dim() == 1 or magnitude.shape[-1] == 1:
        return 0
    if magnitude.dim() == 2 and magnitude.shape[0] == 1:
        return 1
    raise LoraError(f"{path}: DoRA magnitude of shape {tuple(magnitude.shape)}; expected [out], [out, 1] or [1, in]")


# ----------------------------------------------------------------------------- placing it on our module


def swap_row_halves(w: Tensor) -> Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _swapped(adapter: Adapter) -> Adapter:
    """The adapter with its output rows' halves swapped (diffusers' [scale; shift] -> our [shift; scale])."""
    m = adapter.magnitude
    if m is not None and adapter.magnitude_axis == 0:
        m = swap_row_halves(m)
    if adapter.kind == "lora":
        down, up = adapter.tensors
        return replace(adapter, tensors=(down, swap_row_halves(up)), magnitude=m)
    return replace(adapter, kind="dense", tensors=(swap_row_halves(adapter.delta()),), scale=1.0, magnitude=m)


def _merge(module: str, items: list[tuple[Target, Adapter]]) -> Adapter:
    """One adapter for our module from the file's pieces of it (q, k, v of a fused qkv; or the whole)."""
    items = [(t, _swapped(a) if t.swap_halves else a) for t, a in items]
    parts = {t.parts for t, _ in items}
    if len(items) == 1 and parts == {1}:
        return items[0][1]
    by_part = {t.part: a for t, a in items}
    if parts != {3} or len(by_part) != len(items):
        raise LoraError(f"{module}: given more than once (as the fused module and as q/k/v, or twice)")
    return _fuse_qkv(module, [by_part.get(i) for i in range(3)])


def _fuse_qkv(module: str, pieces: list[Adapter | None]) -> Adapter:
    """q, k, v adapters (any may be absent) as one adapter on the fused [q; k; v] rows."""
    present = [a for a in pieces if a is not None]
    rows, cols = present[0].shape
    magnitude = _fused_magnitude(module, pieces)
    if all(a.kind == "lora" for a in present):
        down = torch.cat([a.tensors[0].float() for a in present])
        up = torch.zeros(3 * rows, down.shape[0])
        col = 0
        for i, a in enumerate(pieces):
            if a is not None:
                r = a.tensors[0].shape[0]
                up[i * rows : (i + 1) * rows, col : col + r] = a.tensors[1].float() * a.scale
                col += r
        return Adapter("lora", (down, up), 1.0, magnitude)
    blocks = [a.delta() if a is not None else torch.zeros(rows, cols) for a in pieces]
    return Adapter("dense", (torch.cat(blocks),), 1.0, magnitude)


def _fused_magnitude(module: str, pieces: list[Adapter | None]) -> Tensor | None:
    magnitudes = [None if a is None else a.magnitude for a in pieces]
    if all(m is None for m in magnitudes):
        return None
    if any(m is None for m in magnitudes) or any(a.magnitude_axis != 0 for a in pieces):
        raise LoraError(f"{module}: a DoRA on separate q/k/v needs all three, each normed per output row")
    return torch.cat(magnitudes)
