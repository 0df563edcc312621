"""LoRAs on a built `Flux2`: unfused (a forward hook per targeted linear) or fused into the weights.

    set_loras(model, [(load_lora("style.safetensors"), 0.8)])   # unfused; weights and state_dict() untouched
    set_loras(model, [])                                          # the base model again, exactly
    fuse_loras(model, loras); unfuse_loras(model)                 # merged for speed; restored bit-exactly

Several LoRAs add, each change taken against the base weight W:
    W_total = W + sum_i strength_i * C_i,   C_i = scale * dW_i            (LoRA, LoKr, LoHa)
                                            C_i = W_dora_i - W            (DoRA: W_dora = m (W + scale dW) / ||.||)
so a DoRA at strength 1 is its formula exactly, at 0 the base, in between on the straight line; its norm is taken
of its own W + scale dW, never of the other LoRAs'. Deltas are computed in float32 and applied in the activation's
dtype. A linear replaced by a weight-only quantised module (no `.weight` Parameter) gives W through its
`dense_weight(dtype)`; such modules take unfused LoRAs only.

A fused set and an unfused set can be active together: set_loras on a fused model applies on top of the fused
weights (they are its W). Fusing while unfused LoRAs are active raises rather than folding them in (clear them with
set_loras(model, []), or pass them to fuse_loras), so what is fused is always exactly one fuse_loras call's set.
"""

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flux2.checkpoints.lora import Adapter, Lora, LoraError
from flux2.checkpoints.lora_layouts import OUTPUT_IS_HIDDEN
from flux2.registry import FLUX2_MODEL_INFO

# Plain attributes on the model (not modules, parameters or buffers: state_dict() keeps its keys).
UNFUSED_ATTR = "_flux2_loras"
FUSED_ATTR = "_flux2_fused_loras"


@dataclass
class _Unfused:
    loras: list[tuple[Lora, float]]
    hooks: list


@dataclass
class _Fused:
    loras: list[tuple[Lora, float]]
    originals: dict[str, Tensor]  # the touched weights as they were, on the CPU


def active_loras(model: nn.Module) -> list[tuple[Lora, float]]:
    """The LoRAs applied unfused (set_loras), with their strengths."""
    state = model.__dict__.get(UNFUSED_ATTR)
    return list(state.loras) if state else []


def fused_loras(model: nn.Module) -> list[tuple[Lora, float]]:
    """The LoRAs merged into the weights (fuse_loras), with their strengths."""
    state = model.__dict__.get(FUSED_ATTR)
    return list(state.loras) if state else []


def set_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> None:
    """Apply these LoRAs unfused, replacing the unfused set; [] removes them all. Checks everything first.

    On a model with fused LoRAs they apply on top: the fused weights are their base W."""
    plan = check_loras(model, loras)
    _remove_hooks(model)
    if not plan:
        return
    modules = dict(model.named_modules())
    hooks = [modules[name].register_forward_hook(_Hook(modules[name], items)) for name, items in plan.items()]
    model.__dict__[UNFUSED_ATTR] = _Unfused(list(loras), hooks)


def _remove_hooks(model: nn.Module) -> None:
    state = model.__dict__.pop(UNFUSED_ATTR, None)
    for hook in state.hooks if state else []:
        hook.remove()


# ----------------------------------------------------------------------------- checking against the model


def check_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> dict[str, list[tuple[Adapter, float]]]:
    """The (adapter, strength) pairs per module name; LoraError naming every misfit of every LoRA."""
    modules = dict(model.named_modules())
    plan: dict[str, list[tuple[Adapter, float]]] = defaultdict(list)
    problems = []
    for lora, strength in loras:
        if not math.isfinite(strength):
            problems.append(f"LoRA {lora.name}: strength must be a finite number (got {strength})")
        misfits = _misfits(model, modules, lora)
        problems += [f"LoRA {lora.name} ({lora.layout}): {m}" for m in misfits]
        for name, adapter in lora.adapters.items():
            plan[name].append((adapter, float(strength)))
    if problems:
        raise LoraError("; ".join(problems))
    return dict(plan)


