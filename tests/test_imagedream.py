"""ImageDream: the image-prompt UNet against the official reference vectors, and conversion of
checkpoints in the official ImageDream key layout (vision tower included)."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mvdiff.convert import convert_state_dict, load_state_dict
from mvdiff.errors import UserError
from mvdiff.models import MultiViewUNet2DConditionModel
from tests.conftest import FIXTURES
from tests.test_convert import _key_list, _openclip_forward, _random

REF = FIXTURES / "reference"
ID_CKPT = REF / "imagedream_tiny_visible.pt"
ID_YAML = REF / "imagedream_tiny_visible.yaml"
ID_CASES = REF / "imagedream_tiny_visible.safetensors"
CASES = ("pixel5", "pixel5_uncond", "local4", "pixel5_rect")


@pytest.fixture(scope="module")
def cases():
    return load_file(str(ID_CASES))


@pytest.fixture(scope="module")
def converted_unet(tmp_path_factory):
    """The official tiny ImageDream UNet through `mvdiff convert --unet-only` (the CLI)."""
    out = tmp_path_factory.mktemp("id") / "unet-only"
    res = subprocess.run(
        [sys.executable, "-m", "mvdiff.cli", "convert", str(ID_CKPT), str(out)]
        + ["--original-config", str(ID_YAML), "--unet-only"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    return out


def _run(unet, t, case, **kw):
    frames, pixel = int(t[f"{case}.num_frames"]), int(t[f"{case}.pixel"])
    with torch.no_grad():
        return unet(
            t[f"{case}.x"],
            t[f"{case}.t"],
            encoder_hidden_states=t[f"{case}.ctx"],
            camera=t[f"{case}.cam"],
            num_views=frames,
            image_embeds=t[f"{case}.ip"],
            reference_latents=t[f"{case}.ip_img"] if pixel else None,
            **kw,
        ).sample


def test_official_parity_all_cases(converted_unet, cases):
    unet = MultiViewUNet2DConditionModel.from_pretrained(converted_unet / "unet").eval()
    assert unet.config.num_image_tokens == 16 and unet.config.image_embed_dim == 1280
    for case in CASES:
        x = cases[f"{case}.x"].clone()
        out = _run(unet, cases, case)
        err = (out - cases[f"{case}.out"]).abs().max().item()
        print(f"{case}: max abs error {err:.2e}")
        assert err <= 1e-4, case
        assert torch.equal(cases[f"{case}.x"], x)  # the input is not written into


def test_image_prompt_and_reference_frame_matter(converted_unet, cases):
    """Each input reaches the output the way the official model uses it."""
    unet = MultiViewUNet2DConditionModel.from_pretrained(converted_unet / "unet").eval()
    ref = cases["pixel5.out"]
    # the reference latent replaces the last view: whatever x holds there is irrelevant
    t = dict(cases)
    t["pixel5.x"] = cases["pixel5.x"].clone()
    t["pixel5.x"][4::5] = 100.0
    assert (_run(unet, t, "pixel5") - ref).abs().max() <= 1e-4
    # ... and it reaches the other views through the joined self-attention
    t["pixel5.ip_img"] = cases["pixel5.ip_img"] + 1
    assert (_run(unet, t, "pixel5")[0:4] - ref[0:4]).abs().max() > 1e-3
    # the image tokens change every view; image_scale weighs them like the official ip_weight
    t = dict(cases)
    t["pixel5.ip"] = cases["pixel5.ip"].flip(0)  # swap the two objects' images
    assert (_run(unet, t, "pixel5") - ref).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    assert (
        _run(unet, cases, "pixel5", cross_attention_kwargs={"image_scale": 0.0}) - ref
    ).abs().max() > 1e-3


def test_bad_image_inputs_and_mvdream_folders(converted_unet, cases, reference, tmp_path):
    unet = MultiViewUNet2DConditionModel.from_pretrained(converted_unet / "unet").eval()
    t = dict(cases)
    t["pixel5.ip"] = cases["pixel5.ip"][:1]
    with pytest.raises(ValueError, match="image_embeds must be"):
        _run(unet, t, "pixel5")
    t = dict(cases)
    t["pixel5.ip_img"] = cases["pixel5.ip_img"][:, :, :4]
    with pytest.raises(ValueError, match="reference_latents must be"):
        _run(unet, t, "pixel5")
    # a processor swap that would silently drop the image attention is refused
    from mvdiff.models import MultiViewAttnProcessor

    unet.set_attn_processor(MultiViewAttnProcessor())
    with pytest.raises(ValueError, match="ignores the image prompt"):
        _run(unet, cases, "local4")

    # MVDream folders: no image prompt config, no new weights, image inputs refused
    tensors, meta = reference
    sd = {k[len("checkpoint.") :]: v for k, v in tensors.items() if "diffusion_model" in k}
    cfg = {"model": {"params": {"unet_config": {"params": meta["unet_config_official_names"]}}}}
    mv = convert_state_dict(sd, cfg, unet_only=True)[0]["unet"]
    mv.save_pretrained(tmp_path / "mv")
    config = json.loads((tmp_path / "mv" / "config.json").read_text())
    assert config["num_image_tokens"] == 0
    del config["num_image_tokens"], config["image_embed_dim"]  # a folder from before them
    (tmp_path / "mv" / "config.json").write_text(json.dumps(config))
    mv = MultiViewUNet2DConditionModel.from_pretrained(tmp_path / "mv").eval()
    assert mv.image_proj is None and not any("_ip" in k for k in mv.state_dict())
    with torch.no_grad():
        y = mv(
            tensors["case_mv.x"],
            tensors["case_mv.timesteps"],
            tensors["case_mv.context"],
            camera=tensors["case_mv.camera"],
            num_views=4,
        ).sample
        assert (y - tensors["case_mv.out"]).abs().max() <= 1e-4
        with pytest.raises(ValueError, match="no image prompt"):
            mv(
                tensors["case_mv.x"],
                tensors["case_mv.timesteps"],
                tensors["case_mv.context"],
                num_views=4,
                image_embeds=torch.zeros(2, 257, 1280),
            )


def test_config_and_weights_must_agree(tmp_path):
    sd = load_state_dict(ID_CKPT)
    cfg = yaml.safe_load(ID_YAML.read_text())
    no_ip = json.loads(json.dumps(cfg))
    no_ip["model"]["params"]["unet_config"]["params"]["with_ip"] = False
    with pytest.raises(UserError, match="image-prompt weights"):
        convert_state_dict(sd, no_ip, unet_only=True)
    glob = json.loads(json.dumps(cfg))
    glob["model"]["params"]["unet_config"]["params"]["ip_mode"] = "global"
    with pytest.raises(UserError, match="ip_mode 'global'"):
        convert_state_dict(sd, glob, unet_only=True)
    sd["model.diffusion_model.image_embed.layers.0.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="extra.weight"):
        convert_state_dict(sd, cfg, unet_only=True)


# ----------------------------------------------------------------------- full checkpoints


def _openclip_tower(g, width, layers, inner, extra=None):
    """Random OpenCLIP residual blocks (``transformer.resblocks.*``)."""
    out = dict(extra or {})
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        for name, shape in {
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "attn.in_proj_weight": (3 * width, width),
            "attn.in_proj_bias": (3 * width,),
            "attn.out_proj.weight": (width, width),
            "attn.out_proj.bias": (width,),
            "mlp.c_fc.weight": (inner, width),
            "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.weight": (width, inner),
            "mlp.c_proj.bias": (width,),
        }.items():
            scale = 1.0 if name.startswith("ln") and name.endswith("weight") else 0.0
            out[p + name] = scale + _random(shape, g) * (10 if "weight" in name else 1)
    return out


def _visual_forward(vis, pixels, layers, heads):
    """ImageDream's ``encode_image_with_transformer`` written from its definition: the output
    of the penultimate residual block of the OpenCLIP vision tower, no ``ln_post``."""
    F = torch.nn.functional
    width = vis["conv1.weight"].shape[0]
    x = F.conv2d(pixels, vis["conv1.weight"], stride=vis["conv1.weight"].shape[-1])
    x = x.reshape(x.shape[0], width, -1).permute(0, 2, 1)  # (N, C, g, g) -> (N, g*g, C)
    cls = vis["class_embedding"].expand(x.shape[0], 1, width)
    x = torch.cat([cls, x], dim=1) + vis["positional_embedding"]
    x = F.layer_norm(x, (width,), vis["ln_pre.weight"], vis["ln_pre.bias"])
    hidden = []
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), vis[p + "ln_1.weight"], vis[p + "ln_1.bias"])
        h = h.transpose(0, 1)  # NLD -> LND
        attn = F.multi_head_attention_forward(
            h,
            h,
            h,
            width,
            heads,
            vis[p + "attn.in_proj_weight"],
            vis[p + "attn.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            vis[p + "attn.out_proj.weight"],
            vis[p + "attn.out_proj.bias"],
            need_weights=False,
        )[0].transpose(0, 1)
        x = x + attn
        h = F.layer_norm(x, (width,), vis[p + "ln_2.weight"], vis[p + "ln_2.bias"])
        h = F.linear(h, vis[p + "mlp.c_fc.weight"], vis[p + "mlp.c_fc.bias"])
        x = x + F.linear(F.gelu(h), vis[p + "mlp.c_proj.weight"], vis[p + "mlp.c_proj.bias"])
        hidden.append(x)
    return hidden[-2]


@pytest.fixture(scope="module")
def tiny_imagedream(tmp_path_factory):
    """A small checkpoint in ImageDream's own layout (``LatentDiffusionInterface``: ``model.``,
    ``vae_model.``, ``clip_model.model.`` with the vision tower under ``visual.``): the official
    tiny UNet, a 1/4-width VAE, a 3-layer text tower and a 3-layer ViT at the real width 1280
    (16 heads of 80; narrow MLPs keep it small) with 14-px patches on 28-px images."""
    g = torch.Generator().manual_seed(0)
    sd = load_state_dict(ID_CKPT)
    for k, shape in _key_list().items():
        if k.startswith("first_stage_model."):
            new = "vae_model." + k[len("first_stage_model.") :]
            sd[new] = _random(tuple(d // 4 if d % 128 == 0 else d for d in shape), g)
    width, layers = 64, 3
    te = _openclip_tower(
        g,
        width,
        layers,
        4 * width,
        {
            "positional_embedding": _random((77, width), g),
            "token_embedding.weight": _random((49408, width), g),
            "ln_final.weight": 1 + _random((width,), g),
            "ln_final.bias": _random((width,), g),
            "text_projection": _random((width, width), g),
            "logit_scale": torch.tensor(4.6),
        },
    )
    vw, vlayers = 1280, 3
    vis = _openclip_tower(
        g,
        vw,
        vlayers,
        32,
        {
            "conv1.weight": _random((vw, 3, 14, 14), g) * 10,
            "class_embedding": _random((vw,), g) * 10,
            "positional_embedding": _random((5, vw), g) * 10,
            "ln_pre.weight": 1 + _random((vw,), g),
            "ln_pre.bias": _random((vw,), g),
            "ln_post.weight": 1 + _random((vw,), g),
            "ln_post.bias": _random((vw,), g),
            "proj": _random((vw, 1024), g),
        },
    )
    sd.update({f"clip_model.model.{k}": v for k, v in te.items()})
    sd.update({f"clip_model.model.visual.{k}": v for k, v in vis.items()})
    from mvdiff.convert import build_scheduler, parse_original_config

    sched = build_scheduler(parse_original_config("sd-v2.1-base-4view"))
    sd["betas"], sd["alphas_cumprod"] = sched.betas.clone(), sched.alphas_cumprod.clone()
    root = tmp_path_factory.mktemp("imagedream")
    ckpt = root / "tiny-ipmv.pt"
    torch.save(sd, ckpt)
    config = yaml.safe_load(ID_YAML.read_text())
    config["model"]["params"]["vae_config"] = {
        "target": "imagedream.ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "ddconfig": {"z_channels": 4, "ch": 32, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2},
        },
    }
    config["model"]["params"]["clip_config"] = {
        "target": "imagedream.ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"freeze": True, "layer": "penultimate", "ip_mode": "local_resample"},
    }
    cfg = root / "tiny-ipmv.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return ckpt, cfg, sd, te, vis, vlayers


def test_cli_converts_official_imagedream_layout(tmp_path, tiny_imagedream, cases):
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModel

    from mvdiff.pipelines import MVDreamPipeline

    ckpt, cfg, sd, te, vis, vlayers = tiny_imagedream
    out = tmp_path / "model"
    res = subprocess.run(
        [sys.executable, "-m", "mvdiff.cli", "convert", str(ckpt), str(out)]
        + ["--original-config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "schedule buffers match" in res.stdout
    assert "image encoder: " in res.stdout and "visual.proj" in res.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["image_encoder"] == ["transformers", "CLIPVisionModel"]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]

    # the UNet: official parity through the full conversion too
    unet = MultiViewUNet2DConditionModel.from_pretrained(out / "unet").eval()
    assert (_run(unet, cases, "pixel5") - cases["pixel5.out"]).abs().max() <= 1e-4

    # the vision tower: hidden_states[-2] is the official penultimate image embedding
    enc = CLIPVisionModel.from_pretrained(out / "image_encoder").eval()
    assert enc.config.num_hidden_layers == vlayers and enc.config.num_attention_heads == 16
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = enc(pixels, output_hidden_states=True).hidden_states[-2]
    ref = _visual_forward(vis, pixels, vlayers, heads=16)
    assert ours.shape == (2, 5, 1280)
    assert (ours - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    # and what the UNet consumes: [objects, tokens, 1280]
    assert ours.shape[-1] == unet.config.image_embed_dim

    # the preprocessing: OpenCLIP's (bicubic short side to the tower's size, centre crop,
    # [0, 1], OpenCLIP mean/std), checked against a PIL implementation
    proc = CLIPImageProcessor.from_pretrained(out / "feature_extractor")
    rgb = (np.random.default_rng(0).random((56, 84, 3)) * 255).astype(np.uint8)
    image = PIL.Image.fromarray(rgb)
    got = proc(images=image, return_tensors="pt").pixel_values
    small = np.asarray(image.resize((42, 28), PIL.Image.BICUBIC), dtype=np.float32)[:, 7:35] / 255
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    want = torch.from_numpy((small - mean) / std).permute(2, 0, 1)[None]
    assert got.shape == (1, 3, 28, 28)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    # the text tower and the rest, as for MVDream
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    ids = tok(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    with torch.no_grad():
        assert (
            text_encoder(ids).last_hidden_state - _openclip_forward(te, ids, 3)
        ).abs().max() <= 1e-4

    pipe = MVDreamPipeline.from_pretrained(out)
    assert isinstance(pipe.image_encoder, CLIPVisionModel)
    assert isinstance(pipe.feature_extractor, CLIPImageProcessor)


def test_every_imagedream_key_is_consumed(tiny_imagedream):
    ckpt, cfg, sd, te, vis, vlayers = tiny_imagedream
    components, report = convert_state_dict(dict(sd), str(cfg))
    assert report.unet_tensors == sum(k.startswith("model.diffusion_model.") for k in sd)
    assert report.vae_tensors == sum(k.startswith("vae_model.") for k in sd)
    assert report.image_encoder_tensors == len(vis)
    assert report.text_encoder_tensors == len(te)
    total = sum(
        p.numel()
        for c in ("unet", "vae", "text_encoder", "image_encoder")
        for p in components[c].parameters()
    )
    dropped = sum(
        v.numel()
        for k, v in sd.items()
        if k.startswith("clip_model.model.transformer.resblocks.2.")  # the last text block
        or k.endswith(("text_projection", "logit_scale", "visual.proj"))
    )
    assert total == sum(v.numel() for k, v in sd.items() if "." in k) - dropped
    # a checkpoint without its vision tower cannot become a full ImageDream folder
    no_vis = {k: v for k, v in sd.items() if ".visual." not in k}
    with pytest.raises(UserError, match="vision tower"):
        convert_state_dict(no_vis, str(cfg))
    # the ImageDream preset is recognised from the weights
    from mvdiff.convert import infer_original_config

    probe = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.zeros(1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (
            torch.zeros(320, 1024)
        ),
    }
    assert not infer_original_config(probe).unet.get("with_ip")
    probe["model.diffusion_model.image_embed.latents"] = torch.zeros(1)
    assert infer_original_config(probe).unet["ip_dim"] == 16


# ----------------------------------------------------------------------------- sampling


def _rgba_photo(size=40):
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[10:30, 12:28] = [200, 60, 40, 255]
    return PIL.Image.fromarray(rgba)


@pytest.fixture(scope="module")
def image_pipe():
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_image_components

    torch.set_num_threads(1)
    pipe = MVDreamPipeline(**tiny_image_components(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


FAST_KW = dict(height=64, width=64, num_inference_steps=3, output_type="np")


def test_pipeline_image_conditioning_is_the_official_one(image_pipe):
    """What the UNet is given: 4 views + a zero-camera reference frame per object; the
    conditional half gets the photo's tokens and latent, the unconditional half zeros."""
    pipe = image_pipe
    calls = []
    forward = pipe.unet.forward

    def spy(*args, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if isinstance(v, (torch.Tensor, int))})
        return forward(*args, **kwargs)

    pipe.unet.forward = spy
    try:
        out = pipe("a box", image=_rgba_photo(), image_background=1.0, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(0), **FAST_KW)  # fmt: skip
    finally:
        del pipe.unet.forward
    assert out.images.shape == (4, 64, 64, 3) and out.cameras.shape == (4, 16)
    first = calls[0]
    assert first["num_views"] == 5
    cam = first["camera"]  # (2 halves * 1 object * 5 frames, 16)
    assert cam.shape == (10, 16) and not cam[4].any() and not cam[9].any()
    torch.testing.assert_close(cam[:4], out.cameras)
    embeds, ref = first["image_embeds"], first["reference_latents"]
    assert embeds.shape == (2, 5, 32) and ref.shape == (2, 4, 8, 8)
    assert not embeds[0].any() and not ref[0].any()  # the official unconditional input
    # the conditional half: the composited photo through the vision tower and the VAE
    photo = out.input_images[0]
    assert np.asarray(photo)[0, 0].tolist() == [255, 255, 255]  # background 1.0
    assert np.asarray(photo)[20, 20].tolist() == [200, 60, 40]
    want, _ = pipe.encode_image([photo], 64, 64)
    torch.testing.assert_close(embeds[1:], want)
    assert ref[1].abs().max() > 0


