"""Winograd 3x3 convolutions for CPU inference (NNPACK), used for the VAE decode.

On a CPU the Stable Diffusion VAE decoder is dominated by 3x3 convolutions at full image
resolution (~0.6 TFLOP per 256x256 view); PyTorch runs them through oneDNN's direct
convolution. NNPACK, which PyTorch's CPU builds ship, computes them with Winograd transforms
(fewer multiplications) and is ~2x faster on one image at a time for a ~1e-5 relative
difference. PyTorch only picks NNPACK for batches of 16 or more on mobile builds, so we call
it ourselves -- through ``torch._nnpack_spatial_convolution``, a private op with no stability
promise, which is why :class:`mvdiff.pipelines.MVDreamPipeline` uses this only when asked
(``pipe.winograd_decode = True``; default off).

:func:`use_winograd_convs` turns the eligible ``nn.Conv2d`` layers of a module into
:class:`WinogradConv2d` in place (same parameters, same state dict); the fast path is taken
only for float32 CPU inputs without autograd, anything else runs the normal convolution.
"""

from __future__ import annotations

import torch
from torch import nn


def winograd_available() -> bool:
    """NNPACK is built into this PyTorch and still exposes the (private, unversioned) op the
    fast path calls; when either is missing the swap is a no-op."""
    op = getattr(torch, "_nnpack_spatial_convolution", None)
    return bool(torch.backends.nnpack.is_available()) and callable(op)


class WinogradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (3x3, stride 1, no dilation/groups, zero padding) via NNPACK on CPU."""

    def _conv_forward(self, input, weight, bias):
        grad = torch.is_grad_enabled() and (
            input.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        )
        if input.device.type != "cpu" or input.dtype != torch.float32 or input.dim() != 4 or grad:
            return super()._conv_forward(input, weight, bias)
        weight = weight.contiguous()
        padding = list(self.padding)  # (top/bottom, left/right)
        # NNPACK's fast inference path takes one image: (N, C, H, W) -> N x (1, C, H, W).
        out = [
            torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, padding)
            for x in input.split(1)
        ]
        return torch.cat(out)  # N x (1, C', H', W') -> (N, C', H', W')


def _eligible(m: nn.Module) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.kernel_size == (3, 3)
        and m.stride == (1, 1)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.padding_mode == "zeros"
        and isinstance(m.padding, tuple)
    )


def use_winograd_convs(module: nn.Module, enable: bool = True) -> int:
    """Switch the eligible 3x3 convolutions of ``module`` to (or back from) NNPACK Winograd.

    Idempotent; returns how many layers are now :class:`WinogradConv2d`. Without NNPACK in
    this PyTorch build nothing changes and 0 is returned.
    """
    enable = enable and winograd_available()
    n = 0
    for m in module.modules():
        if enable and _eligible(m):
            m.__class__ = WinogradConv2d  # same attributes and parameters, another forward
        elif not enable and type(m) is WinogradConv2d:
            m.__class__ = nn.Conv2d
        n += type(m) is WinogradConv2d
    return n
