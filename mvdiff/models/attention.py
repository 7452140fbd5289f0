"""The one attention processor of the multi-view UNet.

Self-attention (``attn1``, no ``encoder_hidden_states``) joins all views of an object: the
hidden states ``(B*V, L, C)`` are viewed as ``(B, V*L, C)`` for the attention and back after.
Cross-attention (``attn2``) stays per view. ``num_views`` is a call argument, so the same
weights serve 1 (plain 2D Stable Diffusion), 4, 8 ... views at any resolution.

Attention runs through PyTorch's ``scaled_dot_product_attention`` (flash / memory-efficient
kernels where available); xformers is used only when installed and the tensors are on CUDA,
and an xformers build that fails when called (e.g. compiled for another torch) falls back to
SDPA for the rest of the process, with one warning.

The switches users reach for — ``pipe.enable_attention_slicing()``,
``pipe.enable_xformers_memory_efficient_attention()``, ``unet.set_attn_processor(
AttnProcessor2_0())``, ``unet.set_default_attn_processor()``, ``fuse_qkv_projections()`` —
all end in ``Attention.set_processor``. The multi-view UNet's attention layers are
:class:`MultiViewAttention`, whose ``set_processor`` turns diffusers' stock processors into the
equivalent :class:`MultiViewAttnProcessor` (slicing, xformers or SDPA with the views still
joined) and refuses, with one ``ValueError`` line, any other processor on a self-attention
layer (it would silently stop the views from seeing each other).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from diffusers.models import attention_processor as ap
from diffusers.models.attention_processor import Attention
from torch import nn

try:  # optional extra
    import xformers.ops as _xops
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _xops = None

log = logging.getLogger(__name__)

#: devices xformers kernels run on
_XFORMERS_DEVICES = ("cuda",)
#: set when an xformers call failed once: SDPA from then on
_xformers_broken = False


class MultiViewAttnProcessor:
    """Joined-view self-attention, per-view cross-attention, via SDPA (or xformers on CUDA).

    Supports the plain diffusers ``Attention`` used in SD 1.x/2.x transformer blocks (no
    spatial/group norm, no attention mask, no residual inside the attention).
    """

    def __init__(
        self,
        use_xformers: bool | None = None,
        slice_size: int | None = None,
        attention_op=None,
    ):
        #: None: xformers when available on the tensors' device; False: never; True: preferred
        self.use_xformers = use_xformers
        #: attention in chunks of this many (row, head) pairs (``enable_attention_slicing``)
        self.slice_size = slice_size
        #: xformers operator (``enable_xformers_memory_efficient_attention(attention_op)``)
        self.attention_op = attention_op

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
        out = None
        if self._xformers_ok(query):
            # (b, n, H*D) -> (b, n, H, D), the layout xformers wants
            q, k, v = (t.reshape(b, -1, heads, head_dim) for t in (query, key, value))
            out = _xformers_attention(q, k, v, attn.scale, self.attention_op)
            if out is not None:
                out = out.reshape(b, n, inner)  # (b, n, H, D) -> (b, n, H*D)
        if out is None:
            # (b, n, H*D) -> (b, H, n, D)
            q, k, v = (
                t.reshape(b, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value)
            )
            if self.slice_size:
                out = _sliced_sdpa(q, k, v, attn.scale, self.slice_size)
            else:
                out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
            out = out.transpose(1, 2).reshape(b, n, inner)  # (b, H, n, D) -> (b, n, H*D)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if is_self and num_views > 1:
            # (B, V*L, C) -> (B*V, L, C)
            out = out.reshape(bv, length, channels)
        return out / attn.rescale_output_factor

    def _xformers_ok(self, t: torch.Tensor) -> bool:
        if _xops is None or _xformers_broken or t.device.type not in _XFORMERS_DEVICES:
            return False
        return self.use_xformers is not False


def _xformers_attention(q, k, v, scale, op):
    """xformers' memory-efficient attention, or None (and SDPA from then on) if it fails."""
    global _xformers_broken
    try:
        return _xops.memory_efficient_attention(q, k, v, scale=scale, op=op)
    except Exception as e:  # noqa: BLE001 - a mismatched build fails in many ways
        _xformers_broken = True
        log.warning("xformers failed (%s: %s); using PyTorch SDPA from now on", type(e).__name__, e)
        return None


def _sliced_sdpa(q, k, v, scale, slice_size: int) -> torch.Tensor:
    """SDPA over chunks of ``slice_size`` (row, head) pairs; ``q`` ``(b, H, n, D)``."""
    b, h, n, d = q.shape
    # (b, H, n, D) -> (b*H, n, D)
    q, k, v = (t.reshape(b * h, t.shape[2], d) for t in (q, k, v))
    out = torch.cat(
        [
            F.scaled_dot_product_attention(
                q[i : i + slice_size], k[i : i + slice_size], v[i : i + slice_size], scale=scale
            )
            for i in range(0, b * h, slice_size)
        ]
    )
    return out.reshape(b, h, n, d)  # (b*H, n, D) -> (b, H, n, D)


#: diffusers processors that compute plain attention: mapped onto MultiViewAttnProcessor
_PLAIN = tuple(
    getattr(ap, name)
    for name in ("AttnProcessor", "AttnProcessor2_0", "FusedAttnProcessor2_0")
    if hasattr(ap, name)
)


def joined_processor(processor, attn: Attention):
    """The processor ``attn`` gets when asked for ``processor`` (see module docstring). A stock
    processor is translated into the layer's own multi-view processor class, so a subclass
    (the image-prompt processor of attention_ip.py) keeps its extra terms."""
    if isinstance(processor, MultiViewAttnProcessor):
        return processor
    current = getattr(attn, "processor", None)
    cls = type(current) if isinstance(current, MultiViewAttnProcessor) else MultiViewAttnProcessor
    if isinstance(processor, ap.SlicedAttnProcessor):
        return cls(slice_size=processor.slice_size)
    if isinstance(processor, ap.XFormersAttnProcessor):
        return cls(use_xformers=True, attention_op=processor.attention_op)
    if type(processor) in _PLAIN:
        return cls(use_xformers=False)
    if getattr(attn, "is_cross_attention", False):
        return processor  # per-view anyway: custom cross-attention processors are fine
    raise ValueError(
        f"{type(processor).__name__} on a multi-view self-attention layer would stop the views "
        "from seeing each other; use mvdiff.models.MultiViewAttnProcessor (use_xformers, "
        "slice_size) instead"
    )


class MultiViewAttention(Attention):
    """diffusers' ``Attention`` whose processor setter keeps the views joined
    (:func:`joined_processor`). The multi-view UNet re-classes its attention layers to it."""

    def set_processor(self, processor) -> None:
        super().set_processor(joined_processor(processor, self))


def _plain_linears(*layers: nn.Module) -> bool:
    """True when every layer is exactly ``nn.Linear`` with the same weight shape."""
    return all(type(m) is nn.Linear for m in layers) and len({m.weight.shape for m in layers}) == 1
