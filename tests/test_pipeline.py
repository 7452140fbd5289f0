"""MVDreamPipeline on tiny random components: outputs, seeds, CFG layout, DDIM from formulas."""

import numpy as np
import PIL.Image
import pytest
import torch

from mvdiff.cameras import get_camera
from mvdiff.errors import UserError
from mvdiff.pipelines import MVDreamPipeline, make_scheduler, rescale_noise_cfg
from mvdiff.testing import tiny_components

H = W = 64  # latents 8x8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest (and most predictably on a shared machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipe():
    p = MVDreamPipeline(**tiny_components(0))
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, **kw):
    args = dict(height=H, width=W, num_inference_steps=2, generator=torch.manual_seed(0))
    args.update(kw)
    return pipe(**args)


def record_unet_calls(pipe):
    """Spy on the UNet: a list that fills with the keyword arguments of every call."""
    calls = []

    def hook(module, args, kwargs):
        calls.append({"sample": args[0].clone(), "t": args[1], **kwargs})

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls, handle


# ----------------------------------------------------------------------------- outputs


def test_output_types_and_shapes(pipe):
    out = run(pipe, prompt=["a corgi", "a teapot"], num_images_per_prompt=2)
    assert len(out.images) == 2 * 2 * 4
    assert all(isinstance(im, PIL.Image.Image) and im.size == (W, H) for im in out.images)
    assert out.cameras.shape == (16, 16)

    arr = run(pipe, prompt="a corgi", output_type="np").images
    assert arr.shape == (4, H, W, 3) and arr.dtype == np.float32
    assert 0 <= arr.min() and arr.max() <= 1

    t = run(pipe, prompt="a corgi", output_type="pt", height=48, width=80).images
    assert t.shape == (4, 3, 48, 80) and t.dtype == torch.float32

    lat = run(pipe, prompt="a corgi", output_type="latent", num_views=8).images
    assert lat.shape == (8, 4, H // 8, W // 8)

    images, cameras = run(pipe, prompt="a corgi", output_type="np", return_dict=False)
    assert np.array_equal(images, arr) and torch.equal(cameras, get_camera(4))


def test_fixed_seed_reproduces(pipe):
    a = run(pipe, prompt="a corgi", output_type="np", generator=torch.Generator().manual_seed(7))
    b = run(pipe, prompt="a corgi", output_type="np", generator=torch.Generator().manual_seed(7))
    c = run(pipe, prompt="a corgi", output_type="np", generator=torch.Generator().manual_seed(8))
    assert np.array_equal(a.images, b.images)
    assert not np.allclose(a.images, c.images)
    # pil is the rounded np output
    pil = run(pipe, prompt="a corgi", generator=torch.Generator().manual_seed(7)).images
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]),
                          (a.images * 255).round().astype(np.uint8))  # fmt: skip