def test_image_and_reference_frame_change_the_views(image_pipe):
    def views(**kw):
        return image_pipe(
            "a box", generator=torch.Generator().manual_seed(0), **FAST_KW, **kw
        ).images

    base = views(image=_rgba_photo(), image_background=1.0)
    other = _rgba_photo()
    other.paste((40, 200, 60, 255), (5, 5, 35, 35))
    assert np.abs(views(image=other, image_background=1.0) - base).max() > 1e-3
    assert (
        np.abs(views(image=_rgba_photo(), image_background=1.0, reference_frame=False) - base).max()
        > 1e-3
    )
    assert np.abs(views(image=_rgba_photo(), image_background=0.0) - base).max() > 1e-3
    assert np.array_equal(views(image=_rgba_photo(), image_background=1.0), base)  # deterministic
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_components

    text_only = MVDreamPipeline(**tiny_components(0))
    with pytest.raises(UserError, match="no image prompt"):
        text_only("a box", image=_rgba_photo(), **FAST_KW)


def test_sample_cli_with_image(tmp_path, image_pipe, capsys):
    from mvdiff.cli import main
    from mvdiff.pipelines import MVDreamPipeline
    from mvdiff.testing import tiny_components

    folder = tmp_path / "model"
    image_pipe.save_pretrained(folder)
    photo = tmp_path / "photo.png"
    _rgba_photo().save(photo)
    out = tmp_path / "out"
    fast = ["--height", "64", "--width", "64", "--steps", "3"]
    argv = ["sample", "--model", str(folder), "--image", str(photo), "--output", str(out)]
    assert main(argv + fast) == 0
    for name in ["view_00.png", "view_03.png", "grid.png", "turntable.gif", "input.png"]:
        assert (out / name).is_file(), name
    given = np.asarray(PIL.Image.open(out / "input.png"))
    assert given.shape == (40, 40, 3) and given[20, 20].tolist() == [200, 60, 40]
    grey = given[0, 0, 0]
    assert (given[0, 0] == grey).all() and (given[:8] == grey).all()  # a plain grey background
    settings = json.loads((out / "settings.json").read_text())["settings"]
    assert settings["elevation"] == 5.0 and settings["guidance"] == 5.0  # the official demo's
    assert settings["negative_prompt"].startswith("uniform low no texture")
    assert settings["image"] == str(photo) and settings["reference_frame"] is True
    cameras = json.loads((out / "cameras.json").read_text())
    assert cameras["reference_frame"]["camera_vector"] == [0.0] * 16
    assert len(cameras["views"]) == 4
    # replay gives the same pixels (the background grey is drawn from the seed)
    again = tmp_path / "again"
    assert main(["sample", "--settings", str(out / "settings.json"), "--output", str(again)]) == 0
    for name in ("view_02.png", "input.png"):
        assert np.array_equal(
            np.asarray(PIL.Image.open(out / name)), np.asarray(PIL.Image.open(again / name))
        )

    # a text-only model refuses a photo (after loading it): exit 2 with a one-line error
    text_folder = tmp_path / "text"
    MVDreamPipeline(**tiny_components(0)).save_pretrained(text_folder)
    capsys.readouterr()
    argv = ["sample", "--model", str(text_folder), "--image", str(photo)]
    assert main(argv + ["--output", str(tmp_path / "x")] + fast) == 2
    assert "error: --image: this model has no image prompt" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["sample", "--model", str(folder), "--output", str(tmp_path / "y")]) == 2
    assert "--prompt is required" in capsys.readouterr().err


