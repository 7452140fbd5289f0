"""MultiViewUNet2DConditionModel: Stable Diffusion's UNet with 3D self-attention and a camera MLP.

Exactly two changes to the stock diffusers ``UNet2DConditionModel`` (docs/design.md §5):

1. every self-attention joins all views of an object (:class:`MultiViewAttnProcessor`;
   ``view_attention="per_view"`` in the config turns that off: the ablation of
   ``model.attention: per_view`` in training);
2. a camera MLP (16 -> time-embedding width, SiLU, -> same) whose output is added to the
   timestep embedding of each view. This is diffusers' ``class_embed_type="projection"``
   with ``projection_class_embeddings_input_dim=16``; with ``camera=None`` it is skipped
   (not fed zeros), which is 2D mode.

With ``num_image_tokens > 0`` in the config it is also ImageDream's image-conditioned UNet
(off by default, so MVDream folders load unchanged):

3. an IP-Adapter-Plus resampler (``image_proj``, diffusers' ``IPAdapterPlusImageProjection``)
   maps per-object image embeddings ``[B, 257, image_embed_dim]`` (OpenCLIP ViT-H
   penultimate hidden states) to ``num_image_tokens`` tokens of the text width;
4. every cross-attention adds decoupled image attention (``to_k_ip`` / ``to_v_ip``, see
   :mod:`mvdiff.models.attention_ip`);
5. the "pixel controller": with ``reference_latents`` the last of each object's views is
   replaced by the reference image's latent, and the joined self-attention carries it to
   the other views (as the official forward writes ``ip_img`` into ``x``).

The batch is laid out ``(object, view)`` with the views of one object contiguous:
``sample`` is ``[B*V, C, h, w]``, ``encoder_hidden_states`` ``[B*V, L, D]``, ``camera``
``[B*V, 16]``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

# diffusers' pipeline loader recognises a component as a model by looking `ModelMixin` up by
# name in the module its model_index.json names, so it must be importable from here.
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from mvdiff.models.attention import MultiViewAttention, MultiViewAttnProcessor
from mvdiff.models.attention_ip import (
    MultiViewIPAttnProcessor,
    accepts_image_tokens,
    add_image_projections,
)

CAMERA_DIM = 16

#: ImageDream's resampler (official ``Resampler(dim=context_dim, depth=4, dim_head=64,
#: heads=12, num_queries=ip_dim, embedding_dim=1280, output_dim=context_dim, ff_mult=4)``);
#: only the token count and the embedding width are configurable, as in the official code.
IMAGE_PROJ_DEPTH = 4
IMAGE_PROJ_HEADS = 12
IMAGE_PROJ_DIM_HEAD = 64
IMAGE_PROJ_FF_MULT = 4
#: Width of OpenCLIP ViT-H/14 hidden states (the official ``hidden_dim``).
IMAGE_EMBED_DIM = 1280

_IMAGE_PROMPT_CONFIG = {"num_image_tokens": 0, "image_embed_dim": IMAGE_EMBED_DIM}
#: config entries of this class beyond ``UNet2DConditionModel``'s (keyword-only arguments)
_EXTRA_CONFIG = {**_IMAGE_PROMPT_CONFIG, "view_attention": "joint"}
#: ``view_attention``: "joint" (MVDream: self-attention spans all views of an object) or
#: "per_view" (the ablation: the same layers attend within each view only)
VIEW_ATTENTION = ("joint", "per_view")


class MultiViewUNet2DConditionModel(UNet2DConditionModel):
    """A diffusers ``UNet2DConditionModel`` whose self-attention spans all views.

    Build it with the usual ``UNet2DConditionModel`` config plus
    ``class_embed_type="projection", projection_class_embeddings_input_dim=16`` (see
    :func:`multiview_unet_config`); ``save_pretrained`` / ``from_pretrained`` work as usual.
    """

    def __init__(
        self,
        *args,
        num_image_tokens: int = 0,
        image_embed_dim: int = IMAGE_EMBED_DIM,
        view_attention: str = "joint",
        **kwargs,
    ):
        if view_attention not in VIEW_ATTENTION:
            raise ValueError(
                f"view_attention must be one of {VIEW_ATTENTION}, got {view_attention!r}"
            )
        super().__init__(*args, **kwargs)
        # the parent's @register_to_config records only its own arguments
        self.register_to_config(
            num_image_tokens=num_image_tokens,
            image_embed_dim=image_embed_dim,
            view_attention=view_attention,
        )
        for module in self.modules():
            if type(module) is Attention:
                # same layer, a processor setter that keeps the views joined (attention.py)
                module.__class__ = MultiViewAttention
        self.image_proj = None
        if num_image_tokens:
            if num_image_tokens < 0 or image_embed_dim < 1:
                raise ValueError("num_image_tokens and image_embed_dim must be positive")
            for name, module in self.named_modules():
                if name.endswith(".attn2") and isinstance(module, Attention):
                    add_image_projections(module)
            width = self.config.cross_attention_dim
            # diffusers' resampler computes exactly the official one: LayerNorm'd image
            # features and latents, latents attend to [features; latents] (no bias, scale
            # 1/sqrt(dim_head), the official to_kv is to_k/to_v stacked), residual, LayerNorm
            # + bias-free GELU MLP, residual; then proj_out and norm_out.
            self.image_proj = IPAdapterPlusImageProjection(
                embed_dims=image_embed_dim,
                output_dims=width,
                hidden_dims=width,
                depth=IMAGE_PROJ_DEPTH,
                dim_head=IMAGE_PROJ_DIM_HEAD,
                heads=IMAGE_PROJ_HEADS,
                num_queries=num_image_tokens,
                ffn_ratio=IMAGE_PROJ_FF_MULT,
            )
            self.set_attn_processor(MultiViewIPAttnProcessor())
        else:
            self.set_attn_processor(MultiViewAttnProcessor())

    # ConfigMixin builds and loads configs from the __init__ signature: the parent's
    # arguments plus the image-prompt ones and view_attention.
    __init__.__signature__ = inspect.signature(UNet2DConditionModel.__init__).replace(
        parameters=[
            *inspect.signature(UNet2DConditionModel.__init__).parameters.values(),
            *(
                inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
                for k, v in _EXTRA_CONFIG.items()
            ),
        ]
    )

    def set_attn_processor(self, processor) -> None:
        """As diffusers', all or nothing: a processor that would split the views is refused
        (``ValueError``) with every layer left as it was."""
        before = self.attn_processors
        try:
            super().set_attn_processor(processor)
        except ValueError:
            super().set_attn_processor(before)
            raise

    def set_default_attn_processor(self) -> None:
        """The default here is the multi-view processor (diffusers' would split the views)."""
        self.set_attn_processor(
            MultiViewIPAttnProcessor() if self.image_proj is not None else MultiViewAttnProcessor()
        )

    def get_class_embed(self, sample: torch.Tensor, class_labels: torch.Tensor | None):
        if class_labels is None:  # 2D mode or "no camera": skip the camera MLP entirely
            return None
        return super().get_class_embed(sample=sample, class_labels=class_labels)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        camera: torch.Tensor | None = None,
        num_views: int = 1,
        image_embeds: torch.Tensor | None = None,
        reference_latents: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs,
    ) -> UNet2DConditionOutput | tuple:
        """Predict noise for ``[B*V, C, h, w]`` latents of B objects with V views each.

        ``camera`` is ``None`` (no camera embedding) or ``[B*V, 16]`` model camera vectors
        (:func:`mvdiff.cameras.camera_vectors`). ``num_views=1`` is plain 2D Stable Diffusion.

        Image prompt (``num_image_tokens > 0`` models only): ``image_embeds`` is
        ``[B, N, image_embed_dim]``, one image per object (the official unconditional input
        is all zeros; ``None`` leaves the image attention out). ``reference_latents``
        ``[B, C, h, w]`` replaces the last view of every object (the reference frame, whose
        camera is the zero vector in ImageDream); ``sample`` itself is not modified.
        Other keyword arguments go to ``UNet2DConditionModel.forward``.
        """
        if num_views < 1 or sample.shape[0] % num_views:
            raise ValueError(
                f"batch of {sample.shape[0]} rows is not a multiple of num_views={num_views}"
            )
        if camera is not None:
            if self.class_embedding is None:
                raise ValueError("this UNet has no camera MLP; pass camera=None")
            if camera.shape != (sample.shape[0], self.config.projection_class_embeddings_input_dim):
                raise ValueError(
                    f"camera must be [{sample.shape[0]}, "
                    f"{self.config.projection_class_embeddings_input_dim}], got {tuple(camera.shape)}"
                )
            camera = camera.to(
                device=sample.device, dtype=self.class_embedding.linear_1.weight.dtype
            )
        # per_view (an ablation): every self-attention sees one view, whatever num_views is
        joined = num_views if self.config.view_attention == "joint" else 1
        cross_attention_kwargs = {**(cross_attention_kwargs or {}), "num_views": joined}
        objects = sample.shape[0] // num_views
        if reference_latents is not None:
            sample = self._write_reference(sample, reference_latents, num_views)
        if image_embeds is not None:
            cross_attention_kwargs["image_tokens"] = (
                self._image_tokens(image_embeds, objects)
                .to(sample.device)
                .repeat_interleave(num_views, dim=0)
            )  # (B, T, D) -> (B*V, T, D)
        return super().forward(
            sample,
            timestep,
            encoder_hidden_states,
            class_labels=camera,
            cross_attention_kwargs=cross_attention_kwargs,
            return_dict=return_dict,
            **kwargs,
        )

    def _image_tokens(self, image_embeds: torch.Tensor, objects: int) -> torch.Tensor:
        """Per-object image embeddings ``[B, N, E]`` -> resampled tokens ``[B, T, D]``."""
        if self.image_proj is None:
            raise ValueError(
                "this UNet has no image prompt (num_image_tokens=0); pass image_embeds=None"
            )
        dim = self.config.image_embed_dim
        if (
            image_embeds.ndim != 3
            or image_embeds.shape[0] != objects
            or image_embeds.shape[2] != dim
        ):
            raise ValueError(
                f"image_embeds must be [{objects}, N, {dim}] (one image per object), "
                f"got {tuple(image_embeds.shape)}"
            )
        for name, module in self.named_modules():
            if hasattr(module, "to_k_ip") and not accepts_image_tokens(module.processor):
                raise ValueError(
                    f"{name} has the processor {type(module.processor).__name__}, which ignores "
                    "the image prompt; use mvdiff.models.attention_ip.MultiViewIPAttnProcessor"
                )
        param = self.image_proj.proj_in.weight
        return self.image_proj(image_embeds.to(device=param.device, dtype=param.dtype))

    @staticmethod
    def _write_reference(
        sample: torch.Tensor, reference_latents: torch.Tensor, num_views: int
    ) -> torch.Tensor:
        """``sample`` with the last view of every object replaced by ``reference_latents``."""
        bv, c, h, w = sample.shape
        objects = bv // num_views
        if num_views < 2:
            raise ValueError(
                "reference_latents needs num_views >= 2 (the last view is the reference)"
            )
        if tuple(reference_latents.shape) != (objects, c, h, w):
            raise ValueError(
                f"reference_latents must be [{objects}, {c}, {h}, {w}], "
                f"got {tuple(reference_latents.shape)}"
            )
        views = sample.reshape(objects, num_views, c, h, w)  # (B*V, C, h, w) -> (B, V, C, h, w)
        ref = reference_latents.to(sample)[:, None]  # (B, C, h, w) -> (B, 1, C, h, w)
        # (B, V-1, C, h, w) + (B, 1, C, h, w) -> (B, V, C, h, w) -> (B*V, C, h, w)
        return torch.cat([views[:, :-1], ref], dim=1).reshape(bv, c, h, w)


