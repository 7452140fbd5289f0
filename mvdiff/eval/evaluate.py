"""``mvdiff eval``: score ``mvdiff sample`` folders and write results.json + a report.

Per sample folder: reconstruction consistency (always), ground-truth agreement (with
``gt``), CLIP score (with ``clip``). Over all samples: FID / KID of the generated views
against a reference image set (with ``inception``; the reference is ``fid_reference`` or the
ground-truth views). See :class:`EvalConfig` for every setting.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from mvdiff.errors import UserError

__all__ = ["EvalConfig", "evaluate", "evaluate_views"]


@dataclass
class EvalConfig:
    #: ``mvdiff sample`` output folders
    samples: list[str] = field(default_factory=list)
    output: str = ""
    #: ground truth: one path for all samples or one per sample (shard .tar or view folder)
    gt: list[str] = field(default_factory=list)
    #: shard sample per --gt (else the samples captioned with the prompt, scored against the
    #: closest; or the only one)
    gt_uid: list[str] = field(default_factory=list)
    #: a view and its ground truth must be seen from within this angle (degrees)
    match_tolerance_deg: float = 5.0
    #: field of view assumed for cameras without one (``mvdiff sample`` stores none)
    fov: float = 40.0
    recon_steps: int = 150
    #: size views are fitted at (0 = theirs, at most 64)
    recon_resolution: int = 0
    holdout: Literal["none", "one", "all"] = "one"
    seed: int = 0
    #: local CLIPModel folder ("" = no CLIP score)
    clip: str = ""
    #: local feature network for FID/KID ("" = none; see mvdiff.eval.features)
    inception: str = ""
    #: reference images for FID/KID (folders or tars); default: the ground-truth views
    fid_reference: list[str] = field(default_factory=list)
    feature_size: int = 299
    #: value range the feature network takes: auto (uint8 for TorchScript, imagenet for
    #: torchvision), uint8 [0, 255], unit [0, 1], imagenet, symmetric [-1, 1]
    feature_input: Literal["auto", "uint8", "unit", "imagenet", "symmetric"] = "auto"
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    allow_download: bool = False
    #: torch intra-op threads (1 is fastest for these small fits on a shared CPU)
    threads: int = 1
    #: where the fits, CLIP and the feature network run: cpu, cuda, cuda:N
    device: str = "cpu"

    def validate(self) -> EvalConfig:
        if not self.samples:
            raise UserError("give at least one `mvdiff sample` folder")
        if not self.output:
            raise UserError("--output is required")
        if self.gt and len(self.gt) not in (1, len(self.samples)):
            raise UserError(f"--gt: give 1 path or one per sample ({len(self.samples)}), "
                            f"got {len(self.gt)}")  # fmt: skip
        if self.gt_uid and len(self.gt_uid) not in (1, len(self.samples)):
            raise UserError(f"--gt-uid: give 1 uid or one per sample ({len(self.samples)}), "
                            f"got {len(self.gt_uid)}")  # fmt: skip
        if self.gt_uid and not self.gt:
            raise UserError("--gt-uid needs --gt")
        if self.recon_steps < 0:
            raise UserError(f"--recon-steps must be >= 0, got {self.recon_steps}")
        if self.holdout not in ("none", "one", "all"):
            raise UserError(f"--holdout must be none, one or all, got {self.holdout!r}")
        if not 0 < self.fov < 180:
            raise UserError(f"--fov must be in (0, 180), got {self.fov}")
        if self.fid_reference and not self.inception:
            raise UserError("--fid-reference needs --inception (the feature network)")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device {self.device}: not a device (cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: CUDA is not available here")
        return self


def _per_sample(values: list[str], i: int) -> str | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else values[i]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def evaluate_views(
    sample: dict,
    *,
    gt: dict | list[dict] | None = None,
    recon_steps: int = 150,
    recon_resolution: int | None = None,
    holdout: str = "one",
    seed: int = 0,
    match_tolerance_deg: float = 5.0,
    clip=None,
    recon_config=None,
    fit_all: bool = True,
    device=None,
) -> tuple[dict, list, torch.Tensor | None]:
    """Score one set of views (a dict like :func:`mvdiff.eval.views.load_sample`'s).

    ``gt`` is one ground truth or several candidates (objects that share the prompt); with
    several, the agreement is with the closest (highest PSNR), whose uid is recorded.

    ``recon_config`` (a :class:`mvdiff.sds.config.TextTo3DConfig`) and ``fit_all`` go to
    :func:`~mvdiff.eval.consistency.reconstruction_consistency`; the fits run on ``device``
    (default: where the views are). Returns (record for
    results.json, strip rows for the report, the matched ground-truth views ``[V, 3, H, W]``
    or None).
    """
    from mvdiff.eval.consistency import gt_agreement, match_views, reconstruction_consistency
    from mvdiff.eval.views import composite_white

    rgb = sample["rgb"]
    v, _, h, _ = rgb.shape
    res = recon_resolution or min(h, 64)
    rgba = sample["rgba"] if device is None else sample["rgba"].to(device)
    cons = reconstruction_consistency(
        rgba, sample["c2w"], sample["fov_deg"], steps=recon_steps, holdout=holdout,
        resolution=res, seed=seed, config=recon_config, fit_all=fit_all,
    )  # fmt: skip
    record = {
        "name": sample["name"],
        "path": sample.get("path"),
        "prompt": sample.get("prompt", ""),
        "num_views": v,
        "resolution": h,
        "consistency": {
            k: cons[k]
            for k in (
                "psnr",
                "psnr_holdout",
                "psnr_holdout_views",
                "iou",
                "iou_holdout",
                "iou_holdout_views",
                "seconds",
            )  # fmt: skip
        },
    }
    rows = [("generated", rgb), ("reconstruction", cons["renders"])]
    gt_rgb = None
    candidates = [gt] if isinstance(gt, dict) else list(gt or [])
    best = None
    for cand in candidates:
        idx, angles = match_views(sample["c2w"], cand["c2w"])
        worst = max(angles)
        if worst > match_tolerance_deg:
            raise UserError(
                f"--gt {cand.get('source', cand.get('uid'))}: no ground-truth view within "
                f"{match_tolerance_deg}° of view {angles.index(worst)} of {sample['name']} "
                f"(nearest {worst:.1f}°); render the ground truth at the sample's cameras: "
                f"mvdiff render ASSET --cameras-from {sample.get('path') or 'SAMPLE_DIR'} "
                "--output GT_DIR"
            )
        cand_rgb = composite_white(cand["rgba"][idx])
        agree = gt_agreement(rgb, cand_rgb)
        if best is None or agree["psnr"] > best[0]["psnr"]:
            best = (agree, cand, idx, angles, cand_rgb)
    if best is not None:
        agree, cand, idx, angles, gt_rgb = best
        # several objects can share the prompt: the views are scored against the closest
        record["gt"] = {"source": cand.get("source"), "uid": cand.get("uid"),
                        "candidates": len(candidates), "views": idx,
                        "angle_deg": [round(a, 3) for a in angles], **agree}  # fmt: skip
        rows.append(("ground truth", gt_rgb))
    if clip is not None:
        scores = clip.score(rgb, sample.get("prompt", ""))
        record["clip_score"] = {"mean": float(scores.mean()), "views": scores.tolist()}
    return record, rows, gt_rgb


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Evaluate every sample folder of ``cfg``; writes the report and returns the results."""
    from tqdm.auto import tqdm

    from mvdiff.config import config_to_dict
    from mvdiff.eval.metrics import frechet_distance, kernel_inception_distance
    from mvdiff.eval.report import write_report
    from mvdiff.eval.views import load_ground_truths, load_image_set, load_sample

    cfg.validate()
    t0 = time.perf_counter()
    before = torch.get_num_threads()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    try:
        # Load everything first: a bad path fails before minutes of fitting.
        samples = [load_sample(s, cfg.fov) for s in cfg.samples]
        gts, loaded = [], {}  # samples of one prompt share their ground truth: load it once
        for i, s in enumerate(samples):
            path = _per_sample(cfg.gt, i)
            if path is None:
                gts.append(None)
                continue
            key = (path, _per_sample(cfg.gt_uid, i), s["prompt"].strip().lower())
            if key not in loaded:
                loaded[key] = load_ground_truths(path, key[1], s["prompt"], cfg.fov)
                for g in loaded[key]:
                    g["source"] = path
            gts.append(loaded[key])
        clip = None
        if cfg.clip:
            from mvdiff.eval.features import ClipScorer

            clip = ClipScorer(cfg.clip, allow_download=cfg.allow_download, device=cfg.device)
        extractor = None
        if cfg.inception:
            from mvdiff.eval.features import load_feature_extractor

            extractor = load_feature_extractor(
                cfg.inception, allow_download=cfg.allow_download,
                size=cfg.feature_size, input_mode=cfg.feature_input, device=cfg.device,
            )  # fmt: skip

        records, strips, gt_views = [], {}, []
        bar = tqdm(samples, desc="eval", disable=not progress, dynamic_ncols=True)
        for i, s in enumerate(bar):
            rec, rows, gt_rgb = evaluate_views(
                s, gt=gts[i], recon_steps=cfg.recon_steps,
                recon_resolution=cfg.recon_resolution or None, holdout=cfg.holdout,
                seed=cfg.seed, match_tolerance_deg=cfg.match_tolerance_deg, clip=clip,
                device=cfg.device,
            )  # fmt: skip
            name = rec["name"] if rec["name"] not in strips else f"{rec['name']}-{i}"
            rec["name"] = name
            records.append(rec)
            strips[name] = rows
            if gt_rgb is not None:
                gt_views.append(gt_rgb)
            bar.set_postfix(psnr=f"{rec['consistency']['psnr']:.1f}")

        summary = {
            "samples": len(records),
            "consistency_psnr": _mean(r["consistency"]["psnr"] for r in records),
            "consistency_psnr_holdout": _mean(r["consistency"]["psnr_holdout"] for r in records),
            "consistency_iou": _mean(r["consistency"]["iou"] for r in records),
            "consistency_iou_holdout": _mean(r["consistency"]["iou_holdout"] for r in records),
        }
        if any("gt" in r for r in records):
            summary["gt_psnr"] = _mean(r["gt"]["psnr"] for r in records if "gt" in r)
            summary["gt_ssim"] = _mean(r["gt"]["ssim"] for r in records if "gt" in r)
        if clip is not None:
            summary["clip_score"] = _mean(r["clip_score"]["mean"] for r in records)
        distribution = None
        if extractor is not None:
            generated = torch.cat([s["rgb"] for s in samples])  # (N*V, 3, H, W)
            if cfg.fid_reference:
                reference = torch.cat(
                    [load_image_set(p, generated.shape[-1]) for p in cfg.fid_reference]
                )
            elif gt_views:
                reference = torch.cat(gt_views)
            else:
                raise UserError("--inception: FID/KID need --fid-reference or --gt")
            if min(len(generated), len(reference)) < 2:
                raise UserError("FID/KID need at least 2 generated and 2 reference images")
            f_gen, f_ref = extractor(generated), extractor(reference)
            kid, kid_std = kernel_inception_distance(
                f_gen, f_ref, cfg.kid_subset_size, cfg.kid_subsets, cfg.seed
            )
            distribution = {
                "fid": frechet_distance(f_gen, f_ref), "kid": kid, "kid_std": kid_std,
                "generated_images": len(generated), "reference_images": len(reference),
                "feature_dim": int(f_gen.shape[1]), "extractor": extractor.source,
                "extractor_kind": extractor.kind, "feature_input": extractor.input_mode,
                "kid_subset_size": min(cfg.kid_subset_size, len(generated), len(reference)),
                "note": "FID is biased upwards for small sets; compare runs of equal size only",
            }  # fmt: skip
            summary.update(fid=distribution["fid"], kid=kid, kid_std=kid_std)
        results = {
            "format": "mvdiff-eval/1",
            "config": config_to_dict(cfg),
            "summary": summary,
            "samples": records,
            "distribution": distribution,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        paths = write_report(Path(cfg.output), results, strips)
        results["files"] = paths
        return results
    finally:
        torch.set_num_threads(before)
