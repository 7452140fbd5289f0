"""The one attention processor of the multi-view UNet.

Self-attention (``attn1``, no ``encoder_hidden_states``) joins all views of an object: the
hidden states ``(B*V, L, C)`` are viewed as ``(B, V*L, C)`` for the attention and back after.
Cross-attention (``attn2``) stays per view. ``num_views`` is a call argument, so the same
weights serve 1 (plain 2D Stable Diffusion), 4, 8 ... views at any resolution.

Attention runs through PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient
kernels where available); xformers is used only when installed and the tensors are on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

try:  # optional extra
    import xformers.ops as _xops
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _xops = None


class MultiViewAttnProcessor:
    """Joined-view self-attention, per-view cross-attention, via SDPA (or xformers on CUDA).

    Supports the plain diffusers ``Attention`` used in SD 1.x/2.x transformer blocks (no
    spatial/group norm, no attention mask, no residual inside the attention).
    """

    def __init__(self, use_xformers: bool | None = None):
        self.use_xformers = use_xformers

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        num_views: int = 1,
    ) -> torch.Tensor:
        if attention_mask is not None:
            raise NotImplementedError("MultiViewAttnProcessor does not support attention masks")
        is_self = encoder_hidden_states is None
        bv, length, channels = hidden_states.shape
        if is_self and num_views > 1:
            if bv % num_views:
                raise ValueError(f"batch of {bv} rows is not a multiple of num_views={num_views}")
            # (B*V, L, C) -> (B, V*L, C): all views of one object attend to each other.
            hidden_states = hidden_states.reshape(bv // num_views, num_views * length, channels)
        context = hidden_states if is_self else encoder_hidden_states

        if is_self and _plain_linears(attn.to_q, attn.to_k, attn.to_v):
            # One matmul for q, k and v (the weights are tiny next to the activations). Only
            # for plain nn.Linear: a wrapped projection (e.g. a peft LoRA layer) must be called.
            weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])
            bias = None
            if attn.to_q.bias is not None:
                bias = torch.cat([attn.to_q.bias, attn.to_k.bias, attn.to_v.bias])
            query, key, value = F.linear(hidden_states, weight, bias).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(context)
            value = attn.to_v(context)

        b, n, inner = query.shape
        heads = attn.heads
        head_dim = inner // heads
        if self._xformers_ok(query):
            # (b, n, H*D) -> (b, n, H, D), the layout xformers wants
            q, k, v = (t.reshape(b, -1, heads, head_dim) for t in (query, key, value))
            out = _xops.memory_efficient_attention(q, k, v, scale=attn.scale)
            out = out.reshape(b, n, inner)  # (b, n, H, D) -> (b, n, H*D)
        else:
            # (b, n, H*D) -> (b, H, n, D)
            q, k, v = (
                t.reshape(b, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value)
            )
            out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            out = out.transpose(1, 2).reshape(b, n, inner)  # (b, H, n, D) -> (b, n, H*D)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if is_self and num_views > 1:
            # (B, V*L, C) -> (B*V, L, C)
            out = out.reshape(bv, length, channels)
        return out / attn.rescale_output_factor

    def _xformers_ok(self, t: torch.Tensor) -> bool:
        if _xops is None or t.device.type != "cuda":
            return False
        return self.use_xformers is not False


def _plain_linears(*layers: nn.Module) -> bool:
    """True when every layer is exactly ``nn.Linear`` with the same weight shape."""
    return all(type(m) is nn.Linear for m in layers) and len({m.weight.shape for m in layers}) == 1