def multiview_unet_config(
    model_channels: int = 320,
    channel_mult=(1, 2, 4, 4),
    attention_resolutions=(4, 2, 1),
    num_res_blocks: int = 2,
    num_head_channels: int | None = 64,
    num_heads: int | None = None,
    context_dim: int = 1024,
    use_linear_in_transformer: bool = True,
    transformer_depth: int = 1,
    camera_dim: int | None = CAMERA_DIM,
    in_channels: int = 4,
    out_channels: int = 4,
    sample_size: int = 32,
) -> dict:
    """diffusers config of the multi-view UNet from official (LDM ``openaimodel``) parameters.

    Defaults are MVDream's ``sd-v2.1-base-4view``. Exactly one of ``num_head_channels`` (SD
    2.x: fixed head width) and ``num_heads`` (SD 1.x: fixed head count) is used. Levels whose
    downsampling factor is in ``attention_resolutions`` get transformer blocks; the middle
    block always has one.
    """
    if (num_head_channels is None or num_head_channels <= 0) == (
        num_heads is None or num_heads <= 0
    ):
        raise ValueError("give exactly one of num_head_channels and num_heads")
    channels = [model_channels * m for m in channel_mult]
    # diffusers' `attention_head_dim` is (historically) the number of heads per level.
    if num_head_channels and num_head_channels > 0:
        heads = [c // num_head_channels for c in channels]
    else:
        heads = [num_heads] * len(channels)
    has_attn = [2**level in set(attention_resolutions) for level in range(len(channels))]
    down = [("CrossAttnDownBlock2D" if a else "DownBlock2D") for a in has_attn]
    up = [("CrossAttnUpBlock2D" if a else "UpBlock2D") for a in reversed(has_attn)]
    config = {
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": num_res_blocks,
        "attention_head_dim": heads,
        "cross_attention_dim": context_dim,
        "use_linear_projection": use_linear_in_transformer,
        "transformer_layers_per_block": transformer_depth,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }
    if camera_dim:
        config["class_embed_type"] = "projection"
        config["projection_class_embeddings_input_dim"] = camera_dim
    return config


#: Official MVDream UNet parameters (the ``unet_config.params`` of its YAML files).
PRESETS: dict[str, dict] = {
    "sd-v2.1-base-4view": dict(
        model_channels=320,
        channel_mult=[1, 2, 4, 4],
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        num_head_channels=64,
        use_linear_in_transformer=True,
        transformer_depth=1,
        context_dim=1024,
        camera_dim=16,
    ),
    "sd-v1.5-4view": dict(
        model_channels=320,
        channel_mult=[1, 2, 4, 4],
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        num_heads=8,
        use_linear_in_transformer=False,
        transformer_depth=1,
        context_dim=768,
        camera_dim=16,
    ),
}


def add_camera_mlp(unet: UNet2DConditionModel) -> MultiViewUNet2DConditionModel:
    """A multi-view UNet from a plain SD UNet: same weights plus a zero-initialised camera MLP.

    The last layer of the MLP is zero, so the new model starts out computing exactly what a
    2D model with joined-view attention computes.
    """
    config = dict(unet.config)
    config["class_embed_type"] = "projection"
    config["projection_class_embeddings_input_dim"] = CAMERA_DIM
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    model = MultiViewUNet2DConditionModel.from_config(config)
    missing, unexpected = model.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("class_embedding.") for k in missing):
        raise ValueError(f"state dicts disagree: missing={missing} unexpected={unexpected}")
    torch.nn.init.zeros_(model.class_embedding.linear_2.weight)
    torch.nn.init.zeros_(model.class_embedding.linear_2.bias)
    model = model.to(device=unet.device)
    # cast only when needed: diffusers logs a warning on any .to(dtype), even a no-op one
    return model if model.dtype == unet.dtype else model.to(dtype=unet.dtype)


def remove_camera_mlp(unet: MultiViewUNet2DConditionModel) -> MultiViewUNet2DConditionModel:
    """The same multi-view UNet without its camera MLP (the ``model.camera: false`` ablation):
    every other weight kept; it then runs with ``camera=None`` only."""
    config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    config["class_embed_type"] = None
    config["projection_class_embeddings_input_dim"] = None
    model = MultiViewUNet2DConditionModel.from_config(config)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.")}
    model.load_state_dict(state, strict=True)
    model = model.to(device=unet.device)
    return model if model.dtype == unet.dtype else model.to(dtype=unet.dtype)
