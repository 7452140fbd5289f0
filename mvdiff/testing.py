"""Tiny random components for tests, benchmarks and the quickstart (no downloads).

``tiny_components()`` returns a dict with the same five parts as a real MVDream pipeline —
``unet`` (:class:`MultiViewUNet2DConditionModel`), ``vae`` (``AutoencoderKL``, 8x
downsampling like SD), ``text_encoder`` (``CLIPTextModel``), ``tokenizer`` (the real CLIP BPE
tokenizer from the files shipped in ``mvdiff/resources``) and ``scheduler`` (DDIM configured
like the official sampler) — small enough to run a full pipeline on a CPU in a second.
The tiny UNet has the shape of the official reference test model (``tests/fixtures``).
"""

from __future__ import annotations

import contextlib

import torch

from mvdiff.models.unet_mv import MultiViewUNet2DConditionModel, multiview_unet_config

#: Official-style (``openaimodel``) parameters of the tiny UNet, like the reference vectors'.
TINY_UNET_PARAMS = dict(
    model_channels=32,
    channel_mult=[1, 2, 2],
    attention_resolutions=[2, 1],
    num_res_blocks=2,
    num_head_channels=16,
    use_linear_in_transformer=True,
    transformer_depth=1,
    context_dim=32,
    camera_dim=16,
)


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with the CPU RNG seeded to ``seed`` and give the caller's global RNG state
    back afterwards (the builders' weights are those of ``torch.manual_seed(seed)`` then
    building; CUDA generators are neither read nor seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def tiny_unet(seed: int = 0, camera: bool = True, **overrides) -> MultiViewUNet2DConditionModel:
    params = {**TINY_UNET_PARAMS, **overrides}
    if not camera:
        params["camera_dim"] = None
    config = multiview_unet_config(sample_size=8, **params)
    with seeded(seed):
        return MultiViewUNet2DConditionModel.from_config(config)


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    with seeded(seed):
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[16, 32, 32, 32],
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        )


def tiny_text_encoder(seed: int = 0, hidden_size: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    with seeded(seed):
        return CLIPTextModel(config)


def clip_tokenizer(pad_token: str = "!"):
    """The real CLIP tokenizer from the BPE files shipped with mvdiff (offline)."""
    from mvdiff.convert import build_tokenizer

    return build_tokenizer("openclip" if pad_token == "!" else "hfclip")


def ddim_scheduler():
    from mvdiff.convert import OriginalConfig, build_scheduler

    return build_scheduler(OriginalConfig(unet={}))


def tiny_image_unet(seed: int = 0, image_embed_dim: int = 32, num_image_tokens: int = 4):
    """The tiny UNet with ImageDream's image prompt (resampler + decoupled attention)."""
    config = multiview_unet_config(sample_size=8, **TINY_UNET_PARAMS)
    config.update(num_image_tokens=num_image_tokens, image_embed_dim=image_embed_dim)
    with seeded(seed):
        return MultiViewUNet2DConditionModel.from_config(config)


def tiny_image_encoder(seed: int = 0, hidden_size: int = 32, image_size: int = 28):
    """A tiny ``CLIPVisionModel`` (14-px patches) and its OpenCLIP-style image processor."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from mvdiff.convert import build_image_processor

    config = CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=14,
        hidden_act="gelu",
        projection_dim=hidden_size,
    )
    with seeded(seed):
        encoder = CLIPVisionModel(config)
    return encoder, build_image_processor(image_size)


def tiny_image_components(seed: int = 0) -> dict:
    """:func:`tiny_components` of an ImageDream-style model: the image-prompt UNet plus
    ``image_encoder`` and ``feature_extractor``."""
    parts = tiny_components(seed)
    parts["unet"] = tiny_image_unet(seed).eval()
    encoder, processor = tiny_image_encoder(seed + 3)
    parts["image_encoder"] = encoder.eval()
    parts["feature_extractor"] = processor
    return parts


def tiny_pixel_components(
    seed: int = 0,
    patch: int = 2,
    model_channels: int = 32,
    attention_resolutions=(1, 2),
    camera: bool = True,
    white_zero: bool = True,
) -> dict:
    """A tiny pixel-space model: :func:`tiny_components` with the exact
    :class:`~mvdiff.models.pixel_vae.PixelUnshuffleAutoencoder` as its VAE and a UNet of 2
    levels (``model_channels`` and twice that, one res block each, attention at the levels in
    ``attention_resolutions`` and in the middle) on its ``3 patch²``-channel latents. Saved
    with :func:`mvdiff.training.export.export_pipeline_folder`, it is a folder that
    ``mvdiff train`` trains (``model.pretrained=FOLDER``) and ``MVDreamPipeline`` samples;
    the model of ``benchmarks/learning_check.py``."""
    from mvdiff.models.pixel_vae import PixelUnshuffleAutoencoder

    ch = 3 * patch**2
    if model_channels < ch:
        raise ValueError(f"model_channels must be >= 3 patch² = {ch} (the latent channels)")
    unet = tiny_unet(
        seed, camera=camera, in_channels=ch, out_channels=ch, channel_mult=[1, 2],
        attention_resolutions=list(attention_resolutions), num_res_blocks=1,
        model_channels=model_channels, num_head_channels=16,
    )  # fmt: skip
    return {
        "unet": unet.eval(),
        "vae": PixelUnshuffleAutoencoder(patch=patch, white_zero=white_zero).eval(),
        "text_encoder": tiny_text_encoder(seed + 2).eval(),
        "tokenizer": clip_tokenizer(),
        "scheduler": ddim_scheduler(),
    }


def tiny_components(seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer, scheduler — tiny, random, deterministic in ``seed``."""
    return {
        "unet": tiny_unet(seed).eval(),
        "vae": tiny_vae(seed + 1).eval(),
        "text_encoder": tiny_text_encoder(seed + 2).eval(),
        "tokenizer": clip_tokenizer(),
        "scheduler": ddim_scheduler(),
    }
