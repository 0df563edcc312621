"""Token packing, position ids, reference-image preparation, the timestep schedule and the Euler loops.

Position ids have four int64 axes (t, h, w, l): text token j is (0, 0, 0, j), target latent cell (y, x) is
(0, y, x, 0), and reference k (0-based) uses t = 10 + 10 k over its own latent grid.
"""

import math
from collections.abc import Callable

import torch
from einops import rearrange
from PIL import Image
from torch import Tensor

from flux2.images import cap_pixels, image_to_tensor
from flux2.params import PIXELS_PER_TOKEN

# Reference-image pixel caps of the reference code: 2024**2 (sic, not 2048**2) for a single reference,
# 1024**2 for each of several.
SINGLE_REF_MAX_PIXELS = 2024**2
MULTI_REF_MAX_PIXELS = 1024**2
REF_MIN_SIDE = 64
REF_MAX_ASPECT = 8.0
REF_TIME_SCALE = 10  # reference k gets t = REF_TIME_SCALE * (k + 1)

# A callback sees (step index, number of steps) before each step; it may raise to cancel the run.
StepCallback = Callable[[int, int], None]


# ----------------------------------------------------------------------------- packing and ids


def _coord(t_coord: Tensor | int | None, device: torch.device) -> Tensor:
    if t_coord is None:
        return torch.zeros(1, dtype=torch.long, device=device)
    return torch.as_tensor(t_coord, dtype=torch.long, device=device).reshape(-1)


