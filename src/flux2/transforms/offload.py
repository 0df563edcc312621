"""CPU offload: a pipeline's models live on the CPU and visit the device only for the stages that run them.

While a model visits the device its CPU parameters and buffers are kept, so sending it back costs no copy: they
are put back, the very same objects, and the device copies are freed. The weights never change during
inference, so the CPU tensors are still exact.

    pipe = Flux2Pipeline("flux.2-dev")      # or Flux2Pipeline(..., cpu_offload=True)
    cpu_offload(pipe)
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# The pipeline's stages and the models each one runs (attribute names on the pipeline).
STAGE_MODELS = {
    "encode_text": ("text_encoder",),
    "encode_images": ("ae",),
    "sample": ("flow_model", "ae"),  # denoise, then decode, image after image
}
HOME = torch.device("cpu")
MODELS = tuple(dict.fromkeys(name for names in STAGE_MODELS.values() for name in names))


class CPUOffload:
    """A pipeline stage hook: the stage's models on `device` for the stage, on the CPU otherwise."""

    def __init__(self, pipe, device: torch.device, parts: tuple[str, ...] = MODELS):
        self.pipe, self.device, self.parts = pipe, torch.device(device), parts

    def models(self, stage: str) -> list[nn.Module]:
        return [getattr(self.pipe, name) for name in STAGE_MODELS.get(stage, ()) if name in self.parts]

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        placed = [visit(model, self.device) for model in self.models(stage)]
        try:
            yield
        finally:
            for tensors in placed:
                send_home(tensors)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def cpu_offload(pipe, device: str | torch.device | None = None, parts: tuple[str, ...] = MODELS) -> CPUOffload:
    """Move the pipeline's models (or only `parts`, e.g. ("text_encoder",): it runs once per new prompt) to the
    CPU and have every stage bring the ones it runs to `device` (default: the pipeline's device) for its
    duration. Returns the hook (it is also in `pipe.stage_hooks`)."""
    if unknown := sorted(set(parts) - set(MODELS)):
        raise ValueError(f"cpu_offload parts must be among {', '.join(MODELS)}, got {', '.join(unknown)}")
    hook = CPUOffload(pipe, device if device is not None else pipe.device, tuple(parts))
    for name in parts:
        getattr(pipe, name).to(HOME)
    pipe.stage_hooks.append(hook)
    return hook


Placement = list[tuple[dict, str, Tensor]]  # (a module's _parameters or _buffers, name, the tensor at home)


def visit(model: nn.Module, device: torch.device) -> Placement:
    """Give `model` copies of its tensors on `device`, keeping the CPU ones (the same objects) to go back to."""
    home: Placement = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            home += [(table, name, tensor) for name, tensor in table.items() if tensor is not None]
    for table, name, tensor in home:
        moved = tensor.to(device, non_blocking=True)
        table[name] = nn.Parameter(moved, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else moved
    return home


def send_home(home: Placement) -> None:
    """Put every parameter and buffer back as it was; the device copies are then free."""
    for table, name, tensor in home:
        table[name] = tensor
