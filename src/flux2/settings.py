"""Generation settings checked against a model: shared by the pipeline and the tools, cheap to import, so that
a typo fails before any weights load."""

import math

from flux2.registry import ModelInfo
from flux2.sampling import PIXELS_PER_TOKEN

MAX_SEED = 2**63 - 1  # seeds are torch.Generator seeds: a signed 64-bit integer


def check_settings(
    info: ModelInfo,
    *,
    width: int | None = None,
    height: int | None = None,
    num_steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    negative_prompt: str | None = None,
    true_cfg_scale: float | None = None,
) -> None:
    """Check generation settings against a model before anything runs (None: the model's default).

    The CLI calls this before loading weights, so a typo costs nothing; `generate` calls it on every request.
    """
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or value < PIXELS_PER_TOKEN or value % PIXELS_PER_TOKEN):
            raise ValueError(f"{name} must be a positive multiple of {PIXELS_PER_TOKEN} px, got {value!r}")
    if num_steps is not None and (not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    num_steps = info.num_steps if num_steps is None else num_steps
    guidance = info.guidance if guidance is None else guidance
    info.check_fixed(num_steps, guidance)
    if guidance != info.guidance and not info.uses_cfg and not info.params.use_guidance_embed:
        raise ValueError(
            f"{info.name} has no guidance (no guidance embedding and no CFG): leave guidance at {info.guidance}; "
            "for true CFG use true_cfg_scale"
        )
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if true_cfg_scale is not None:
        if info.uses_cfg:
            raise ValueError(f"{info.name} runs true CFG already: its scale is `guidance`, not true_cfg_scale")
        if not isinstance(true_cfg_scale, int | float) or not 1 < true_cfg_scale < math.inf:
            raise ValueError(f"true_cfg_scale must be a number > 1 (1 is the plain run), got {true_cfg_scale!r}")
    if negative_prompt and not info.uses_cfg and true_cfg_scale is None:
        raise ValueError(
            f"{info.name} does not use a negative prompt: only CFG does (the klein base models always; other "
            "models with true_cfg_scale, at twice the cost)"
        )
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed <= MAX_SEED - num_images):
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED - num_images}], got {seed!r}")