def prc_txt(x: Tensor, t_coord: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
    """One text item [L, C] -> (tokens [L, C], ids [L, 4]) with id (t, 0, 0, j) for token j."""
    length = x.shape[0]
    zero = torch.zeros(1, dtype=torch.long, device=x.device)
    ids = torch.cartesian_prod(_coord(t_coord, x.device), zero, zero, torch.arange(length, device=x.device))
    return x, ids


def prc_img(x: Tensor, t_coord: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
    """One latent [C, h, w] -> (row-major tokens [h*w, C], ids [h*w, 4]) with id (t, y, x, 0)."""
    _, h, w = x.shape
    dev = x.device
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    ids = torch.cartesian_prod(_coord(t_coord, dev), torch.arange(h, device=dev), torch.arange(w, device=dev), zero)
    return rearrange(x, "c h w -> (h w) c"), ids


def _per_item(t_coord, batch: int) -> list:
    """t_coord for a batch gives one t per item (as the reference's batched wrapper indexes it)."""
    if t_coord is None:
        return [None] * batch
    if len(t_coord) != batch:
        raise ValueError(f"t_coord has {len(t_coord)} entries for a batch of {batch}")
    return list(t_coord)


def batched_prc_txt(x: Tensor, t_coord: Tensor | None = None) -> tuple[Tensor, Tensor]:
    packed = [prc_txt(item, t) for item, t in zip(x, _per_item(t_coord, len(x)), strict=True)]
    return torch.stack([p[0] for p in packed]), torch.stack([p[1] for p in packed])


def batched_prc_img(x: Tensor, t_coord: Tensor | None = None) -> tuple[Tensor, Tensor]:
    packed = [prc_img(item, t) for item, t in zip(x, _per_item(t_coord, len(x)), strict=True)]
    return torch.stack([p[0] for p in packed]), torch.stack([p[1] for p in packed])


def listed_prc_img(
    x_list: list[Tensor], t_coord: list[Tensor | int] | None = None
) -> tuple[list[Tensor], list[Tensor]]:
    """Pack a list of latents [C, h, w] of different sizes; t_coord gives one t per item (default 0)."""
    coords = t_coord if t_coord is not None else [None] * len(x_list)
    packed = [prc_img(x, t) for x, t in zip(x_list, coords, strict=True)]
    return [p[0] for p in packed], [p[1] for p in packed]


def compress_time(t_ids: Tensor) -> Tensor:
    """Map the distinct t values (sorted) to 0..T-1."""
    _, compressed = torch.unique(t_ids, sorted=True, return_inverse=True)
    return compressed


def scatter_ids(x: Tensor, x_ids: Tensor) -> list[Tensor]:
    """Tokens [B, L, C] with ids [B, L, 4] -> per item a dense [1, C, T, H, W] grid (empty cells are zero)."""
    out = []
    for tokens, ids in zip(x, x_ids, strict=True):
        t = compress_time(ids[:, 0])
        h, w = ids[:, 1], ids[:, 2]
        num_t, num_h, num_w = int(t.max()) + 1, int(h.max()) + 1, int(w.max()) + 1
        flat = t * num_w * num_h + h * num_w + w
        grid = torch.zeros(num_t * num_h * num_w, tokens.shape[-1], dtype=tokens.dtype, device=tokens.device)
        grid.index_copy_(0, flat, tokens)
        out.append(rearrange(grid, "(t h w) c -> 1 c t h w", t=num_t, h=num_h, w=num_w))
    return out


# ----------------------------------------------------------------------------- reference images


def cap_min_pixels(img: Image.Image, min_side: int = REF_MIN_SIDE, max_aspect: float = REF_MAX_ASPECT) -> None:
    w, h = img.size
    if min(w, h) < min_side:
        raise ValueError(f"reference image is {w}x{h}: each side must be at least {min_side} px")
    if max(w, h) / min(w, h) > max_aspect:
        raise ValueError(f"reference image is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.2f} exceeds {max_aspect}")


def center_crop_to_multiple_of_x(img: Image.Image, x: int) -> Image.Image:
    w, h = img.size
    new_w, new_h = w // x * x, h // x * x
    left, top = (w - new_w) // 2, (h - new_h) // 2
    return img.crop((left, top, left + new_w, top + new_h))


def default_prep(img: Image.Image, limit_pixels: int) -> Tensor:
    """The reference's preparation of one reference image: RGB, checks, pixel cap, centre crop to 16."""
    img = img.convert("RGB")
    cap_min_pixels(img)
    img = cap_pixels(img, limit_pixels)
    return image_to_tensor(center_crop_to_multiple_of_x(img, PIXELS_PER_TOKEN))


def ref_pixel_limit(num_refs: int) -> int:
    return SINGLE_REF_MAX_PIXELS if num_refs == 1 else MULTI_REF_MAX_PIXELS


@torch.no_grad()
def encode_image_refs(
    ae: torch.nn.Module, img_ctx: list[Image.Image], dtype: torch.dtype = torch.bfloat16, *, slots_taken: int = 0
) -> tuple[Tensor | None, Tensor | None]:
    """Encode reference images into one token sequence [1, N, C] with ids [1, N, 4] (t = 10, 20, ...).

    `slots_taken` references come before these (an inpainting source): they count for the pixel cap, and these
    start at t = 10 * (slots_taken + 1).
    """
    if not img_ctx:
        return None, None
    limit = ref_pixel_limit(len(img_ctx) + slots_taken)
    param = next(ae.parameters())
    latents = [ae.encode(default_prep(img, limit)[None].to(param.device, param.dtype))[0] for img in img_ctx]
    t_coords = [REF_TIME_SCALE * (k + 1 + slots_taken) for k in range(len(latents))]
    tokens, ids = listed_prc_img(latents, t_coord=t_coords)
    return torch.cat(tokens)[None].to(dtype), torch.cat(ids)[None]


# ----------------------------------------------------------------------------- schedule


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """Shift parameter fitted by BFL: linear in tokens, interpolated in steps between 10- and 200-step fits.

    Above 4300 tokens the 200-step fit is used regardless of the step count (a deliberate discontinuity).
    """
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    slope = (m_200 - m_10) / 190.0
    intercept = m_200 - 200.0 * slope
    return float(slope * num_steps + intercept)


def generalized_time_snr_shift(t: Tensor, mu: float, sigma: float) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_schedule(num_steps: int, image_seq_len: int) -> list[float]:
    """num_steps + 1 times from 1 (noise) to 0 (data), in torch float32 exactly as the reference computes them."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    mu = compute_empirical_mu(image_seq_len, num_steps)
    timesteps = torch.linspace(1, 0, num_steps + 1)
    return generalized_time_snr_shift(timesteps, mu, 1.0).tolist()


# ----------------------------------------------------------------------------- denoising


# A velocity function maps (latents [B, L, C], t as a [B] tensor in the latents' dtype) to dx/dt.
Velocity = Callable[[Tensor, Tensor], Tensor]
Blend = Callable[[Tensor, float], Tensor]


def euler(
    img: Tensor,
    timesteps: list[float],
    velocity: Velocity,
    callback: StepCallback | None = None,
    blend: Blend | None = None,
) -> Tensor:
    """The one Euler loop behind every denoiser: img += (t_prev - t_curr) * v(img, t_curr).

    `blend(img, t_prev)`, when given, rewrites the latents after each step (inpainting puts back the known region
    re-noised to t_prev).
    """
    total = len(timesteps) - 1
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        if callback is not None:
            callback(i, total)
        t_vec = torch.full((img.shape[0],), t_curr, dtype=img.dtype, device=img.device)  # rounded like the ref
        img = img + (t_prev - t_curr) * velocity(img, t_vec)
        if blend is not None:
            img = blend(img, t_prev)
    return img


def truncated_schedule(timesteps: list[float], strength: float) -> list[float]:
    """The last `strength` of a schedule, as diffusers' img2img / inpaint pipelines cut it: of N steps,
    int(N - N * strength) are skipped. strength 1 keeps all; a small strength keeps at least one step."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength!r}")
    num_steps = len(timesteps) - 1
    start = int(max(num_steps - min(num_steps * strength, num_steps), 0))
    return timesteps[min(start, num_steps - 1) :]


def noised(latents: Tensor, noise: Tensor, t: float) -> Tensor:
    """The rectified-flow point at time t between clean latents (t=0) and noise (t=1)."""
    return t * noise + (1.0 - t) * latents


def extra_txt_ids(txt_ids: Tensor, count: int) -> Tensor:
    """txt_ids [B, L, 4] followed by ids for `count` more text-stream tokens at positions L, L+1, ..."""
    batch, length, _ = txt_ids.shape
    extra = torch.zeros(batch, count, 4, dtype=txt_ids.dtype, device=txt_ids.device)
    extra[..., 3] = torch.arange(length, length + count, device=txt_ids.device)
    return torch.cat([txt_ids, extra], dim=1)


def _guidance_vec(guidance: float | None, img: Tensor) -> Tensor | None:
    return None if guidance is None else torch.full((img.shape[0],), guidance, dtype=img.dtype, device=img.device)


def _with_extra(txt_ids: Tensor, txt_extra: Tensor | None) -> tuple[Tensor, dict]:
    """The text ids covering any extra tokens, and the forward's keyword for them (none: any model works)."""
    if txt_extra is None:
        return txt_ids, {}
    return extra_txt_ids(txt_ids, txt_extra.shape[1]), {"txt_extra": txt_extra}


class _ExtraTokens:
    """Extra text-stream tokens (IP-Adapter) and how much they count. At scale 1 the forward sees them; at other
    scales the velocity moves from the forward without them (scale 0) along the difference they make, which
    costs a second forward. (Scaling the tokens themselves would do nothing: every block re-normalises them.)"""

    def __init__(self, txt_ids: Tensor, tokens: Tensor | None, scale: float):
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"txt_extra_scale must be a finite number >= 0, got {scale!r}")
        self.tokens = None if scale == 0 else tokens
        self.scale = scale
        self.ids, self.ids_with = txt_ids, _with_extra(txt_ids, self.tokens)

    def velocity(self, forward: Callable[[Tensor, dict], Tensor]) -> Tensor:
        """`forward(txt_ids, extra_kwargs)` combined for this scale."""
        if self.tokens is None:
            return forward(self.ids, {})
        with_tokens = forward(*self.ids_with)
        if self.scale == 1:
            return with_tokens
        without = forward(self.ids, {})
        return without + self.scale * (with_tokens - without)


