"""Evaluation metrics (issue 9) on constructed cases that must order correctly, the learned-
metric code paths with tiny random weights, and ``mvdiff eval`` end to end.

Views come from :class:`mvdiff.sds.oracle.ReferenceObject` (an analytic object whose colour
differs on every side) rendered by our own volume renderer at 32², so no model is needed.
"""

import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mvdiff.cameras import get_camera, orbit_c2w
from mvdiff.eval.consistency import gt_agreement, match_views, reconstruction_consistency
from mvdiff.eval.metrics import (
    PSNR_CAP,
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    gaussian_window,
    kernel_inception_distance,
    psnr,
    ssim,
)

RES, FOV = 32, 40.0
REPO = Path(__file__).resolve().parents[1]


def ring(azimuths, elevation=15.0, fov=FOV):
    d = (math.sqrt(3) / 2) / math.sin(math.radians(fov) / 2)
    az = np.asarray(azimuths, float)
    return torch.from_numpy(orbit_c2w(np.full(len(az), elevation), az, d)).float()


def render_rgba(obj, c2w, res=RES):
    """Straight-alpha RGBA ``[V, 4, H, W]`` of an analytic object (like a shard sample)."""
    from mvdiff.sds.render import render

    with torch.no_grad():
        out = render(obj, c2w, FOV, res, 64, background=torch.zeros(3))
    a = out["opacity"]
    return torch.cat([out["rgb"] / a.clamp(min=1e-6), a], 1).clamp(0, 1)


@pytest.fixture(scope="module")
def objects():
    from mvdiff.sds.oracle import ReferenceObject

    c2w = ring([0, 90, 180, 270])
    a = render_rgba(ReferenceObject(), c2w)
    b = render_rgba(ReferenceObject(axes=(0.15, 0.45, 0.2)), c2w)
    return c2w, a, b


def over_white(rgba):
    return rgba[:, :3] * rgba[:, 3:] + (1 - rgba[:, 3:])


# ---- PSNR / SSIM -------------------------------------------------------------------------------
def test_psnr_basic_properties():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(psnr(x, x), torch.full((3,), PSNR_CAP, dtype=torch.float64))
    zero, tenth = torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.1)
    assert psnr(zero, tenth).item() == pytest.approx(20.0)  # MSE 0.01
    assert psnr(zero, tenth * 2.55, data_range=255.0).item() == pytest.approx(
        10 * math.log10(255**2 / 0.255**2)
    )
    noisy = [x + s * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
             for s in (0.01, 0.05, 0.2)]  # fmt: skip
    values = [psnr(x, n).mean().item() for n in noisy]
    assert values[0] > values[1] > values[2]
    assert torch.allclose(psnr(x, noisy[1]), psnr(noisy[1], x))


def test_gaussian_window():
    w = gaussian_window(11, 1.5)
    assert w.sum().item() == pytest.approx(1.0)
    assert torch.allclose(w, w.flip(0)) and w.argmax().item() == 5
    assert w[5] / w[6] == pytest.approx(math.exp(1 / (2 * 1.5**2)))


def test_ssim_hand_computed_constant_images():
    # Constant images a and b: every local variance / covariance is 0, so
    # SSIM = (2ab + C1) / (a^2 + b^2 + C1) * (C2 / C2).
    a, b = 0.3, 0.7
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    x = torch.full((1, 3, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 3, 16, 16), b, dtype=torch.float64)
    assert ssim(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    noise = torch.randn(x.shape, generator=g)
    values = [ssim(x, (x + s * noise).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.4)]
    assert 1 > values[0] > values[1] > values[2]
    y = (x + 0.1 * noise).clamp(0, 1)
    assert torch.allclose(ssim(x, y), ssim(y, x))
    # Structure matters beyond the mean: a shuffled image has the same histogram, low SSIM.
    shuffled = x.flatten(2)[:, :, torch.randperm(32 * 32, generator=g)].reshape(x.shape)
    assert ssim(x, shuffled).mean().item() < 0.1
    # Smaller than the window: still a value (window shrinks to the image).
    assert ssim(x[..., :7, :7], x[..., :7, :7]).mean().item() == pytest.approx(1.0)


# ---- FID / KID -------------------------------------------------------------------------------
def test_frechet_distance_matches_closed_form():
    # Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = 5.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    got = frechet_distance_from_stats(mu1, torch.diag(s1), mu2, torch.diag(s2))
    assert got == pytest.approx(expected, abs=1e-9)
    # Both rotated (full, non-diagonal covariances): FID is rotation invariant.
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    rot = frechet_distance_from_stats(q @ mu1.double(), q @ torch.diag(s1).double() @ q.t(),
                                      q @ mu2.double(), q @ torch.diag(s2).double() @ q.t())  # fmt: skip
    assert rot == pytest.approx(expected, abs=1e-8)


def test_fid_and_kid_order_constructed_gaussians():
    g = torch.Generator().manual_seed(0)
    d = 8
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)
    a = torch.randn(2000, d, generator=g) @ mix
    a2 = torch.randn(2000, d, generator=g) @ mix  # same distribution, new draw
    shifted = torch.randn(2000, d, generator=g) @ mix + 0.5
    scaled = torch.randn(2000, d, generator=g) @ (2 * mix)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    same, shift = frechet_distance(a, a2), frechet_distance(a, shifted)
    assert same < 0.05 < shift
    assert shift == pytest.approx(0.25 * d, rel=0.15)  # |mu diff|^2 dominates
    assert frechet_distance(a, scaled) > same
    mu, cov = feature_stats(a)
    assert mu.shape == (d,) and cov.shape == (d, d) and torch.allclose(cov, cov.t())
    k_same, k_same_std = kernel_inception_distance(a, a2, subset_size=200, num_subsets=20)
    k_shift, _ = kernel_inception_distance(a, shifted, subset_size=200, num_subsets=20)
    assert abs(k_same) < 3 * k_same_std + 1e-3
    assert k_shift > 10 * max(abs(k_same), 1e-4)


