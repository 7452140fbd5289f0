"""Evaluation of multi-view generation (issue 9): metrics, inputs and the report.

* :mod:`mvdiff.eval.metrics` — PSNR, SSIM, FID, KID as pure functions on tensors;
* :mod:`mvdiff.eval.consistency` — reconstruction consistency (one radiance field fitted to
  the views at their cameras) and ground-truth agreement;
* :mod:`mvdiff.eval.features` — CLIP score and FID/KID feature networks from local weights;
* :mod:`mvdiff.eval.views` — ``mvdiff sample`` folders, ground truth, image sets;
* :mod:`mvdiff.eval.evaluate` — :func:`evaluate` behind ``mvdiff eval``;
* :mod:`mvdiff.eval.report` — results.json, strips, report.html / report.png.
"""

from mvdiff.eval.consistency import (
    gt_agreement,
    match_views,
    reconstruction_consistency,
)
from mvdiff.eval.evaluate import EvalConfig, evaluate, evaluate_views
from mvdiff.eval.metrics import (
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    psnr,
    ssim,
)

__all__ = [
    "EvalConfig",
    "evaluate",
    "evaluate_views",
    "frechet_distance",
    "frechet_distance_from_stats",
    "gt_agreement",
    "kernel_inception_distance",
    "match_views",
    "psnr",
    "reconstruction_consistency",
    "ssim",
]