def _fullsize_imagedream_keys() -> dict:
    """Every key and shape a full ``sd-v2.1-base-4view-ipmv`` checkpoint holds when saved from
    ImageDream's ``LatentDiffusionInterface`` (``model`` / ``vae_model`` / ``clip_model``): the
    MVDream list renamed, plus what the official ImageDream code adds — ``to_k_ip`` /
    ``to_v_ip`` beside every ``attn2.to_k`` (no bias), the ``Resampler(dim=1024, depth=4,
    dim_head=64, heads=12, num_queries=16, embedding_dim=1280)``, and OpenCLIP ViT-H/14's
    vision tower (width 1280, 32 blocks, MLP 5120, 14-px patches on 224 px, proj to 1024)."""
    keys = {}
    for k, shape in _key_list().items():
        k = k.replace("first_stage_model.", "vae_model.").replace(
            "cond_stage_model.", "clip_model."
        )
        keys[k] = shape
        if k.endswith("attn2.to_k.weight"):
            keys[k.replace("to_k.", "to_k_ip.")] = shape
            keys[k.replace("to_k.", "to_v_ip.")] = shape
    p = "model.diffusion_model.image_embed."
    keys.update({p + "latents": (1, 16, 1024), p + "proj_in.weight": (1024, 1280)})
    keys.update({p + "proj_in.bias": (1024,), p + "proj_out.weight": (1024, 1024)})
    keys.update({p + "proj_out.bias": (1024,), p + "norm_out.weight": (1024,)})
    keys[p + "norm_out.bias"] = (1024,)
    for i in range(4):
        q = f"{p}layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            keys[f"{q}{n}.weight"] = keys[f"{q}{n}.bias"] = (1024,)
        keys[q + "0.to_q.weight"] = (768, 1024)
        keys[q + "0.to_kv.weight"] = (1536, 1024)
        keys[q + "0.to_out.weight"] = (1024, 768)
        keys[q + "1.1.weight"] = (4096, 1024)
        keys[q + "1.3.weight"] = (1024, 4096)
    v, w = "clip_model.model.visual.", 1280
    keys.update({v + "class_embedding": (w,), v + "positional_embedding": (257, w)})
    keys.update({v + "proj": (w, 1024), v + "conv1.weight": (w, 3, 14, 14)})
    for n in ("ln_pre", "ln_post"):
        keys[f"{v}{n}.weight"] = keys[f"{v}{n}.bias"] = (w,)
    for i in range(32):
        b = f"{v}transformer.resblocks.{i}."
        for n in ("ln_1", "ln_2"):
            keys[f"{b}{n}.weight"] = keys[f"{b}{n}.bias"] = (w,)
        keys.update({b + "attn.in_proj_weight": (3 * w, w), b + "attn.in_proj_bias": (3 * w,)})
        keys.update({b + "attn.out_proj.weight": (w, w), b + "attn.out_proj.bias": (w,)})
        keys.update({b + "mlp.c_fc.weight": (4 * w, w), b + "mlp.c_fc.bias": (4 * w,)})
        keys.update({b + "mlp.c_proj.weight": (w, 4 * w), b + "mlp.c_proj.bias": (w,)})
    return keys