# ---- reconstruction consistency and ground truth -------------------------------------------
def test_reconstruction_consistency_orders_constructed_cases(objects):
    c2w, a, b = objects
    shuffled = a[[2, 0, 3, 1]]  # the right images at the wrong cameras
    different = torch.stack([a[0], b[1], a[2], b[3]])  # two objects
    kw = dict(steps=60, holdout="one", seed=0)
    same = reconstruction_consistency(a, c2w, FOV, **kw)
    shuf = reconstruction_consistency(shuffled, c2w, FOV, **kw)
    diff = reconstruction_consistency(different, c2w, FOV, **kw)
    print({k: (round(r["psnr"], 2), round(r["psnr_holdout"], 2), round(r["iou_holdout"], 3))
           for k, r in (("same", same), ("shuffled", shuf), ("different", diff))})  # fmt: skip
    assert same["psnr_holdout"] > shuf["psnr_holdout"] + 3
    assert same["psnr_holdout"] > diff["psnr_holdout"] + 3
    assert same["psnr"] > shuf["psnr"] and same["psnr"] > diff["psnr"]
    assert same["renders"].shape == (4, 3, RES, RES) and len(same["psnr_holdout_views"]) == 1
    # silhouettes: one object explains its own outlines, not those of two different objects
    assert same["iou_holdout"] > 0.8 and same["iou"] > 0.8
    assert same["iou_holdout"] > shuf["iou_holdout"] + 0.1
    assert same["iou_holdout"] > diff["iou_holdout"] + 0.03  # view 3 is b's too: a milder case
    assert len(same["iou_holdout_views"]) == 1


def test_silhouette_iou():
    from mvdiff.sds.recon import silhouette_iou

    a = torch.zeros(1, 1, 8, 8)
    a[..., 2:6, 2:6] = 1.0  # 16 pixels
    b = torch.zeros_like(a)
    b[..., 2:6, 4:8] = 0.9  # 16 pixels, 8 shared
    assert silhouette_iou(a, a) == 1.0
    assert silhouette_iou(a, b) == pytest.approx(8 / 24)
    assert silhouette_iou(a, torch.zeros_like(a)) == 0.0
    assert silhouette_iou(torch.zeros_like(a), torch.zeros_like(a)) == 1.0  # nothing to miss
    assert silhouette_iou(a, b * 0.5) == 0.0  # 0.45 is below the 0.5 threshold


def test_match_views_and_gt_agreement_order(objects):
    c2w, a, b = objects
    gt_c2w = ring(np.arange(8) * 45.0)  # ground truth rendered on a finer ring
    idx, angles = match_views(c2w, gt_c2w)
    assert idx == [0, 2, 4, 6] and max(angles) < 1e-3
    _, off = match_views(ring([10, 100, 190, 280]), gt_c2w)
    el, daz = math.radians(15.0), math.radians(10.0)  # same elevation, azimuth off by 10°
    expected = math.degrees(math.acos(math.cos(el) ** 2 * math.cos(daz) + math.sin(el) ** 2))
    assert off == pytest.approx([expected] * 4, abs=1e-3)
    gt = over_white(a)
    same = gt_agreement(gt, gt)
    shuf = gt_agreement(gt[[2, 0, 3, 1]], gt)
    other = gt_agreement(over_white(b), gt)
    assert same["psnr"] == pytest.approx(PSNR_CAP) and same["ssim"] == pytest.approx(1.0)
    assert same["psnr"] > shuf["psnr"] and same["psnr"] > other["psnr"]
    assert same["ssim"] > shuf["ssim"] and same["ssim"] > other["ssim"]
    # ground truth at another size is resized
    big = torch.nn.functional.interpolate(gt, scale_factor=2, mode="nearest")
    assert gt_agreement(gt, big)["psnr"] > 40