def test_per_object_generators_match_single_object_runs(pipe):
    """A list of generators gives each object its own noise, as a separate run would."""
    both = run(pipe, prompt="a corgi", num_images_per_prompt=2, output_type="latent",
               generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])  # fmt: skip
    second = run(pipe, prompt="a corgi", output_type="latent",
                 generator=torch.Generator().manual_seed(2))  # fmt: skip
    torch.testing.assert_close(both.images[4:], second.images, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- batch layout


def test_cfg_batch_is_uncond_views_then_cond_views_with_the_same_cameras(pipe):
    g = torch.Generator().manual_seed(0)
    cond = torch.randn(2, 77, 32, generator=g)  # two prompts -> two objects
    uncond = torch.randn(2, 77, 32, generator=g)
    calls, handle = record_unet_calls(pipe)
    try:
        run(pipe, prompt_embeds=cond, negative_prompt_embeds=uncond, output_type="latent",
            num_inference_steps=1, elevation=10, azimuth_start=30)  # fmt: skip
    finally:
        handle.remove()
    (call,) = calls
    V = 4
    text, camera, x = call["encoder_hidden_states"], call["camera"], call["sample"]
    assert call["num_views"] == V and text.shape == (2 * 2 * V, 77, 32)
    # rows: [uncond obj0 v0..v3, uncond obj1 v0..v3, cond obj0 v0..v3, cond obj1 v0..v3]
    expected_text = torch.cat([uncond.repeat_interleave(V, 0), cond.repeat_interleave(V, 0)])
    assert torch.equal(text, expected_text)
    ring = get_camera(V, 10, 30)
    assert torch.equal(camera, ring.repeat(4, 1))  # same ring for each object, both halves
    assert torch.equal(x[: 2 * V], x[2 * V :])  # same latents on both halves


def test_negative_prompt_goes_to_the_first_half_and_suffix_to_the_prompt(pipe):
    calls, handle = record_unet_calls(pipe)
    try:
        run(pipe, prompt="a corgi", negative_prompt="blurry", num_inference_steps=1,
            output_type="latent")  # fmt: skip
        run(pipe, prompt="a corgi", prompt_suffix="", num_inference_steps=1, output_type="latent")
    finally:
        handle.remove()
    text = calls[0]["encoder_hidden_states"]
    enc = pipe.encode_prompt(["blurry", "a corgi, 3d asset", "a corgi", ""])
    assert torch.equal(text[:4], enc[0:1].expand(4, -1, -1))
    assert torch.equal(text[4:], enc[1:2].expand(4, -1, -1))
    text = calls[1]["encoder_hidden_states"]
    assert torch.equal(text[:4], enc[3:4].expand(4, -1, -1))  # default negative: ""
    assert torch.equal(text[4:], enc[2:3].expand(4, -1, -1))


def test_2d_mode_and_no_cfg(pipe):
    calls, handle = record_unet_calls(pipe)
    try:
        out = run(pipe, prompt="a corgi", num_views=1, num_inference_steps=1)
        run(pipe, prompt="a corgi", guidance_scale=1.0, num_inference_steps=1)
    finally:
        handle.remove()
    assert len(out.images) == 1 and out.cameras is None
    assert calls[0]["camera"] is None and calls[0]["num_views"] == 1
    assert calls[0]["sample"].shape[0] == 2  # CFG: uncond + cond, one view each
    assert calls[1]["sample"].shape[0] == 4  # no CFG: 4 views only
    assert torch.equal(calls[1]["camera"], get_camera(4))


def test_explicit_cameras(pipe):
    cams = get_camera(3, elevation=20, azimuth_start=45)
    calls, handle = record_unet_calls(pipe)
    try:
        run(pipe, prompt="a corgi", num_views=3, cameras=cams, num_inference_steps=1)
    finally:
        handle.remove()
    assert torch.equal(calls[0]["camera"], cams.repeat(2, 1))


# ----------------------------------------------------------------------------- the loop


def test_ddim_loop_equals_the_formulas(pipe, reference):
    """10 DDIM steps (eta 0), CFG 7.5, official camera (el 15, az 90): the pipeline's loop vs.
    a straight loop written from the DDIM equations with the SD linear schedule."""
    tensors, meta = reference
    assert meta["camera_args"]["camera.1"] == dict(
        num_frames=4, elevation=15, azimuth_start=90, azimuth_span=360
    )
    official_camera = tensors["camera.1"]  # [4, 16] from the official get_camera
    V, steps, scale = 4, 10, 7.5
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(V, 4, H // 8, W // 8, generator=g)
    cond, uncond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)

    got = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=x_T, num_views=V,
               elevation=15, azimuth_start=90, height=H, width=W, num_inference_steps=steps,
               guidance_scale=scale, eta=0.0, output_type="latent").images  # fmt: skip

    # Independent loop: betas linear in sqrt space (0.00085 -> 0.012, 1000 steps), "leading"
    # timesteps with steps_offset=1 (1, 101, ..., 901), last step to alphas_cumprod[0].
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    ratio = 1000 // steps
    timesteps = [k * ratio + 1 for k in reversed(range(steps))]
    assert timesteps[0] == 901 and timesteps[-1] == 1
    text = torch.cat([uncond.expand(V, -1, -1), cond.expand(V, -1, -1)])
    camera = torch.cat([official_camera, official_camera])
    x = x_T.double()
    with torch.no_grad():
        for t in timesteps:
            eps = pipe.unet(torch.cat([x, x]).float(), t, text, camera=camera, num_views=V).sample
            eps_uncond, eps_cond = eps.double().chunk(2)
            eps = eps_uncond + scale * (eps_cond - eps_uncond)
            a_t = alphas_cumprod[t]
            a_prev = alphas_cumprod[t - ratio] if t - ratio >= 0 else alphas_cumprod[0]
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    torch.testing.assert_close(got.double(), x, atol=2e-4, rtol=1e-4)


