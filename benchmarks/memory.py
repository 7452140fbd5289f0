#!/usr/bin/env python
"""Peak GPU memory of each GPU recipe, estimated without a GPU, beside what the config claims.

Estimate = resident state from parameter counts (weights, gradients, AdamW moments, EMA,
theta_0 anchor, autocast's bf16 weight copies, frozen encoders) + activations saved for
backward, measured by running the real modules on the ``meta`` device (real shapes, no
memory) under ``torch.autograd.graph.saved_tensors_hooks`` (each storage counted once) +
with gradient checkpointing the recomputed activations of the largest checkpointed block +
a fixed allowance for the CUDA context and allocator slack. The renderer of text-to-3D is
measured on the CPU at a small size (real tensors; per ray) and scaled to the recipe's rays.

What this does not see: cuDNN/cuBLAS workspaces beyond the allowance, allocator
fragmentation beyond it, autocast keeping norms in fp32 (the meta pass runs bf16 weights,
so normalisation outputs count 2 bytes, not 4). Treat the figures as +-15%; they have not
been compared with a GPU measurement (benchmarks/gpu_smoke.py prints measured peaks).

    python benchmarks/memory.py [--recipes NAME ...] [--tiny] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
#: CUDA context (~0.5 GiB) + allocator slack
OVERHEAD_GIB = 1.0

#: recipe -> the config whose comment claims its peak, as ``# memory[RECIPE]: N GiB ...``
RECIPES = {
    "train-sd21": "train/configs/mvdream_sd21.yaml",
    "dreambooth-full": "train/configs/dreambooth.yaml",
    "dreambooth-lora": "train/configs/dreambooth.yaml",
    "text-to-3d-albedo": "infer/configs/text_to_3d.yaml",
    "text-to-3d-shaded": "infer/configs/text_to_3d.yaml",
}


def claimed_gib(name: str) -> float | None:
    """The figure the recipe's config claims (``# memory[name]: N GiB``), or None."""
    text = (ROOT / RECIPES[name]).read_text()
    m = re.search(rf"memory\[{re.escape(name)}\]: ~?([\d.]+) GiB", text)
    return float(m.group(1)) if m else None


class SavedBytes:
    """Bytes of the distinct storages autograd saves for backward inside the context,
    excluding parameters (already counted as resident)."""

    def __init__(self, exclude=()):
        self.exclude = {self._key(p) for p in exclude}
        self.keys, self.bytes, self._ctx = set(), 0, None
        self.marks = []

    @staticmethod
    def _key(t: torch.Tensor):
        s = t.untyped_storage()
        return (s._cdata, s.nbytes())

    def pack(self, t):
        key = self._key(t)
        if key not in self.exclude and key not in self.keys:
            self.keys.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _unet(tiny: bool, device="meta", dtype=torch.bfloat16):
    from mvdiff.models import PRESETS, MultiViewUNet2DConditionModel, multiview_unet_config
    from mvdiff.testing import TINY_UNET_PARAMS

    params = TINY_UNET_PARAMS if tiny else PRESETS["sd-v2.1-base-4view"]
    with torch.device(device):
        config = multiview_unet_config(sample_size=8 if tiny else 32, **params)
        return MultiViewUNet2DConditionModel.from_config(config).to(dtype)


def _vae(tiny: bool, device="meta", dtype=torch.bfloat16):
    from diffusers import AutoencoderKL

    with torch.device(device):
        if tiny:
            from mvdiff.testing import tiny_vae

            return tiny_vae().to(device, dtype)
        return AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
        ).to(dtype)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


#: parameters of the SD-2.1 text encoder (OpenCLIP ViT-H/14 text tower, 23 layers used)
TEXT_ENCODER_PARAMS = 340_387_840