# ---- learned metrics: local weights only ----------------------------------------------------
class TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x))  # spatial: the extractor pools it


def test_feature_extractor_torchscript_and_no_pickle(tmp_path):
    from mvdiff.errors import UserError
    from mvdiff.eval.features import load_feature_extractor

    ts = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(TinyFeatures()), str(ts))
    fx = load_feature_extractor(str(ts), size=32)
    x = torch.rand(5, 3, 20, 20)
    f = fx(x)
    assert fx.kind == "torchscript" and f.shape == (5, 8)
    assert torch.allclose(f, fx(x))
    pickled = tmp_path / "module.pt"
    torch.save(TinyFeatures(), pickled)
    with pytest.raises(UserError, match="pickled nn.Module is not loaded"):
        load_feature_extractor(str(pickled))
    with pytest.raises(UserError, match="no such file"):
        load_feature_extractor(str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="--allow-download"):
        load_feature_extractor("torchvision")


def tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_clip_score_local_folder(tmp_path):
    from mvdiff.errors import UserError
    from mvdiff.eval.features import ClipScorer

    scorer = ClipScorer(str(tiny_clip(tmp_path / "clip")))
    images = torch.rand(3, 3, 48, 48)
    s = scorer.score(images, "a red cube")
    assert s.shape == (3,) and bool(((s >= 0) & (s <= 100)).all())
    assert torch.allclose(s, scorer.score(images, ["a red cube"] * 3))
    with pytest.raises(UserError, match="--allow-download"):
        ClipScorer("openai/clip-vit-base-patch32")


