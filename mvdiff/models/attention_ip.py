"""Image prompt of the ImageDream UNet: decoupled cross-attention and its processor.

ImageDream (bytedance/ImageDream) adds IP-Adapter-Plus image tokens to every
cross-attention of the MVDream UNet: the attention keeps its text keys/values (``to_k``,
``to_v``) and gains a second set for the image tokens (``to_k_ip``, ``to_v_ip``); the same
query attends to both and the two results are summed before the output projection::

    out = to_out(attn(q, k(text), v(text)) + scale * attn(q, k_ip(image), v_ip(image)))

The image projections live on the diffusers ``Attention`` module itself (as the official
``to_k_ip`` / ``to_v_ip`` do), not in the processor as in diffusers' own
``IPAdapterAttnProcessor2_0``: a processor is swapped by ``set_attn_processor`` and would take
the weights with it, and diffusers' processor does not join the views of the self-attention.
The processor here is therefore stateless and extends :class:`MultiViewAttnProcessor`:
self-attention and text-only calls are exactly the multi-view processor's.

The image tokens arrive as the ``image_tokens`` entry of ``cross_attention_kwargs``
(``[B*V, T, D]``, already through the resampler), so the text keys never see them.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from mvdiff.models.attention import MultiViewAttnProcessor


class MultiViewIPAttnProcessor(MultiViewAttnProcessor):
    """:class:`MultiViewAttnProcessor` plus ImageDream's decoupled image cross-attention.

    Used for every attention of an image-prompt UNet; only a cross-attention whose module
    has ``to_k_ip`` / ``to_v_ip`` and that is called with ``image_tokens`` adds the image
    term (``image_scale`` weights it; the official ``ip_weight``, 1 by default).
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_views: int = 1,
        image_tokens: torch.Tensor | None = None,
        image_scale: float = 1.0,
    ) -> torch.Tensor:
        if (
            image_tokens is None
            or encoder_hidden_states is None
            or getattr(attn, "to_k_ip", None) is None
        ):
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, num_views
            )
        if attention_mask is not None:
            raise NotImplementedError("MultiViewIPAttnProcessor does not support attention masks")
        if image_tokens.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"image_tokens has {image_tokens.shape[0]} rows, hidden states "
                f"{hidden_states.shape[0]}"
            )
        query = attn.to_q(hidden_states)
        out = _attention(
            query, attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states), attn
        )
        image_tokens = image_tokens.to(query.dtype)
        out_ip = _attention(query, attn.to_k_ip(image_tokens), attn.to_v_ip(image_tokens), attn)
        out = out + image_scale * out_ip
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return out / attn.rescale_output_factor


def _attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn: Attention
) -> torch.Tensor:
    """Multi-head scaled dot-product attention of ``(b, n, H*D)`` projections."""
    b, n, inner = query.shape
    heads = attn.heads
    head_dim = inner // heads
    # (b, n, H*D) -> (b, H, n, D)
    q, k, v = (t.reshape(b, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    return out.transpose(1, 2).reshape(b, n, inner)  # (b, H, n, D) -> (b, n, H*D)


def add_image_projections(attn: Attention) -> None:
    """Give a cross-attention module ImageDream's ``to_k_ip`` / ``to_v_ip`` (no bias, as
    ``to_k`` / ``to_v``; initialised as copies of them, the IP-Adapter initialisation)."""
    for name in ("to_k", "to_v"):
        src = getattr(attn, name)
        layer = nn.Linear(src.in_features, src.out_features, bias=False)
        layer = layer.to(device=src.weight.device, dtype=src.weight.dtype)
        if src.weight.device.type != "meta":
            with torch.no_grad():
                layer.weight.copy_(src.weight)
        setattr(attn, f"{name}_ip", layer)


def accepts_image_tokens(processor) -> bool:
    """Whether an attention processor takes the ``image_tokens`` call argument."""
    return "image_tokens" in inspect.signature(processor.__call__).parameters