def test_cfg_rescale_is_per_object():
    g = torch.Generator().manual_seed(0)
    eps_cfg, eps_cond = (
        torch.randn(8, 4, 4, 4, generator=g) * 3,
        torch.randn(8, 4, 4, 4, generator=g),
    )
    out = rescale_noise_cfg(eps_cfg, eps_cond, 1.0, num_views=4)
    for obj in range(2):
        rows = slice(4 * obj, 4 * obj + 4)
        torch.testing.assert_close(out[rows].std(), eps_cond[rows].std())
        ratio = out[rows] / eps_cfg[rows]
        torch.testing.assert_close(ratio, ratio.flatten()[0].expand_as(ratio))  # one factor
    half = rescale_noise_cfg(eps_cfg, eps_cond, 0.5, num_views=4)
    torch.testing.assert_close(half, 0.5 * out + 0.5 * eps_cfg)


def test_guidance_rescale_changes_the_result(pipe):
    a = run(pipe, prompt="a corgi", output_type="latent").images
    b = run(pipe, prompt="a corgi", output_type="latent", guidance_rescale=0.7).images
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["dpm", "euler", "unipc"])
def test_other_schedulers(name):
    p = MVDreamPipeline(**tiny_components(0))
    p.set_progress_bar_config(disable=True)
    p.scheduler = make_scheduler(name, p.scheduler.config)
    out = run(p, prompt="a corgi", output_type="np", num_inference_steps=3)
    assert out.images.shape == (4, H, W, 3) and np.isfinite(out.images).all()


def test_bf16_runs_and_returns_float32_images():
    p = MVDreamPipeline(**tiny_components(0)).to(torch.bfloat16)
    p.set_progress_bar_config(disable=True)
    assert p.unet.dtype == torch.bfloat16
    out = run(p, prompt="a corgi", output_type="pt", num_inference_steps=1)
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


def test_progress_bar(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    try:
        run(pipe, prompt="a corgi", num_inference_steps=3, output_type="latent")
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "3/3" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(prompt=[]), "prompt"),
        (dict(prompt=None), "prompt"),
        (dict(prompt="x", num_views=0), "num_views"),
        (dict(prompt="x", num_views=400), "num_views"),
        (dict(prompt="x", azimuth_span=0), "azimuth_span"),
        (dict(prompt="x", height=60), "height"),
        (dict(prompt="x", width=100), "width"),
        (dict(prompt="x", output_type="jpg"), "output_type"),
        (dict(prompt="x", negative_prompt=["a", "b"]), "negative_prompt"),
        (dict(prompt="x", cameras=torch.zeros(3, 16)), "cameras"),
        (dict(prompt="x", latents=torch.zeros(4, 4, 4, 4)), "latents"),
        (dict(prompt="x", guidance_rescale=2.0), "guidance_rescale"),
        (dict(prompt="x", num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_the_argument(pipe, kwargs, names):
    with pytest.raises(UserError) as e:
        run(pipe, **kwargs)
    message = str(e.value)
    assert names in message and "\n" not in message


def test_make_scheduler_rejects_unknown_names(pipe):
    with pytest.raises(UserError, match="scheduler"):
        make_scheduler("plms2", pipe.scheduler.config)


def test_official_ddim_settings_from_a_ddpm_config(pipe):
    from diffusers import DDPMScheduler

    ddim = make_scheduler("ddim", DDPMScheduler.from_config(pipe.scheduler.config).config)
    ddim.set_timesteps(50)
    assert ddim.timesteps[0] == 981 and ddim.timesteps[-1] == 1
    assert ddim.final_alpha_cumprod == ddim.alphas_cumprod[0]