# ---- mvdiff eval end to end -------------------------------------------------------------------
def write_sample_folder(folder: Path, rgb: torch.Tensor, prompt: str) -> Path:
    """What `mvdiff sample` writes: view_XX.png, cameras.json, settings.json (RGB views)."""
    from PIL import Image

    from mvdiff.commands.sample import SampleSettings, cameras_record

    folder.mkdir(parents=True)
    s = SampleSettings(prompt=prompt, num_views=rgb.shape[0], height=RES, width=RES)
    record = cameras_record(s, get_camera(rgb.shape[0], s.elevation))
    for view, im in zip(record["views"], rgb):
        arr = (im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()  # (3,H,W) -> (H,W,3)
        Image.fromarray(arr).save(folder / view["file"])
    (folder / "cameras.json").write_text(json.dumps(record))
    (folder / "settings.json").write_text(json.dumps({"settings": {"prompt": prompt}}))
    return folder


def write_gt_shard(path: Path, samples: dict) -> Path:
    from mvdiff.data.shards import write_multiview_sample

    with tarfile.open(path, "w") as tar:
        for uid, (rgba, c2w, caption) in samples.items():
            arr = (
                (rgba.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
            )  # (V,4,H,W) -> (V,H,W,4)
            meta = {"caption": caption, "fov_deg": [FOV] * len(arr)}
            write_multiview_sample(tar, uid, arr, c2w.numpy(), meta)
    return path


def test_eval_cli_end_to_end(tmp_path, objects, capsys, monkeypatch):
    import mvdiff.eval.views as views
    from mvdiff.cli import main

    loads = []
    real_load = views.load_ground_truths
    monkeypatch.setattr(views, "load_ground_truths", lambda *a: loads.append(a) or real_load(*a))

    c2w, a, b = objects
    write_sample_folder(tmp_path / "samples" / "good", over_white(a), "an egg")
    write_sample_folder(tmp_path / "samples" / "bad", over_white(a[[2, 0, 3, 1]]), "an egg")
    shard = write_gt_shard(tmp_path / "gt.tar", {"egg": (a, c2w, "an egg"),
                                                  "stick": (b, c2w, "a stick")})  # fmt: skip
    ts = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(TinyFeatures()), str(ts))
    clip = tiny_clip(tmp_path / "clip")
    out = tmp_path / "report"
    code = main(["eval", str(tmp_path / "samples"), "--output", str(out), "--gt", str(shard),
                 "--recon-steps", "40", "--clip", str(clip), "--inception", str(ts),
                 "--feature-size", "32", "--kid-subset-size", "4", "--kid-subsets", "3"])  # fmt: skip
    assert code == 0
    assert len(loads) == 1  # both samples have the prompt "an egg": its ground truth loads once
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((out / "results.json").read_text())
    assert printed["summary"] == results["summary"]
    recs = {r["name"]: r for r in results["samples"]}
    assert set(recs) == {"good", "bad"}
    assert recs["good"]["gt"]["uid"] == "egg" and recs["good"]["gt"]["views"] == [0, 1, 2, 3]
    assert recs["good"]["gt"]["psnr"] > recs["bad"]["gt"]["psnr"] + 3
    assert recs["good"]["gt"]["ssim"] > recs["bad"]["gt"]["ssim"]
    assert recs["good"]["consistency"]["psnr_holdout"] > recs["bad"]["consistency"]["psnr_holdout"]
    assert 0 <= recs["good"]["clip_score"]["mean"] <= 100
    s = results["summary"]
    assert s["fid"] >= 0 and math.isfinite(s["kid"]) and s["samples"] == 2
    assert results["distribution"]["generated_images"] == 8
    for name in ("report.html", "report.png", "strips/good.png", "strips/bad.png"):
        assert (out / name).is_file(), name
    assert "strips/good.png" in (out / "report.html").read_text()


def test_ground_truth_shared_caption_scores_the_closest(tmp_path, objects):
    """Two objects share the prompt: every one is a candidate and the views are scored
    against the closest, whichever the shard lists first."""
    from mvdiff.eval.evaluate import evaluate_views
    from mvdiff.eval.report import write_report
    from mvdiff.eval.views import load_ground_truth, load_ground_truths

    c2w, a, b = objects
    shard = write_gt_shard(tmp_path / "gt.tar", {"stick": (b, c2w, "An object"),
                                                  "egg": (a, c2w, "an object"),
                                                  "other": (a, c2w, "a cup")})  # fmt: skip
    cands = load_ground_truths(shard, prompt="an object", fov_deg=FOV)
    assert [g["uid"] for g in cands] == ["stick", "egg"]
    assert load_ground_truth(shard, prompt="an object", fov_deg=FOV)["uid"] == "stick"
    assert [g["uid"] for g in load_ground_truths(shard, uid="egg", fov_deg=FOV)] == ["egg"]
    sample = {"name": "s", "rgb": over_white(a), "rgba": a, "c2w": c2w,
              "fov_deg": torch.full((4,), FOV)}  # fmt: skip
    for gt, uid in ((cands, "egg"), (cands[::-1], "egg"), (cands[0], "stick")):
        rec, rows, gt_rgb = evaluate_views(sample, gt=gt, recon_steps=0, holdout="none")
        assert rec["gt"]["uid"] == uid and rows[-1][0] == "ground truth"
    assert rec["gt"]["candidates"] == 1 and rec["gt"]["psnr"] < 40
    rec, rows, gt_rgb = evaluate_views(sample, gt=cands, recon_steps=0, holdout="none")
    assert rec["gt"]["candidates"] == 2 and rec["gt"]["psnr"] > 40
    assert torch.allclose(gt_rgb, over_white(a), atol=1 / 255)
    write_report(tmp_path / "report", {"summary": {}, "samples": [rec]}, {"s": rows})
    assert "closest of 2: egg" in (tmp_path / "report" / "report.html").read_text()


def test_eval_cli_errors(tmp_path, objects, capsys):
    from mvdiff.cli import main

    c2w, a, _ = objects
    assert main(["eval", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "not a folder" in capsys.readouterr().err
    sample = write_sample_folder(tmp_path / "s", over_white(a), "an egg")
    shard = write_gt_shard(tmp_path / "gt.tar", {"x": (a[:2], c2w[:2], "something else"),
                                                  "y": (a, c2w, "another")})  # fmt: skip
    assert main(["eval", str(sample), "--output", str(tmp_path / "o"), "--gt", str(shard)]) == 2
    assert "--gt-uid" in capsys.readouterr().err
    code = main(["eval", str(sample), "--output", str(tmp_path / "o"), "--gt", str(shard),
                 "--gt-uid", "x", "--recon-steps", "1", "--holdout", "none"])  # fmt: skip
    assert code == 2
    assert "no ground-truth view within" in capsys.readouterr().err
    assert main(["eval", str(sample), "--output", str(tmp_path / "o"), "--holdout", "some"]) == 2


@pytest.mark.slow
def test_learning_check_quick(tmp_path):
    """benchmarks/learning_check.py --quick runs and prints one JSON line with every variant."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "learning_check.py"), "--quick",
         "--work-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "learning_check" and result["quick"] is True
    assert (tmp_path / "comparison.png").stat().st_size > 0
    assert (tmp_path / "report" / "report.html").exists()
    for variant in ("full", "no_3d_attention", "no_camera"):
        stats = result["variants"][variant]
        for key in ("consistency_psnr", "consistency_psnr_holdout", "gt_psnr", "gt_ssim"):
            assert math.isfinite(stats[key]["mean"]), (variant, key)
