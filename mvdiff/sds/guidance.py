"""Multi-view score distillation (MVDream SDS, docs/design.md §6) with a multi-view UNet as the prior.

Per step: renders of one (or more) groups of V cameras (``[B*V, 3, H, W]`` in [0, 1]) are
upsampled to the model resolution, encoded by the VAE (or used as pixels when ``vae`` is
``None`` — the cheap identity "VAE" of the oracle tests), noised at one timestep shared by
the whole batch, and the UNet predicts the noise with and without the prompt. Classifier-free
guidance and CFG-rescale act on the predicted x0 of each V-view group:

    eps      = eps_u + s * (eps_c - eps_u)
    x0       = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)             (a_t = alphas_cumprod[t])
    x0_c     = (x_t - sqrt(1 - a_t) * eps_c) / sqrt(a_t)
    x0      <- r * x0 * std_g(x0_c) / std_g(x0) + (1 - r) * x0      (std over each group)

The loss (its value is only a monitor; its gradient is what matters) is

* x0-reconstruction form (MVDream):  0.5 * |z - sg(x0)|^2 / N          -> dL/dz = (z - x0) / N
* classic eps-form (DreamFusion):    0.5 * |z - sg(z - g)|^2 / N,
  g = (1 - a_t) * (eps - noise)                                         -> dL/dz = g / N

with ``N = B*V`` and ``eps`` in the eps-form recomputed from the (rescaled) x0. The timestep is
``t ~ U[lo, hi] * T`` where ``lo`` and ``hi`` move linearly from ``t_start`` to ``t_min`` and
``t_max`` over ``anneal_steps`` steps (0.98 -> [0.02, 0.5] over 8000 steps by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["SDSConfig", "MultiViewSDS", "timestep_bounds"]


@dataclass
class SDSConfig:
    guidance_scale: float = 50.0
    #: CFG-rescale factor on the predicted x0 of each view group (0 = off)
    rescale: float = 0.5
    #: "x0" (MVDream reconstruction form) or "eps" (classic SDS)
    form: Literal["x0", "eps"] = "x0"
    t_start: float = 0.98
    t_min: float = 0.02
    t_max: float = 0.5
    anneal_steps: int = 8000
    num_views: int = 4
    #: pixel resolution the renders are resized to before encoding (None: the UNet's
    #: sample_size times the VAE factor, or the sample size itself without a VAE)
    resolution: int | None = None
    #: draw the latent from the VAE posterior (as MVDream) instead of taking its mean
    vae_sample: bool = True
    #: run the VAE encoder and the UNet under autocast: "no" (float32), "fp16" or "bf16"
    #: (GPU speed; weights stay float32, the loss and its gradient are float32)
    autocast: Literal["no", "fp16", "bf16"] = "no"


def timestep_bounds(step: int, config: SDSConfig, num_train_timesteps: int = 1000):
    """Integer (lo, hi) timestep range at ``step`` of the annealing schedule."""
    f = min(max(step / max(config.anneal_steps, 1), 0.0), 1.0)
    lo = config.t_start + (config.t_min - config.t_start) * f
    hi = config.t_start + (config.t_max - config.t_start) * f
    T = num_train_timesteps
    lo_i = min(max(int(lo * T), 1), T - 1)
    hi_i = min(max(int(hi * T), lo_i), T - 1)
    return lo_i, hi_i


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
AUTOCAST = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


class MultiViewSDS:
    """SDS guidance from a :class:`~mvdiff.models.MultiViewUNet2DConditionModel`.

    ``unet`` is called as ``unet(sample, timestep, encoder_hidden_states, camera=...,
    num_views=V).sample``; anything with that call (e.g. a test oracle) works. ``vae`` is a
    diffusers ``AutoencoderKL`` or ``None`` (pixel space). ``alphas_cumprod`` ``[T]`` comes
    from the scheduler (``scheduler.alphas_cumprod``). ``prediction_type`` is what the UNet
    predicts (the scheduler's ``prediction_type``: ``epsilon``, ``sample`` = x0 or
    ``v_prediction``); other targets are turned into the noise they imply. Parameters of unet
    and vae are not trained; gradients flow only to the renders.
    """

    def __init__(self, unet, vae, alphas_cumprod: torch.Tensor, config: SDSConfig | None = None,
                 prediction_type: str = "epsilon"):  # fmt: skip
        self.unet, self.vae = unet, vae
        self.config = config or SDSConfig()
        if self.config.form not in ("x0", "eps"):
            raise ValueError(f"SDS form must be 'x0' or 'eps', got {self.config.form!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        self.prediction_type = prediction_type
        if self.config.autocast not in AUTOCAST:
            raise ValueError(f"sds.autocast must be no, fp16 or bf16, got {self.config.autocast!r}")
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float32)
        for m in (unet, vae):
            if isinstance(m, torch.nn.Module):
                m.requires_grad_(False)

    def _autocast(self, device: torch.device):
        dtype = AUTOCAST[self.config.autocast]
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def resolution(self) -> int:
        if self.config.resolution is not None:
            return int(self.config.resolution)
        size = int(self.unet.config.sample_size)
        if self.vae is None:
            return size
        return size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def sample_timestep(self, step: int, generator: torch.Generator | None = None) -> int:
        lo, hi = timestep_bounds(step, self.config, self.num_train_timesteps)
        return int(torch.randint(lo, hi + 1, (1,), generator=generator))

    def encode(self, rgb: torch.Tensor, generator: torch.Generator | None = None):
        """``[N, 3, H, W]`` in [0, 1] -> latents (or pixels in [-1, 1] without a VAE)."""
        r = self.resolution
        if rgb.shape[-2:] != (r, r):
            rgb = F.interpolate(rgb, size=(r, r), mode="bilinear", align_corners=False)
        x = rgb * 2.0 - 1.0
        if self.vae is None:
            return x
        with self._autocast(x.device):
            dist = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = dist.sample(generator=generator) if self.config.vae_sample else dist.mean
        return (z * self.vae.config.scaling_factor).float()

    def predict_noise(self, noisy, t: int, cond, uncond, camera, num_views: int):
        """(eps_cond, eps_uncond), each like ``noisy``; one batched UNet call.

        ``cond`` / ``uncond`` are ``[1, L, D]`` or ``[N, L, D]`` prompt embeddings.
        """
        n = noisy.shape[0]
        cond = cond.expand(n, *cond.shape[1:])  # (1, L, D) -> (N, L, D)
        uncond = uncond.expand(n, *uncond.shape[1:])  # (1, L, D) -> (N, L, D)
        x = torch.cat([noisy, noisy])  # (N, C, h, w) -> (2N, C, h, w)
        emb = torch.cat([cond, uncond])  # (N, L, D) -> (2N, L, D)
        cam = None if camera is None else torch.cat([camera, camera])  # (N, 16) -> (2N, 16)
        ts = torch.full((2 * n,), t, dtype=torch.long, device=noisy.device)
        with self._autocast(noisy.device):
            eps = self.unet(x, ts, encoder_hidden_states=emb, camera=cam, num_views=num_views)
        eps = self.to_noise(eps.sample.float(), x, t)
        return eps[:n], eps[n:]

    def to_noise(self, pred: torch.Tensor, noisy: torch.Tensor, t: int) -> torch.Tensor:
        """The noise a UNet output implies at timestep ``t`` (``noisy`` = x_t)."""
        if self.prediction_type == "epsilon":
            return pred
        a = self.alphas_cumprod[t].to(noisy.device)
        if self.prediction_type == "sample":  # x0: eps = (x_t - sqrt(a) x0) / sqrt(1 - a)
            return (noisy.float() - a.sqrt() * pred) / (1 - a).sqrt()
        return a.sqrt() * pred + (1 - a).sqrt() * noisy.float()  # v = sqrt(a) eps - sqrt(1-a) x0

    def guided_x0(self, noisy, t: int, eps_c, eps_u, num_views: int):
        """CFG (+ rescale) on the predicted x0 of each group: (x0, eps consistent with it)."""
        a = self.alphas_cumprod[t].to(noisy.device)
        s, r = self.config.guidance_scale, self.config.rescale
        eps = eps_u + s * (eps_c - eps_u)
        x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        if r > 0:
            x0_c = (noisy - (1 - a).sqrt() * eps_c) / a.sqrt()
            g = noisy.shape[0] // num_views
            std_c = x0_c.reshape(g, -1).std(dim=1) + 1e-8  # (B*V, C, h, w) -> (B, V*C*h*w)
            std = x0.reshape(g, -1).std(dim=1) + 1e-8  # (B*V, C, h, w) -> (B, V*C*h*w)
            factor = (std_c / std).repeat_interleave(num_views)[
                :, None, None, None
            ]  # (B,) -> (B*V, 1, 1, 1)
            x0 = r * x0 * factor + (1 - r) * x0
            eps = (noisy - a.sqrt() * x0) / (1 - a).sqrt()
        return x0, eps

    def loss_from_latents(self, z, t: int, noise, eps_c, eps_u, num_views: int):
        """The SDS loss on latents ``z`` given both noise predictions (see module docstring)."""
        a = self.alphas_cumprod[t].to(z.device)
        noisy = a.sqrt() * z.detach() + (1 - a).sqrt() * noise
        x0, eps = self.guided_x0(noisy, t, eps_c, eps_u, num_views)
        n = z.shape[0]
        if self.config.form == "x0":
            target = x0
        else:
            grad = torch.nan_to_num((1 - a) * (eps - noise))
            target = z.detach() - grad
        return 0.5 * F.mse_loss(z, target.detach(), reduction="sum") / n

    def __call__(
        self,
        rgb: torch.Tensor,
        cond: torch.Tensor,
        uncond: torch.Tensor,
        camera: torch.Tensor | None,
        step: int = 0,
        generator: torch.Generator | None = None,
        t: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> dict:
        """SDS on renders ``rgb`` ``[B*V, 3, H, W]`` (V = config.num_views) with model cameras
        ``camera`` ``[B*V, 16]`` (:func:`mvdiff.cameras.camera_vectors`) or None.

        Returns ``loss`` (backpropagate it), ``t``, ``latents`` and ``x0`` (guided prediction).
        """
        v = self.config.num_views
        if rgb.shape[0] % v:
            raise ValueError(f"{rgb.shape[0]} renders are not groups of num_views={v}")
        z = self.encode(rgb, generator)
        if t is None:
            t = self.sample_timestep(step, generator)
        if noise is None:
            noise = torch.randn(z.shape, generator=generator).to(z.device)
        a = self.alphas_cumprod[t].to(z.device)
        noisy = a.sqrt() * z.detach() + (1 - a).sqrt() * noise
        with torch.no_grad():
            eps_c, eps_u = self.predict_noise(noisy, t, cond, uncond, camera, v)
        loss = self.loss_from_latents(z, t, noise, eps_c, eps_u, v)
        with torch.no_grad():
            x0, _ = self.guided_x0(noisy, t, eps_c, eps_u, v)
        return {"loss": loss, "t": t, "latents": z, "x0": x0}