class _FlashLike(torch.autograd.Function):
    """What a CUDA flash / memory-efficient SDPA kernel keeps for backward: q, k, v, the
    output and a float32 logsumexp per query (the meta device's SDPA is the math path,
    which would keep the full attention matrices)."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)  # (b, H, n, D)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (b, H, n)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - never run (meta forward only)
        raise NotImplementedError


def _flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    return _FlashLike.apply(q, k, v)


class flash_attention_accounting:
    """Within: ``F.scaled_dot_product_attention`` keeps what the CUDA kernels keep."""

    def __enter__(self):
        self.saved = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = _flash_sdpa

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self.saved


def unet_training_activations(
    tiny: bool, images: int, latent: int, checkpointing: bool, views: int = 4
):
    """(saved bytes, largest checkpointed block's bytes) of one UNet forward for training."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet = _unet(tiny).train()
    ctx_dim = unet.config.cross_attention_dim
    x = torch.randn(images, 4, latent, latent, device="meta", dtype=torch.bfloat16)
    t = torch.zeros(images, dtype=torch.long, device="meta")
    text = torch.randn(images, 77, ctx_dim, device="meta", dtype=torch.bfloat16)
    cam = torch.randn(images, 16, device="meta", dtype=torch.bfloat16)
    # largest block: measured without checkpointing, per resnet / transformer block
    largest = [0]
    with flash_attention_accounting(), SavedBytes(unet.parameters()) as saved:
        starts = {}

        def pre(m, *_):
            starts[id(m)] = saved.bytes

        def post(m, *_):
            largest[0] = max(largest[0], saved.bytes - starts.pop(id(m)))

        hooks = []
        for m in unet.modules():
            if isinstance(m, (ResnetBlock2D, Transformer2DModel)):
                hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        unet(x, t, text, camera=cam, num_views=views)
        for h in hooks:
            h.remove()
    full = saved.bytes
    if not checkpointing:
        return full, 0
    unet.enable_gradient_checkpointing()
    with flash_attention_accounting(), SavedBytes(unet.parameters()) as saved:
        unet(x, t, text, camera=cam, num_views=views)
    return saved.bytes, largest[0]


def vae_encode_activations(tiny: bool, images: int, size: int) -> int:
    vae = _vae(tiny, dtype=torch.float32)
    x = torch.randn(images, 3, size, size, device="meta", requires_grad=True)
    with flash_attention_accounting(), SavedBytes(vae.parameters()) as saved:
        vae.encode(x).latent_dist.sample()
    return saved.bytes


def render_bytes_per_ray(shading: str, samples: int) -> float:
    """Saved bytes per ray of a stratified render with grad (CPU, 16² x 4 views, no
    occupancy skipping: every sample of a ray that hits the box is evaluated)."""
    from mvdiff.cameras import sample_sds_group
    from mvdiff.sds.field import FieldConfig, RadianceField
    from mvdiff.sds.render import render, sample_light

    torch.manual_seed(0)
    field = RadianceField(FieldConfig())
    gen = torch.Generator().manual_seed(0)
    g = sample_sds_group(gen)
    light = sample_light(g["c2w"], gen) if shading != "albedo" else None
    size = 16
    with SavedBytes(field.parameters()) as saved:
        render(field, g["c2w"], g["fov_deg"], size, samples, stratified=True, generator=gen,
               shading=shading, light=light)  # fmt: skip
    return saved.bytes / (4 * size * size)


def estimate(name: str, tiny: bool) -> dict:
    from mvdiff.config import load_config
    from mvdiff.training.config import DreamBoothTrainConfig, TrainConfig

    parts: dict[str, float] = {}
    unet_params = _count(_unet(tiny))
    vae_params = _count(_vae(tiny))
    te_params = 0 if tiny else TEXT_ENCODER_PARAMS
    if name.startswith(("train", "dreambooth")):
        path = ROOT / RECIPES[name]
        cls = DreamBoothTrainConfig if name.startswith("dreambooth") else TrainConfig
        cfg = load_config(cls, path)
        lora = name.endswith("lora")
        views = cfg.data.num_views
        objects = cfg.data.batch_size
        if name.startswith("dreambooth"):
            views = 1  # 2D photos (+ class objects with prior preservation: off by default)
        images = objects * views
        latent = cfg.data.resolution // 8
        trainable = 0.01 * unet_params if lora else unet_params  # LoRA: ~1% (rank 16-32)
        parts["weights fp32"] = 4 * unet_params
        parts["gradients fp32"] = 4 * trainable
        parts["AdamW moments"] = (2 if cfg.optim.use_8bit_adam else 8) * trainable
        if cfg.ema:
            parts["EMA"] = 4 * trainable
        if getattr(cfg, "dreambooth", None) is not None and cfg.dreambooth.param_preservation:
            parts["theta_0 anchor"] = 4 * trainable
        if cfg.mixed_precision in ("bf16", "fp16"):
            parts["autocast weight copies"] = 2 * unet_params
        frozen_bytes = 2 if cfg.mixed_precision != "no" else 4
        parts["frozen VAE + text encoder"] = frozen_bytes * (vae_params + te_params)
        saved, block = unet_training_activations(
            tiny, images, latent, cfg.model.gradient_checkpointing, views
        )
        parts["saved activations"] = saved
        parts["recompute of the largest block"] = block
        parts["VAE encode (no grad)"] = 0.0
    else:
        path = ROOT / RECIPES[name]
        import yaml

        from mvdiff.sds.config import TextTo3DConfig

        cfg = TextTo3DConfig.from_dict(yaml.safe_load(path.read_text()))
        shading = "albedo" if name.endswith("albedo") else "lambertian"
        size = cfg.render_size_late
        parts["UNet + VAE + text encoder fp32"] = 4 * (unet_params + vae_params + te_params)
        parts["VAE encode with grad (256² x 4)"] = vae_encode_activations(tiny, 4, 256)
        rays = 4 * size * size
        parts[f"renderer ({shading}, {size}² x 4, {cfg.samples} samples)"] = rays * (
            render_bytes_per_ray(shading, cfg.samples)
        )
        # UNet inference of cond + uncond (8 images at 32² latents): transient, no grad
        parts["UNet forward (no grad)"] = 0.5 * GIB
    total = sum(parts.values()) + OVERHEAD_GIB * GIB
    claim = claimed_gib(name)
    return {
        "recipe": name, "config": RECIPES[name], "estimate_gib": round(total / GIB, 1),
        "claim_gib": claim, "within_claim": claim is not None and total / GIB <= claim,
        "parts_gib": {k: round(v / GIB, 2) for k, v in parts.items()},
    }  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--tiny", action="store_true", help="tiny models (tests)")
    ap.add_argument("--json", action="store_true", help="one JSON line per recipe")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    rows = [estimate(name, args.tiny) for name in args.recipes]
    for row in rows:
        if args.json:
            print(json.dumps(row))
        else:
            claim = "none" if row["claim_gib"] is None else f"{row['claim_gib']:.1f} GiB"
            verdict = "within" if row["within_claim"] else "OVER THE CLAIM"
            print(f"{row['recipe']:<20} estimate {row['estimate_gib']:>6.1f} GiB   claim "
                  f"{claim:>9}   {verdict}   ({row['config']})")  # fmt: skip
            for part, gib in row["parts_gib"].items():
                print(f"    {part:<48} {gib:>7.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
