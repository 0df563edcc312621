"""Regional torch.compile: the transformer's repeated blocks compiled, everything else left eager.

The blocks do nearly all the work and are all alike, so one compiled forward per block class serves every
instance: torch >= 2.5 inlines nn.Modules and passes their parameters as graph inputs, so the graph traced for
the first double block is reused by the other seven (and by any other model's). Compile time is that of one
double and one single block whatever the depth, as with diffusers' `compile_repeated_blocks`.

Shapes: the sequence dimensions (image tokens vary with the image size and the reference images, text tokens with
IP-Adapter images) are marked dynamic before every block call, so the first compilation already serves every
image size; nothing recompiles per request. `dynamic=False` compiles one static graph per size instead: that is
what CUDA graphs want (`mode="reduce-overhead"`, GPU only), for a service that runs a few fixed sizes, each warmed
up.

    compile_pipeline(pipe)                              # pipe.flow_model's blocks; the first call compiles
    warm_up(pipe, [(1024, 1024), (768, 1360)])          # ... or pay for it before the first request
    uncompile_blocks(pipe.flow_model)                   # back to the eager forwards

Choose the attention backend (flux2.transforms.attention) before warming up: the kernel picked while tracing is
part of the compiled graph.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch._dynamo
from torch import Tensor, nn

from flux2.model import DoubleStreamBlock, Flux2, SingleStreamBlock
from flux2.sampling import PIXELS_PER_TOKEN, batched_prc_img, batched_prc_txt

# The block classes compiled and, for each, the positional arguments whose length varies between requests (image
# size, reference images, IP-Adapter tokens appended to the text): argument index -> its sequence dimension.
SEQUENCE_DIMS: dict[type[nn.Module], dict[int, int]] = {
    DoubleStreamBlock: {0: 1, 1: 1, 2: 2},  # img [B, L_img, H]; txt [B, L_txt, H]; pe [B, 1, L_txt + L_img, D/2, 2, 2]
    SingleStreamBlock: {0: 1, 1: 2},  # x [B, L_txt + L_img, H]; pe
}
WARM_UP_TXT_LEN = 512  # text tokens of a bare-model warm-up: the text encoders pad every prompt to 512
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileSettings:
    mode: str | None = None
    dynamic: bool | None = None  # None: sequence dims dynamic, the rest as torch decides; True: all; False: none
    fullgraph: bool = False
    backend: str | Callable = "inductor"  # "eager" / "aot_eager" trace without generating code (tests, debugging)


class CompiledForward:
    """A block's `forward`, set as an instance attribute that shadows the class's: marks the sequence dimensions
    dynamic (in plain Python, outside the compiled region) and calls the class's shared compiled forward."""

    def __init__(self, block: nn.Module, compiled: Callable, settings: CompileSettings):
        self.block, self.compiled, self.settings = block, compiled, settings
        self.sequence_dims = SEQUENCE_DIMS[type(block)] if settings.dynamic is None else {}

    def __call__(self, *args, **kwargs):
        for index, dim in self.sequence_dims.items():
            if index < len(args) and isinstance(args[index], Tensor):
                torch._dynamo.maybe_mark_dynamic(args[index], dim)  # "maybe": no error if a graph needs it fixed
        return self.compiled(self.block, *args, **kwargs)


def blocks(model: Flux2) -> list[nn.Module]:
    """The block modules themselves, also under a block transform (whose lists yield wrapped calls)."""
    return [*model.double_blocks.children(), *model.single_blocks.children()]


def compiled_settings(model: Flux2) -> CompileSettings | None:
    """The settings the blocks are compiled with, or None when they run eagerly."""
    found = {f.settings if isinstance(f := block.__dict__.get("forward"), CompiledForward) else None
             for block in blocks(model)}  # fmt: skip
    return found.pop() if len(found) == 1 else None


def compile_blocks(
    model: Flux2,
    *,
    mode: str | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    backend: str | Callable = "inductor",
) -> Flux2:
    """Compile every double and single block of `model` in place (one compiled forward per block class) and
    return it. Compilation happens at the first forward of each block class. Calling it again with the same
    settings changes nothing; with other settings the blocks are recompiled with those."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    settings = CompileSettings(mode, dynamic, fullgraph, backend)
    if compiled_settings(model) == settings:
        return model
    uncompile_blocks(model)
    compiled = {
        cls: torch.compile(cls.forward, mode=mode, dynamic=dynamic, fullgraph=fullgraph, backend=backend)
        for cls in SEQUENCE_DIMS
    }
    for block in blocks(model):
        block.forward = CompiledForward(block, compiled[type(block)], settings)
    return model


def uncompile_blocks(model: Flux2) -> Flux2:
    """Back to the eager forwards: the instance attributes go and the class's forward shows through again.
    Dynamo's caches are process-wide and are left alone (recompiling later reuses them)."""
    for block in blocks(model):
        if isinstance(block.__dict__.get("forward"), CompiledForward):
            del block.forward
    return model


def compile_pipeline(pipe, **settings) -> None:
    """`compile_blocks(pipe.flow_model, **settings)`: the one model of a pipeline worth compiling."""
    compile_blocks(pipe.flow_model, **settings)


# ----------------------------------------------------------------------------- warm-up


@torch.inference_mode()  # as the pipeline runs: inference tensors and no-grad tensors would compile apart
def warm_up(target, sizes: Iterable[tuple[int, int]], *, txt_len: int = WARM_UP_TXT_LEN) -> None:
    """Compile before the first request: one run per (width, height) in pixels.

    A pipeline runs a real generation per size (one step where the model allows), so every stage hook, the CFG
    batch and the text length are those of later requests. A bare model runs one forward on random inputs with
    `txt_len` text tokens. With the default dynamic sequence one size is enough for all; with `dynamic=False`
    warm up every size you serve.
    """
    if isinstance(target, nn.Module):
        for width, height in sizes:
            target(*random_inputs(target, width, height, txt_len))
        return
    one_step = {} if "num_steps" in target.info.fixed_params else {"num_steps": 1}
    for width, height in sizes:
        target.generate("warm-up", width=width, height=height, seed=0, upsample=False, **one_step)


def random_inputs(model: Flux2, width: int, height: int, txt_len: int) -> tuple[Tensor, ...]:
    """Arguments of one `model(...)` call for a width x height image and txt_len text tokens, on the model's
    device and in its dtype: (img, img_ids, timesteps, ctx, ctx_ids, guidance or None)."""
    p, weight = model.params, next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, p.in_channels, height // PIXELS_PER_TOKEN, width // PIXELS_PER_TOKEN, generator=gen)
    img, img_ids = batched_prc_img(latents)
    ctx, ctx_ids = batched_prc_txt(torch.randn(1, txt_len, p.context_in_dim, generator=gen))
    to = dict(device=weight.device, dtype=weight.dtype)
    guidance = torch.full((1,), 4.0, **to) if p.use_guidance_embed else None
    timestep = torch.full((1,), 0.5, **to)
    return img.to(**to), img_ids.to(weight.device), timestep, ctx.to(**to), ctx_ids.to(weight.device), guidance
