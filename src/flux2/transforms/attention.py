"""Which attention kernel the transformer runs, chosen per pipeline and applied to the "sample" stage.

    attention_backend(pipe, "flash")     # or auto | math | efficient | cudnn | sage | fa3
    with attention_kernel("math"):       # the same, around any code (no pipeline)
        denoise(model, ...)

auto | math | efficient | flash | cudnn are PyTorch's own SDPA kernels, forced with
`torch.nn.attention.sdpa_kernel`. `auto` is PyTorch's default: on CUDA it picks flash, cuDNN or memory-efficient by
shape and dtype; on the CPU its fused (flash) CPU kernel or the math one. A forced kernel that cannot run the
inputs raises PyTorch's RuntimeError ("No viable backend") rather than silently falling back;
`available_kernels()` probes which ones run here. sage (SageAttention, `pip install sageattention`) and fa3
(FlashAttention-3, Hopper GPUs, built from flash-attention's `hopper/`: module `flash_attn_interface`) are other
libraries' functions, used only when importable.

How: for the stage, the function the transformer calls for attention, `flux2.model.sdpa`, is swapped for one that
runs the chosen kernel, and put back afterwards. The swap reaches the transformer only: the "sample" stage also
decodes, and the autoencoder's attention (head dim 512, fp32: no flash kernel takes it) keeps PyTorch's choice.
`sdpa_kernel` is entered inside the swapped function, per attention call (a few flag writes, nothing next to the
attention itself); torch.compile traces it into the graph, and Dynamo guards on the `sdpa` global, so a compiled
model recompiles for a new choice: choose before `warm_up`.

Not thread-safe: the swap is a module global and the SDPA flags are process-wide, so a stage must not overlap a
run with another choice in another thread (the pipeline's users serialise runs on one lock or one worker);
overlapping stages could also restore each other's state out of order.
"""

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from flux2 import model as flux2_model

SDPA_KERNELS = {
    "math": SDPBackend.MATH,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
# Optional kernels: name -> (module to import, pip package / where to get it).
LIBRARY_KERNELS = {
    "sage": ("sageattention", "sageattention (pip install sageattention)"),
    "fa3": ("flash_attn_interface", "FlashAttention-3 (flash-attention's hopper/ directory: python setup.py install)"),
}
NAMES = ("auto", *SDPA_KERNELS, *LIBRARY_KERNELS)
STAGE = "sample"  # the stage that runs the transformer


def _sage(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)  # HND = [B, heads, L, D], ours


def _fa3(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from flash_attn_interface import flash_attn_func

    out = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=False)  # it takes [B, L, heads, D]
    out = out[0] if isinstance(out, tuple) else out  # some releases also return the log-sum-exp
    return out.transpose(1, 2)


def _forced(backend: SDPBackend) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return sdpa


# name -> the function that stands in for flux2.model.sdpa
KERNEL_FUNCTIONS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    **{name: _forced(backend) for name, backend in SDPA_KERNELS.items()},
    "sage": _sage,
    "fa3": _fa3,
}


def check_name(name: str) -> None:
    """ValueError for an unknown name; ImportError naming the package for an optional kernel not installed."""
    if name not in NAMES:
        raise ValueError(f"attention backend must be one of {', '.join(NAMES)}, got {name!r}")
    if name in LIBRARY_KERNELS:
        module, package = LIBRARY_KERNELS[name]
        if importlib.util.find_spec(module) is None:
            raise ImportError(f"attention backend {name!r} needs {package}: module {module!r} is not importable")


@contextmanager
def swapped_sdpa(fn: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Iterator[None]:
    """`flux2.model.sdpa` is `fn` inside the block (process-wide: see the module docstring)."""
    previous = flux2_model.sdpa
    flux2_model.sdpa = fn
    try:
        yield
    finally:
        flux2_model.sdpa = previous


def attention_kernel(name: str):
    """A context in which the transformer's attention runs `name` (see NAMES)."""
    check_name(name)
    return nullcontext() if name == "auto" else swapped_sdpa(KERNEL_FUNCTIONS[name])


class AttentionBackend:
    """A pipeline stage hook: the "sample" stage runs with attention kernel `name`; other stages are untouched."""

    def __init__(self, name: str):
        check_name(name)
        self.name = name

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        with attention_kernel(self.name) if stage == STAGE else nullcontext():
            yield


def attention_backend(pipe, name: str) -> AttentionBackend:
    """Run `pipe`'s transformer with attention kernel `name` from now on, replacing an earlier choice. Returns
    the hook (it is in `pipe.stage_hooks`). Raises before changing anything if `name` cannot be used."""
    hook = AttentionBackend(name)
    pipe.stage_hooks[:] = [h for h in pipe.stage_hooks if not isinstance(h, AttentionBackend)] + [hook]
    return hook


def available_kernels(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """The names that run a small [1, 2, 64, 64] attention on `device` in `dtype` here (probed, not guessed)."""
    q = torch.randn(1, 2, 64, 64, device=device, dtype=dtype)
    found = []
    for name in NAMES:
        try:
            with attention_kernel(name):
                flux2_model.sdpa(q, q, q)
        except (ImportError, RuntimeError):  # not installed; "No viable backend" for this device or dtype
            continue
        found.append(name)
    return found