def _misfits(model: nn.Module, modules: dict[str, nn.Module], lora: Lora) -> list[str]:
    problems, wrong_shape, hiddens = [], [], set()
    own_hidden = model.params.hidden_size
    if any(n.startswith("guidance_in.") for n in lora.adapters) and "guidance_in" not in modules:
        problems.append(
            "guidance_in.*: this LoRA was trained on a model with a guidance embedder (FLUX.2 [dev]); "
            f"{variant(own_hidden)} has none"
        )
    for name, adapter in lora.adapters.items():
        module = modules.get(name)
        if module is None:
            if not name.startswith("guidance_in."):
                problems.append(f"{name}: the model has no such module")
        elif not hasattr(module, "in_features"):
            problems.append(f"{name}: a {type(module).__name__}, not a linear layer")
        elif adapter.shape != (module.out_features, module.in_features):
            out, inp = adapter.shape
            wrong_shape.append(f"{name} {out}x{inp} (model: {module.out_features}x{module.in_features})")
            hiddens.add(_hidden_size(name, adapter))
    hiddens.discard(own_hidden)
    if len(hiddens) == 1:
        h = hiddens.pop()
        problems.append(
            f"this LoRA is for a model with hidden size {h} ({variant(h)}); "
            f"the loaded model has {own_hidden} ({variant(own_hidden)})"
        )
    elif wrong_shape:
        problems.append("shapes do not fit: " + ", ".join(wrong_shape))
    return problems


def _hidden_size(name: str, adapter: Adapter) -> int:
    out, inp = adapter.shape
    return out if OUTPUT_IS_HIDDEN.fullmatch(name) else inp


def variant(hidden_size: int) -> str:
    """The first registered model of this hidden size."""
    names = [info.name for info in FLUX2_MODEL_INFO.values() if info.params.hidden_size == hidden_size]
    return names[0] if names else "no published FLUX.2 model"


# ----------------------------------------------------------------------------- the maths


def dense_weight(module: nn.Module, dtype: torch.dtype | None = None) -> Tensor:
    """W of a plain linear, or of a weight-only quantised one (its `dense_weight()`: its `weight` is packed)."""
    w = module.dense_weight(dtype=dtype) if hasattr(module, "dense_weight") else module.weight
    return w if dtype is None else w.to(dtype)


def dora_factor(adapter: Adapter, w32: Tensor) -> Tensor:
    """m / ||W + scale dW||: [out, 1] (norm per output row) or [1, in] (per input column), float32."""
    v = w32 + adapter.delta(w32.device)
    axis = adapter.magnitude_axis
    norm = v.norm(dim=1 - axis, keepdim=True)
    m = adapter.magnitude.to(w32.device)
    return (m[:, None] if axis == 0 else m[None, :]) / norm


def weight_change(adapter: Adapter, w32: Tensor) -> Tensor:
    """C = the change of W at strength 1 (float32): scale dW, or W_dora - W."""
    delta = adapter.delta(w32.device)
    if adapter.magnitude is None:
        return delta
    return dora_factor(adapter, w32) * (w32 + delta) - w32