def test_fullsize_imagedream_layout_is_consumed():
    """The real architecture, shapes only (meta tensors): the preset is inferred from the
    weights, every key is mapped or dropped on purpose, the shapes fit."""
    keys = _fullsize_imagedream_keys()
    sd = {k: torch.empty(s, device="meta") for k, s in keys.items() if "." in k}
    components, report = convert_state_dict(sd, None)
    unet, enc = components["unet"], components["image_encoder"]
    assert unet.config.num_image_tokens == 16 and unet.config.image_embed_dim == 1280
    assert enc.config.num_hidden_layers == 32 and enc.config.num_attention_heads == 16
    assert enc.config.image_size == 224 and enc.config.intermediate_size == 5120
    assert components["feature_extractor"].crop_size == {"height": 224, "width": 224}
    assert report.image_encoder_tensors == sum(".visual." in k for k in sd)
    total = sum(
        p.numel()
        for c in ("unet", "vae", "text_encoder", "image_encoder")
        for p in components[c].parameters()
    )
    dropped = sum(
        v.numel()
        for k, v in sd.items()
        if "model.transformer.resblocks.23." in k
        or k.endswith(("text_projection", "logit_scale", "visual.proj"))
    )
    assert total == sum(v.numel() for v in sd.values()) - dropped


