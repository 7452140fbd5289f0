import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from mvdiff.convert import build_unet
from mvdiff.models import MultiViewAttnProcessor, MultiViewUNet2DConditionModel, add_camera_mlp
from mvdiff.testing import tiny_unet


def _inputs(b=2, v=4, h=8, w=8, seed=0, ctx_dim=32):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b * v, 4, h, w, generator=g),
        torch.randint(0, 1000, (b,), generator=g).repeat_interleave(v),
        torch.randn(b * v, 7, ctx_dim, generator=g),
        torch.randn(b * v, 16, generator=g),
    )


@pytest.mark.parametrize("case", ["case_mv", "case_2d", "case_mv_nocam"])
def test_parity_with_official_reference(reference, reference_unet_sd, case):
    tensors, meta = reference
    unet = build_unet(reference_unet_sd, meta["unet_config_official_names"]).eval()
    with torch.no_grad():
        out = unet(
            tensors[f"{case}.x"],
            tensors[f"{case}.timesteps"],
            tensors[f"{case}.context"],
            camera=tensors.get(f"{case}.camera"),
            num_views=meta["num_views"][case],
        ).sample
    err = (out - tensors[f"{case}.out"]).abs().max().item()
    assert err <= 1e-4, err


def test_one_view_equals_stock_diffusers_unet():
    unet = tiny_unet(camera=False).eval()
    stock = UNet2DConditionModel.from_config(unet.config)
    stock.load_state_dict(unet.state_dict())
    stock.set_attn_processor(AttnProcessor2_0())
    x, t, ctx, _ = _inputs(b=3, v=1)
    with torch.no_grad():
        ours = unet(x, t, ctx, num_views=1).sample
        ref = stock(x, t, ctx).sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_views_of_different_objects_never_mix():
    unet = tiny_unet().eval()
    x, t, ctx, cam = _inputs(b=2, v=4)
    with torch.no_grad():
        base = unet(x, t, ctx, camera=cam, num_views=4).sample
        x2 = x.clone()
        x2[5] += 1.0  # a view of object 2
        out = unet(x2, t, ctx, camera=cam, num_views=4).sample
    torch.testing.assert_close(out[:4], base[:4], atol=0, rtol=0)  # object 1 untouched
    assert (out[4:] - base[4:]).abs().amax(
        dim=(1, 2, 3)
    ).min() > 1e-4  # every view of object 2 moved


def test_views_of_one_object_do_attend_to_each_other():
    unet = tiny_unet().eval()
    x, t, ctx, cam = _inputs(b=1, v=4)
    with torch.no_grad():
        base = unet(x, t, ctx, camera=cam, num_views=4).sample
        x2 = x.clone()
        x2[3] += 1.0
        out = unet(x2, t, ctx, camera=cam, num_views=4).sample
        per_view = unet(x2, t, ctx, camera=cam, num_views=1).sample
        per_view_base = unet(x, t, ctx, camera=cam, num_views=1).sample
    assert (out[0] - base[0]).abs().max() > 1e-4
    torch.testing.assert_close(per_view[0], per_view_base[0], atol=0, rtol=0)


def test_camera_none_skips_the_camera_mlp():
    unet = tiny_unet().eval()
    x, t, ctx, cam = _inputs(b=1, v=4)
    with torch.no_grad():
        a = unet(x, t, ctx, camera=None, num_views=4).sample
        unet.class_embedding.linear_2.bias.add_(10.0)  # would change the output if the MLP ran
        b = unet(x, t, ctx, camera=None, num_views=4).sample
        c = unet(x, t, ctx, camera=cam, num_views=4).sample
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3


def test_without_camera_the_views_are_interchangeable():
    """Without the camera nothing tells the views apart: permuting the views of the input
    permutes the output the same way (so a camera-less model's four views are exchangeable,
    which the learning check's no-camera ablation relies on); with the camera it does not."""
    unet = tiny_unet().eval()
    x, t, ctx, cam = _inputs(b=1, v=4)
    ctx = ctx[:1].expand(4, -1, -1)  # one prompt for the object's views
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = unet(x, t, ctx, camera=None, num_views=4).sample
        out_p = unet(x[perm], t, ctx, camera=None, num_views=4).sample
        cam_out = unet(x, t, ctx, camera=cam, num_views=4).sample
        cam_out_p = unet(x[perm], t, ctx, camera=cam, num_views=4).sample
    torch.testing.assert_close(out_p, out[perm], atol=1e-5, rtol=1e-5)
    assert (cam_out_p - cam_out[perm]).abs().max() > 1e-3


def test_any_views_and_resolution():
    unet = tiny_unet().eval()
    x, t, ctx, cam = _inputs(b=1, v=8, h=16, w=24)
    with torch.no_grad():
        out = unet(x, t, ctx, camera=cam, num_views=8).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="num_views"):
        unet(x[:6], t[:6], ctx[:6], camera=cam[:6], num_views=4)
    with pytest.raises(ValueError, match="camera"):
        unet(x, t, ctx, camera=cam[:, :12], num_views=8)


def test_save_pretrained_round_trip(tmp_path):
    unet = tiny_unet().eval()
    unet.save_pretrained(tmp_path / "unet")
    loaded = MultiViewUNet2DConditionModel.from_pretrained(tmp_path / "unet").eval()
    assert all(isinstance(p, MultiViewAttnProcessor) for p in loaded.attn_processors.values())
    x, t, ctx, cam = _inputs(b=1, v=4)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, t, ctx, camera=cam, num_views=4).sample,
            unet(x, t, ctx, camera=cam, num_views=4).sample,
            atol=0,
            rtol=0,
        )


def test_bf16_autocast_and_bf16_weights():
    unet = tiny_unet().eval()
    x, t, ctx, cam = _inputs(b=1, v=4)
    with torch.no_grad():
        ref = unet(x, t, ctx, camera=cam, num_views=4).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = unet(x, t, ctx, camera=cam, num_views=4).sample
        pure = unet.to(torch.bfloat16)(
            x.bfloat16(), t, ctx.bfloat16(), camera=cam, num_views=4
        ).sample
    assert auto.dtype == torch.bfloat16 and pure.dtype == torch.bfloat16
    scale = ref.abs().max()
    assert (auto.float() - ref).abs().max() < 0.05 * scale
    assert (pure.float() - ref).abs().max() < 0.05 * scale


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, ctx, cam = _inputs(b=1, v=4)
    grads = []
    for ckpt in (False, True):
        unet = tiny_unet(seed=3).train()
        if ckpt:
            unet.enable_gradient_checkpointing()
        unet(x, t, ctx, camera=cam, num_views=4).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_add_camera_mlp_starts_as_the_2d_model():
    base = tiny_unet(camera=False).eval()
    mv = add_camera_mlp(base).eval()
    x, t, ctx, cam = _inputs(b=1, v=4)
    with torch.no_grad():
        torch.testing.assert_close(
            mv(x, t, ctx, camera=cam, num_views=4).sample,
            base(x, t, ctx, num_views=4).sample,
            atol=1e-6,
            rtol=0,
        )
    assert mv.class_embedding.linear_2.weight.abs().max() == 0