class _Term:
    """One adapter at one strength on one module: its factors, scaled in float32 on the module's device."""

    def __init__(self, module: nn.Module, adapter: Adapter, strength: float):
        w = dense_weight(module).detach()
        device = w.device
        self.kind, self.strength, self.dora = adapter.kind, strength, None
        outer = 1.0 if adapter.magnitude is not None else strength  # DoRA: the strength applies after the norm
        gain = adapter.scale * outer
        t = [x.to(device, torch.float32) for x in adapter.tensors]
        if adapter.kind == "lora":
            self.factors = (t[0], t[1] * gain)
        elif adapter.kind == "lokr":
            self.factors = (t[0] * gain, t[1])
        else:
            self.factors = (adapter.delta(device) * outer,)
        if adapter.magnitude is not None:
            self.dora = (adapter.magnitude_axis, dora_factor(adapter, w.float()).flatten())
        # Kept in the weight's dtype (a dense delta is as large as W); other activation dtypes get a cached cast.
        self.factors = tuple(f.to(w.dtype) if w.is_floating_point() else f for f in self.factors)
        self._cast: dict[tuple, tuple[Tensor, ...]] = {}

    def _factors(self, x: Tensor) -> tuple[Tensor, ...]:
        """The factors (and DoRA's factor last) in x's dtype on x's device: a model offloaded to the CPU between
        stages runs on another device than the one set_loras saw."""
        key = (x.dtype, x.device)
        if key not in self._cast:
            extra = () if self.dora is None else (self.dora[1],)
            self._cast[key] = tuple(f.to(x.device, x.dtype) for f in self.factors + extra)
        return self._cast[key]

    def delta_out(self, x: Tensor) -> Tensor:
        """x @ dW^T (scaled), without materialising a LoRA's or LoKr's dW."""
        f = self._factors(x)
        if self.kind == "lora":
            return (x @ f[0].T) @ f[1].T
        if self.kind == "lokr":  # kron(w1, w2) x = vec(w1 X w2^T) with X = x as [n1, n2]
            y = torch.einsum("ij,...jk,lk->...il", f[0], x.unflatten(-1, (f[0].shape[1], f[1].shape[1])), f[1])
            return y.flatten(-2)
        return x @ f[0].T

    def __call__(self, module: nn.Module, x: Tensor, base: Tensor) -> Tensor:
        """This term's change of the module's output `base` = x W^T."""
        if self.dora is None:
            return self.delta_out(x)
        axis, c = self.dora[0], self._factors(x)[-1]
        if axis == 0:  # W' = c (W + dW) row-wise
            new = c * (base + self.delta_out(x))
        else:  # W' = (W + dW) c column-wise: scale the input
            xc = x * c
            new = F.linear(xc, dense_weight(module, x.dtype)) + self.delta_out(xc)
        return self.strength * (new - base)


class _Hook:
    """Forward hook: the module's output plus every term's change."""

    def __init__(self, module: nn.Module, items: list[tuple[Adapter, float]]):
        self.terms = [_Term(module, adapter, strength) for adapter, strength in items]

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        return output + sum(term(module, x, output) for term in self.terms)


# ----------------------------------------------------------------------------- fused


def fuse_loras(model: nn.Module, loras: Sequence[tuple[Lora, float]]) -> None:
    """Merge these LoRAs into the weights (replacing a fused set); the touched weights are kept on the CPU."""
    if active_loras(model):
        raise LoraError("unfused LoRAs are active: clear them with set_loras(model, []) or pass them to fuse_loras")
    unfuse_loras(model)
    plan = check_loras(model, loras)
    modules = dict(model.named_modules())
    quantised = [n for n in plan if not _plain(modules[n])]
    if quantised:
        raise LoraError(f"cannot fuse into modules without a plain weight (quantised?): {quantised}; use set_loras")
    originals = {}
    with torch.no_grad():
        for name, items in plan.items():
            w = modules[name].weight
            originals[name] = w.detach().to("cpu", copy=True)
            w32 = w.detach().float()
            change = sum(strength * weight_change(adapter, w32) for adapter, strength in items)
            w.copy_((w32 + change).to(w.dtype))
    if originals:
        model.__dict__[FUSED_ATTR] = _Fused(list(loras), originals)


def _plain(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), nn.Parameter) and not hasattr(module, "dense_weight")


def unfuse_loras(model: nn.Module) -> None:
    """Put back the weights fuse_loras changed, bit for bit (a no-op when nothing is fused). Unfused LoRAs stay
    active, re-prepared against the restored weights (a DoRA's norm depends on W)."""
    state = model.__dict__.pop(FUSED_ATTR, None)
    if state is None:
        return
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, original in state.originals.items():
            modules[name].weight.copy_(original)
    if unfused := active_loras(model):
        set_loras(model, unfused)