# --------------------------------------- other tiny official checkpoints (an official stand-in)


def _official_imagedream(ip_dim, **params):
    """ImageDream's UNet written from the official definitions on top of the from-scratch
    official MVDream UNet of the benchmarks (einsum attention, no diffusers): the
    ``Resampler`` (PerceiverAttention with ``to_kv``, q and k scaled by dim_head**-0.25),
    ``to_k_ip`` / ``to_v_ip`` on every ``attn2`` splitting the last ``ip_dim`` context tokens
    off, and the forward's ``x[(F-1)::F] = ip_img`` / ``cat(context, image_embed(ip))``."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from official_unet import BasicTransformerBlock3D, OfficialMultiViewUNet

    nn = torch.nn

    class Perceiver(nn.Module):
        def __init__(self, dim, dim_head=64, heads=12):
            super().__init__()
            self.heads, self.dim_head = heads, dim_head
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
            self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
            self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

        def forward(self, x, latents):
            x, latents = self.norm1(x), self.norm2(latents)
            b, n, _ = latents.shape
            q = self.to_q(latents)
            k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
            q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
            s = self.dim_head**-0.25
            w = ((q * s) @ (k * s).transpose(-2, -1)).float().softmax(dim=-1)
            return self.to_out((w @ v).permute(0, 2, 1, 3).reshape(b, n, -1))

    class Resampler(nn.Module):
        def __init__(self, dim, num_queries, embedding_dim=1280):
            super().__init__()
            self.latents = nn.Parameter(torch.randn(1, num_queries, dim))
            self.proj_in, self.proj_out = nn.Linear(embedding_dim, dim), nn.Linear(dim, dim)
            self.norm_out = nn.LayerNorm(dim)

            def ff():
                return nn.Sequential(
                    nn.LayerNorm(dim),
                    nn.Linear(dim, 4 * dim, bias=False),
                    nn.GELU(),
                    nn.Linear(4 * dim, dim, bias=False),
                )

            self.layers = nn.ModuleList(nn.ModuleList([Perceiver(dim), ff()]) for _ in range(4))

        def forward(self, x):
            latents = self.latents.repeat(x.shape[0], 1, 1)
            x = self.proj_in(x)
            for attn, ff in self.layers:
                latents = attn(x, latents) + latents
                latents = ff(latents) + latents
            return self.norm_out(self.proj_out(latents))

    def ip_attention(attn):
        inner, context_dim = attn.to_k.weight.shape
        attn.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        attn.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        plain = attn.forward

        def forward(x, context=None):
            text, image = context[:, :-ip_dim], context[:, -ip_dim:]
            out = plain(x, text)  # to_out(attn(q, k, v)) ...
            # ... + to_out's weight (attn(q, k_ip, v_ip)): the official sums before to_out
            b, h = x.shape[0], attn.heads
            q, k, v = attn.to_q(x), attn.to_k_ip(image), attn.to_v_ip(image)
            q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
            w = (torch.einsum("bhid,bhjd->bhij", q, k) * attn.scale).softmax(dim=-1)
            o = (w @ v).transpose(1, 2).reshape(b, x.shape[1], -1)
            return out + o @ attn.to_out[0].weight.T

        attn.forward = forward

    class Official(OfficialMultiViewUNet):
        def __init__(self):
            super().__init__(**params)
            self.image_embed = Resampler(params["context_dim"], ip_dim)
            for m in self.modules():
                if isinstance(m, BasicTransformerBlock3D):
                    ip_attention(m.attn2)

        def forward(self, x, t, context, camera=None, num_frames=1, ip=None, ip_img=None):
            x = x.clone()
            if ip_img is not None:
                x[(num_frames - 1) :: num_frames] = ip_img
            context = torch.cat([context, self.image_embed(ip)], dim=1)
            return super().forward(x, t, context, camera=camera, num_frames=num_frames)

    return Official()


@pytest.mark.parametrize(
    "params",
    [
        # SD 1.x style: fixed head count, 1x1-conv projections, 8 image tokens
        dict(model_channels=32, channel_mult=[1, 2], attention_resolutions=[1, 2],
             num_res_blocks=1, num_heads=2, num_head_channels=-1,
             use_linear_in_transformer=False, context_dim=96, camera_dim=16, ip_dim=8),
        # SD 2.x style with 4 tokens and a wider context
        dict(model_channels=32, channel_mult=[1, 2], attention_resolutions=[2],
             num_res_blocks=1, num_head_channels=16, use_linear_in_transformer=True,
             context_dim=128, camera_dim=16, ip_dim=4),
    ],
)  # fmt: skip
def test_parity_on_other_tiny_official_configs(params):
    ip_dim = params["ip_dim"]
    torch.manual_seed(0)
    official = _official_imagedream(**params).eval()
    for name, p in official.named_parameters():  # the official init zeroes some layers
        # strong enough attention weights that the image path moves the output visibly
        p.data.normal_(0, 0.5 if ("attn" in name or "image_embed" in name) else 0.05)
    sd = {f"model.diffusion_model.{k}": v for k, v in official.state_dict().items()}
    unet_cfg = dict(params, with_ip=True, ip_mode="local_resample")
    components, _ = convert_state_dict(
        sd, {"model": {"params": {"unet_config": {"params": unet_cfg}}}}, unet_only=True
    )
    unet = components["unet"].eval()
    assert unet.config.num_image_tokens == ip_dim
    g = torch.Generator().manual_seed(1)
    for frames, pixel in ((5, True), (4, False)):
        rows = 2 * frames
        x = torch.randn(rows, 4, 8, 8, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g).repeat_interleave(frames)
        ctx = torch.randn(rows, 77, params["context_dim"], generator=g)
        cam = torch.randn(rows, 16, generator=g)
        if pixel:
            cam[frames - 1 :: frames] = 0
        ip = torch.randn(2, 257, 1280, generator=g)
        ip_img = torch.randn(2, 4, 8, 8, generator=g) if pixel else None
        with torch.no_grad():
            ref = official(x, t, ctx, cam, frames, ip.repeat_interleave(frames, 0), ip_img)
            out = unet(x, t, ctx, camera=cam, num_views=frames, image_embeds=ip,
                       reference_latents=ip_img).sample  # fmt: skip
            err = (out - ref).abs().max().item()
            no_image = unet(
                x, t, ctx, camera=cam, num_views=frames, reference_latents=ip_img
            ).sample
        scale = max(1.0, ref.abs().max().item())
        assert (ref - no_image).abs().max() > 1e-2 * scale  # the image path matters here
        assert err <= 1e-4 * scale, (frames, err)


def test_official_stand_in_reproduces_the_official_vectors(cases):
    """The stand-in above loads the official tiny checkpoint strictly and gives its outputs,
    so the parity on other configs is against a faithful model."""
    params = dict(yaml.safe_load(ID_YAML.read_text())["model"]["params"]["unet_config"]["params"])
    official = _official_imagedream(**params).eval()
    sd = load_state_dict(ID_CKPT)
    official.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in sd.items()})
    for case in ("pixel5", "local4"):
        frames, pixel = int(cases[f"{case}.num_frames"]), int(cases[f"{case}.pixel"])
        with torch.no_grad():
            out = official(
                cases[f"{case}.x"],
                cases[f"{case}.t"],
                cases[f"{case}.ctx"],
                cases[f"{case}.cam"],
                frames,
                cases[f"{case}.ip"].repeat_interleave(frames, 0),
                cases[f"{case}.ip_img"] if pixel else None,
            )
        assert (out - cases[f"{case}.out"]).abs().max() <= 1e-4, case


def test_sample_with_image_from_an_official_imagedream_checkpoint(tmp_path, tiny_imagedream):
    """The real-weights path on a tiny checkpoint in ImageDream's own layout: `mvdiff sample
    --model X.pt --original-config Y.yaml --image photo.png` converts (and caches) the
    checkpoint, vision tower included, and samples 4 views from the photo."""
    from mvdiff.cli import main

    ckpt, cfg, *_ = tiny_imagedream
    photo = tmp_path / "photo.png"
    _rgba_photo().save(photo)
    out = tmp_path / "out"
    argv = ["sample", "--model", str(ckpt), "--original-config", str(cfg), "--cache-dir",
            str(tmp_path / "cache"), "--image", str(photo), "--output", str(out),
            "--height", "64", "--width", "64", "--steps", "2", "--background", "1"]  # fmt: skip
    assert main(argv) == 0
    (folder,) = (tmp_path / "cache" / "converted").iterdir()
    assert (folder / "image_encoder").is_dir() and (folder / "feature_extractor").is_dir()
    views = [np.asarray(PIL.Image.open(out / f"view_{v:02d}.png")) for v in range(4)]
    assert all(v.shape == (64, 64, 3) for v in views)
    assert np.asarray(PIL.Image.open(out / "input.png"))[0, 0].tolist() == [255, 255, 255]


def test_attention_switches_keep_the_image_prompt(converted_unet, cases):
    """`set_attn_processor(AttnProcessor2_0())`, attention slicing and
    `set_default_attn_processor()` on an ImageDream UNet keep the joined views *and* the image
    attention: the output is unchanged (the stock processors are translated into the layer's
    own multi-view image processor)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, SlicedAttnProcessor

    from mvdiff.models.attention_ip import MultiViewIPAttnProcessor

    unet = MultiViewUNet2DConditionModel.from_pretrained(converted_unet / "unet").eval()
    with torch.no_grad():
        want = _run(unet, cases, "pixel5")
    for switch in (
        lambda: unet.set_attn_processor(AttnProcessor2_0()),
        lambda: unet.set_attn_processor(SlicedAttnProcessor(slice_size=2)),
        unet.set_default_attn_processor,
    ):
        switch()
        blocks = {k: p for k, p in unet.attn_processors.items() if not k.startswith("image_proj.")}
        assert all(isinstance(p, MultiViewIPAttnProcessor) for p in blocks.values())
        with torch.no_grad():
            assert (_run(unet, cases, "pixel5") - want).abs().max() <= 1e-5