def _twice(t: Tensor | None) -> Tensor | None:
    """Repeat along the batch for the [uncond; cond] halves of CFG."""
    return None if t is None else torch.cat([t, t])


def _with_refs(
    img: Tensor, img_ids: Tensor, img_cond_seq: Tensor | None, img_cond_seq_ids: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Reference tokens go after the target tokens on the plain path."""
    if img_cond_seq is None:
        return img, img_ids
    return torch.cat([img, img_cond_seq], dim=1), torch.cat([img_ids, img_cond_seq_ids], dim=1)


def _batched_refs(
    img: Tensor, img_cond_seq: Tensor | None, img_cond_seq_ids: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """Check references come with their ids, and repeat a single set ([1, N, C]) over img's batch."""
    if (img_cond_seq is None) != (img_cond_seq_ids is None):
        raise ValueError("img_cond_seq and img_cond_seq_ids must be given together")
    if img_cond_seq is None or img_cond_seq.shape[0] == img.shape[0]:
        return img_cond_seq, img_cond_seq_ids
    if img_cond_seq.shape[0] != 1:
        raise ValueError(f"references have batch {img_cond_seq.shape[0]} but the latents have {img.shape[0]}")
    batch = img.shape[0]
    return img_cond_seq.expand(batch, -1, -1), img_cond_seq_ids.expand(batch, -1, -1)


@torch.no_grad()
def denoise(
    model,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: list[float],
    guidance: float | None,
    img_cond_seq: Tensor | None = None,
    img_cond_seq_ids: Tensor | None = None,
    *,
    callback: StepCallback | None = None,
    blend: Blend | None = None,
    txt_extra: Tensor | None = None,
    txt_extra_scale: float = 1.0,
) -> Tensor:
    """Euler integration from timesteps[0] to timesteps[-1]; returns the denoised packed latents.

    `txt_extra` [B, n, hidden] are extra text-stream tokens (IP-Adapter) counting `txt_extra_scale`;
    `blend` see `euler`.
    """
    guidance_vec = _guidance_vec(guidance, img)
    img_cond_seq, img_cond_seq_ids = _batched_refs(img, img_cond_seq, img_cond_seq_ids)
    extra = _ExtraTokens(txt_ids, txt_extra, txt_extra_scale)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        seq, seq_ids = _with_refs(x, img_ids, img_cond_seq, img_cond_seq_ids)
        return extra.velocity(lambda ids, kw: model(seq, seq_ids, t, txt, ids, guidance_vec, **kw)[:, : x.shape[1]])

    return euler(img, timesteps, velocity, callback, blend)


@torch.no_grad()
def denoise_cached(
    model,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: list[float],
    guidance: float | None,
    img_cond_seq: Tensor | None = None,
    img_cond_seq_ids: Tensor | None = None,
    *,
    callback: StepCallback | None = None,
    blend: Blend | None = None,
    txt_extra: Tensor | None = None,
    txt_extra_scale: float = 1.0,
) -> Tensor:
    """The klein KV loop: reference K/V extracted at the first step and reused at the others."""
    if txt_extra is not None and txt_extra_scale != 1:
        raise ValueError("the KV loop takes txt_extra at scale 1 only: use denoise for other scales")
    if img_cond_seq is None or img_cond_seq_ids is None:
        raise ValueError("denoise_cached needs reference tokens (img_cond_seq and img_cond_seq_ids)")
    img_cond_seq, img_cond_seq_ids = _batched_refs(img, img_cond_seq, img_cond_seq_ids)
    guidance_vec = _guidance_vec(guidance, img)
    txt_ids, extra = _with_extra(txt_ids, txt_extra)
    cache = None

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        nonlocal cache
        if cache is None:
            pred, cache = model.forward_kv_extract(x, img_ids, t, txt, txt_ids, guidance_vec, img_cond_seq,
                                                   img_cond_seq_ids, **extra)  # fmt: skip
            return pred
        return model.forward_kv_cached(x, img_ids, t, txt, txt_ids, guidance_vec, cache, **extra)

    return euler(img, timesteps, velocity, callback, blend)


@torch.no_grad()
def denoise_cfg(
    model,
    img: Tensor,
    img_ids: Tensor,
    txt: Tensor,
    txt_ids: Tensor,
    timesteps: list[float],
    guidance: float,
    img_cond_seq: Tensor | None = None,
    img_cond_seq_ids: Tensor | None = None,
    *,
    callback: StepCallback | None = None,
    blend: Blend | None = None,
    txt_extra: Tensor | None = None,
    txt_extra_scale: float = 1.0,
    batched: bool = True,
    model_guidance: float | None = None,
) -> Tensor:
    """True CFG: v = uncond + guidance * (cond - uncond), with txt = [uncond; cond]; references are kept in both.

    `batched` runs both halves in one forward of twice the batch; otherwise one after the other (half the
    activation memory, the same result). `txt_extra` tokens (IP-Adapter) go to the conditional half only, so
    they need `batched=False`. `model_guidance` is the embedded guidance of a guidance-distilled model ([dev]).
    img is one half's latents [B, L, C]; returns the denoised [B, L, C].
    """
    if txt.shape[0] != 2 * img.shape[0]:
        raise ValueError(f"denoise_cfg needs txt = [uncond; cond]: batch {txt.shape[0]} != 2 x {img.shape[0]}")
    if txt_extra is not None and txt_extra_scale != 0 and batched:
        raise ValueError("txt_extra goes to the conditional half only: run CFG with batched=False")
    img_cond_seq, img_cond_seq_ids = _batched_refs(img, img_cond_seq, img_cond_seq_ids)
    extra = _ExtraTokens(txt_ids.chunk(2)[1], txt_extra, txt_extra_scale)
    velocity = (_batched_cfg if batched else _sequential_cfg)(
        model, img_ids, txt, txt_ids, guidance, img_cond_seq, img_cond_seq_ids, model_guidance, extra
    )
    return euler(img, timesteps, velocity, callback, blend)


def _batched_cfg(model, img_ids, txt, txt_ids, guidance, refs, ref_ids, model_guidance, _extra) -> Velocity:
    img_ids2, refs2, ref_ids2 = _twice(img_ids), _twice(refs), _twice(ref_ids)

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        seq, seq_ids = _with_refs(_twice(x), img_ids2, refs2, ref_ids2)
        embedded = _guidance_vec(model_guidance, seq)
        uncond, cond = model(seq, seq_ids, _twice(t), txt, txt_ids, embedded)[:, : x.shape[1]].chunk(2)
        return uncond + guidance * (cond - uncond)

    return velocity


def _sequential_cfg(model, img_ids, txt, txt_ids, guidance, refs, ref_ids, model_guidance, extra) -> Velocity:
    (txt_u, txt_c), ids_u = txt.chunk(2), txt_ids.chunk(2)[0]

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        seq, seq_ids = _with_refs(x, img_ids, refs, ref_ids)
        embedded = _guidance_vec(model_guidance, seq)
        uncond = model(seq, seq_ids, t, txt_u, ids_u, embedded)[:, : x.shape[1]]
        cond = extra.velocity(lambda ids, kw: model(seq, seq_ids, t, txt_c, ids, embedded, **kw)[:, : x.shape[1]])
        return uncond + guidance * (cond - uncond)

    return velocity
