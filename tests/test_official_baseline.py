"""The benchmark's stand-in for the official model really is the official model."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from official_unet import OfficialMultiViewUNet  # noqa: E402

from mvdiff.convert import build_unet  # noqa: E402


@pytest.mark.parametrize("case", ["case_mv", "case_2d", "case_mv_nocam"])
def test_baseline_reproduces_official_reference(reference, reference_unet_sd, case):
    tensors, meta = reference
    model = OfficialMultiViewUNet(**meta["unet_config_official_names"]).eval()
    model.load_state_dict(reference_unet_sd, strict=True)
    with torch.no_grad():
        out = model(
            tensors[f"{case}.x"],
            tensors[f"{case}.timesteps"],
            tensors[f"{case}.context"],
            camera=tensors.get(f"{case}.camera"),
            num_frames=meta["num_views"][case],
        )
    assert (out - tensors[f"{case}.out"]).abs().max() <= 1e-4


def test_baseline_and_mvdiff_agree_on_gradients(reference, reference_unet_sd):
    tensors, meta = reference
    params = meta["unet_config_official_names"]
    official = OfficialMultiViewUNet(**params)
    official.load_state_dict(reference_unet_sd)
    ours = build_unet({k: v.clone() for k, v in reference_unet_sd.items()}, params)
    args = (tensors["case_mv.x"], tensors["case_mv.timesteps"], tensors["case_mv.context"])
    official(*args, camera=tensors["case_mv.camera"], num_frames=4).square().mean().backward()
    ours(*args, camera=tensors["case_mv.camera"], num_views=4).sample.square().mean().backward()
    g_off = official.camera_embed[0].weight.grad
    g_ours = ours.class_embedding.linear_1.weight.grad
    torch.testing.assert_close(g_ours, g_off, atol=1e-5, rtol=1e-4)
