"""Image and distribution metrics as pure functions on tensors (no weights, no I/O).

* :func:`psnr` and :func:`ssim` compare images ``[N, C, H, W]`` with values in ``[0, data_range]``
  (SSIM of Wang et al. 2004: gaussian window 11x11, sigma 1.5, K1 0.01, K2 0.03, computed on
  the valid part of the image, averaged over channels and pixels).
* :func:`frechet_distance` (FID when the features are Inception pool features) and
  :func:`kernel_inception_distance` (KID: unbiased MMD^2 with the cubic polynomial kernel,
  averaged over random subsets) compare two sets of feature vectors ``[N, D]``.

Everything is computed in float64 where precision matters (covariances, matrix roots).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "PSNR_CAP",
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gaussian_window",
    "kernel_inception_distance",
    "mse",
    "psnr",
    "ssim",
]

#: PSNR of identical images is infinite; reported values are capped here (dB).
PSNR_CAP = 100.0


def _check_pair(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected [N, C, H, W] images, got {tuple(x.shape)}")


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error ``[N]`` of ``[N, C, H, W]`` images."""
    _check_pair(x, y, "mse")
    return (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR ``[N]`` in dB, ``10 log10(range^2 / MSE)``, capped at :data:`PSNR_CAP`."""
    err = mse(x, y)
    floor = data_range**2 * 10 ** (-PSNR_CAP / 10)
    return 10.0 * torch.log10(data_range**2 / err.clamp(min=floor))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1D gaussian ``[size]`` (float64), centred on the middle tap."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(img: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' gaussian filtering of ``[N, C, H, W]`` per channel."""
    c = img.shape[1]
    k = win.numel()
    wx = win.reshape(1, 1, 1, k).expand(c, 1, 1, k)  # (k,) -> (C, 1, 1, k): horizontal taps
    wy = win.reshape(1, 1, k, 1).expand(c, 1, k, 1)  # (k,) -> (C, 1, k, 1): vertical taps
    return F.conv2d(F.conv2d(img, wx, groups=c), wy, groups=c)


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    window: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image structural similarity ``[N]`` of ``[N, C, H, W]`` images (1 = identical).

    Local means, variances and covariance come from a gaussian window (``window`` taps,
    ``sigma``); the SSIM map ``((2 mx my + C1)(2 sxy + C2)) / ((mx^2 + my^2 + C1)(sx^2 + sy^2
    + C2))`` with ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` is averaged over the pixels where the
    window fits entirely and over channels. Images smaller than the window use a window as
    large as the image (odd) so that small renders still get a value.
    """
    _check_pair(x, y, "ssim")
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    win = gaussian_window(size, sigma).to(x.device)
    x, y = x.double(), y.double()
    mx, my = _filter(x, win), _filter(y, win)
    sxx = _filter(x * x, win) - mx * mx
    syy = _filter(y * y, win) - my * my
    sxy = _filter(x * y, win) - mx * my
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx * mx + my * my + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=(1, 2, 3))


# ---- distributions of features --------------------------------------------------------------
def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of features ``[N, D]``."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N>=2, D], got {tuple(features.shape)}")
    f = features.double()
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.t() @ centred / (f.shape[0] - 1)


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix."""
    vals, vecs = torch.linalg.eigh((m + m.t()) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.t()


def frechet_distance_from_stats(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """``|mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2))`` of two gaussians.

    ``tr((cov1 cov2)^(1/2))`` is computed as ``sum sqrt(eig(s cov2 s))`` with ``s = cov1^(1/2)``:
    ``s cov2 s`` is symmetric PSD and similar to ``cov1 cov2``, so no complex roots appear.
    """
    mu1, mu2, cov1, cov2 = (t.double() for t in (mu1, mu2, cov1, cov2))
    s = _sqrt_psd(cov1)
    middle = s @ cov2 @ s
    eig = torch.linalg.eigvalsh((middle + middle.t()) / 2).clamp(min=0)
    tr_sqrt = eig.sqrt().sum()
    d = float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)
    return max(d, 0.0)


def frechet_distance(features1: torch.Tensor, features2: torch.Tensor) -> float:
    """Fréchet distance between gaussians fitted to two feature sets ``[N, D]`` (FID)."""
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"feature sizes differ: {features1.shape[1]} vs {features2.shape[1]}")
    return frechet_distance_from_stats(*feature_stats(features1), *feature_stats(features2))


def _poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a . b / D + 1)^3`` for rows of ``a`` ``[n, D]`` and ``b`` ``[m, D]`` -> ``[n, m]``."""
    return (a @ b.t() / a.shape[1] + 1.0) ** 3


def kernel_inception_distance(
    features1: torch.Tensor,
    features2: torch.Tensor,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """KID: (mean, std) over random subsets of the unbiased MMD^2 with the cubic kernel.

    Each subset draws ``min(subset_size, N1, N2)`` rows from each set without replacement.
    The unbiased estimator drops the diagonal of the within-set kernel matrices, so two
    samples of the same distribution give values around 0 (slightly negative is possible).
    """
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"feature sizes differ: {features1.shape[1]} vs {features2.shape[1]}")
    n = min(subset_size, features1.shape[0], features2.shape[0])
    if n < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    gen = torch.Generator().manual_seed(seed)
    f1, f2 = features1.double(), features2.double()
    values = []
    for _ in range(num_subsets):
        a = f1[torch.randperm(f1.shape[0], generator=gen)[:n]]
        b = f2[torch.randperm(f2.shape[0], generator=gen)[:n]]
        kaa, kbb, kab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
        within = (kaa.sum() - kaa.diagonal().sum() + kbb.sum() - kbb.diagonal().sum()) / (
            n * (n - 1)
        )
        values.append(float(within - 2 * kab.mean()))
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return float(t.mean()), (0.0 if math.isnan(std) else std)
