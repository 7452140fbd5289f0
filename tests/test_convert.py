import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mvdiff.convert import convert_mvdream_checkpoint, convert_state_dict, load_state_dict
from mvdiff.errors import UserError
from tests.conftest import FULLSIZE_KEYS


def _key_list(path=FULLSIZE_KEYS):
    out = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in re.findall(r"\d+", shape))
    return out


def _random(shape, g, dtype=torch.float32):
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _openclip_forward(te, ids, layers):
    """OpenCLIP text tower up to the penultimate block + ln_final, written from its definition."""
    width = te["token_embedding.weight"].shape[1]
    heads = width // 64
    x = te["token_embedding.weight"][ids] + te["positional_embedding"]
    n = ids.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(layers - 1):
        p = f"transformer.resblocks.{i}."
        h = torch.nn.functional.layer_norm(x, (width,), te[p + "ln_1.weight"], te[p + "ln_1.bias"])
        attn = torch.nn.functional.multi_head_attention_forward(
            h.transpose(0, 1),
            h.transpose(0, 1),
            h.transpose(0, 1),
            width,
            heads,
            te[p + "attn.in_proj_weight"],
            te[p + "attn.in_proj_bias"],
            None,
            None,
            False,
            0.0,
            te[p + "attn.out_proj.weight"],
            te[p + "attn.out_proj.bias"],
            need_weights=False,
            attn_mask=mask,
        )[0].transpose(0, 1)
        x = x + attn
        h = torch.nn.functional.layer_norm(x, (width,), te[p + "ln_2.weight"], te[p + "ln_2.bias"])
        h = torch.nn.functional.linear(h, te[p + "mlp.c_fc.weight"], te[p + "mlp.c_fc.bias"])
        h = torch.nn.functional.linear(
            torch.nn.functional.gelu(h), te[p + "mlp.c_proj.weight"], te[p + "mlp.c_proj.bias"]
        )
        x = x + h
    return torch.nn.functional.layer_norm(x, (width,), te["ln_final.weight"], te["ln_final.bias"])


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory, reference, reference_unet_sd):
    """A small checkpoint in the official layout: the reference UNet, a VAE with the real key
    list's names at 1/4 width, a 3-layer OpenCLIP text tower and the schedule buffers."""
    tensors, meta = reference
    g = torch.Generator().manual_seed(0)
    sd = {f"model.diffusion_model.{k}": v for k, v in reference_unet_sd.items()}
    for k, shape in _key_list().items():
        if k.startswith("first_stage_model."):
            sd[k] = _random(tuple(d // 4 if d % 128 == 0 else d for d in shape), g)
    width, layers = 64, 3
    te = {
        "positional_embedding": _random((77, width), g),
        "token_embedding.weight": _random((49408, width), g),
        "ln_final.weight": 1 + _random((width,), g),
        "ln_final.bias": _random((width,), g),
        "text_projection": _random((width, width), g),
        "logit_scale": torch.tensor(4.6),
    }
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
            "mlp.c_fc.weight": (4 * width, width),
            "mlp.c_fc.bias": (4 * width,),
            "mlp.c_proj.weight": (width, 4 * width),
            "mlp.c_proj.bias": (width,),
        }.items():
            te[p + name] = _random(shape, g) * (10 if "weight" in name else 1)
    sd.update({f"cond_stage_model.model.{k}": v for k, v in te.items()})
    sd.update(
        {
            k[len("checkpoint.") :]: v
            for k, v in tensors.items()
            if k.startswith("checkpoint.") and "diffusion_model" not in k
        }
    )
    root = tmp_path_factory.mktemp("official")
    ckpt = root / "tiny-4view.pt"
    torch.save(sd, ckpt)
    config = {
        "model": {
            "target": "mvdream.ldm.interface.LatentDiffusionInterface",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.012,
                "timesteps": 1000,
                "scale_factor": 0.18215,
                "unet_config": {"params": meta["unet_config_official_names"]},
                "first_stage_config": {
                    "params": {
                        "embed_dim": 4,
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": 4,
                            "resolution": 256,
                            "in_channels": 3,
                            "out_ch": 3,
                            "ch": 32,
                            "ch_mult": [1, 2, 4, 4],
                            "num_res_blocks": 2,
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                    }
                },
                "cond_stage_config": {
                    "target": "mvdream.ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
                },
            },
        }
    }
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return ckpt, cfg, te, layers


def test_cli_converts_tiny_official_checkpoint(tmp_path, tiny_official, reference):
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from mvdiff.models import MultiViewUNet2DConditionModel

    ckpt, cfg, te, layers = tiny_official
    out = tmp_path / "model"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mvdiff.cli",
            "convert",
            str(ckpt),
            str(out),
            "--original-config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    assert "schedule buffers match" in res.stdout
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_mvdream", "MVDreamPipeline"]
    assert set(index) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}

    tensors, meta = reference
    unet = MultiViewUNet2DConditionModel.from_pretrained(out / "unet").eval()
    with torch.no_grad():
        y = unet(
            tensors["case_mv.x"],
            tensors["case_mv.timesteps"],
            tensors["case_mv.context"],
            camera=tensors["case_mv.camera"],
            num_views=4,
        ).sample
    assert (y - tensors["case_mv.out"]).abs().max() <= 1e-4

    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert len(tok) == 49408
    ids = tok(
        ["a dslr photo of a corgi, 3d asset"],
        padding="max_length",
        max_length=77,
        return_tensors="pt",
    ).input_ids
    assert ids[0, 0] == 49406 and 49407 in ids[0].tolist()
    text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").eval()
    assert text_encoder.config.num_hidden_layers == layers - 1
    with torch.no_grad():
        ours = text_encoder(ids).last_hidden_state
    ref = _openclip_forward(te, ids, layers)
    assert (ours - ref).abs().max() <= 1e-4

    sched = DDIMScheduler.from_pretrained(out / "scheduler")
    assert sched.config.steps_offset == 1 and not sched.config.set_alpha_to_one
    assert sched.config.timestep_spacing == "leading"
    torch.testing.assert_close(
        sched.alphas_cumprod.double(),
        tensors["checkpoint.alphas_cumprod"].double(),
        atol=1e-6,
        rtol=0,
    )
    sched.set_timesteps(50)
    assert sched.timesteps[0] == 981 and sched.timesteps[-1] == 1  # the official DDIM grid

    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    with torch.no_grad():
        img = vae.decode(torch.randn(1, 4, 8, 8)).sample
    assert img.shape == (1, 3, 64, 64) and torch.isfinite(img).all()


def test_unet_only_with_and_without_prefix(tmp_path, reference, reference_unet_sd):
    tensors, meta = reference
    for i, sd in enumerate(
        [reference_unet_sd, {f"model.diffusion_model.{k}": v for k, v in reference_unet_sd.items()}]
    ):
        path = tmp_path / f"unet{i}.safetensors"
        save_file(sd, str(path))
        report = convert_mvdream_checkpoint(
            path,
            tmp_path / f"out{i}",
            original_config={
                "model": {"params": {"unet_config": {"params": meta["unet_config_official_names"]}}}
            },
            unet_only=True,
        )
        assert report.unet_tensors == len(reference_unet_sd)
        assert sorted(p.name for p in (tmp_path / f"out{i}").iterdir()) == ["unet"]


def test_bad_inputs_are_clear_errors(tmp_path, reference_unet_sd, tiny_official):
    ckpt, cfg, _, _ = tiny_official
    with pytest.raises(UserError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(UserError, match="junk.pt"):
        load_state_dict(junk)
    sd = load_state_dict(ckpt)
    sd["model.diffusion_model.extra.weight"] = torch.zeros(1)
    with pytest.raises(UserError, match="extra.weight"):
        convert_state_dict(sd, str(cfg))
    sd.pop("model.diffusion_model.extra.weight")
    sd.pop("model.diffusion_model.out.2.weight")
    with pytest.raises(UserError, match="missing"):
        convert_state_dict(sd, str(cfg))
    # a failed conversion leaves no output folder behind
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mvdiff.cli",
            "convert",
            str(bad),
            str(tmp_path / "o"),
            "--original-config",
            str(cfg),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        res.returncode == 2 and "error:" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "o").exists()
    assert not any(p.name.startswith(".o.tmp") for p in tmp_path.iterdir())


def test_every_fullsize_key_is_consumed():
    """A random full-size sd-v2.1-base-4view state dict (every key of the official list)."""
    keys = _key_list()
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, shape in keys.items():
        if k in ("betas", "alphas_cumprod") or k.startswith(
            ("sqrt", "log_", "posterior", "alphas_cumprod_prev")
        ):
            continue
        sd[k] = torch.empty(shape, dtype=torch.float16).normal_(generator=g)
    from mvdiff.convert import build_scheduler, check_schedule, parse_original_config

    sched = build_scheduler(parse_original_config("sd-v2.1-base-4view"))
    sd["betas"] = sched.betas.clone()
    sd["alphas_cumprod"] = sched.alphas_cumprod.clone()
    components, report = convert_state_dict(sd, None, dtype=torch.float16)
    assert report.unet_tensors == sum(k.startswith("model.diffusion_model.") for k in keys)
    assert report.vae_tensors == sum(k.startswith("first_stage_model.") for k in keys)
    assert report.text_encoder_tensors == sum(k.startswith("cond_stage_model.") for k in keys)
    assert report.schedule_max_abs_error < 1e-6
    unet = components["unet"]
    assert unet.config.cross_attention_dim == 1024 and unet.config.block_out_channels == [
        320,
        640,
        1280,
        1280,
    ]
    torch.testing.assert_close(
        unet.class_embedding.linear_1.weight, sd["model.diffusion_model.camera_embed.0.weight"]
    )
    assert components["text_encoder"].config.num_hidden_layers == 23
    total = sum(
        p.numel() for c in ("unet", "vae", "text_encoder") for p in components[c].parameters()
    )
    dropped = sum(
        v.numel()
        for k, v in sd.items()
        if "resblocks.23." in k or k.endswith(("text_projection", "logit_scale"))
    )
    assert total == sum(v.numel() for k, v in sd.items() if "." in k) - dropped
    assert check_schedule(sd, sched) < 1e-6


def test_sd15_layout_conv_projections_and_hf_clip(tmp_path):
    """SD 1.5-style checkpoint: fixed head count, 1x1-conv proj_in/out, HF CLIP text tower."""
    import sys
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from official_unet import OfficialMultiViewUNet

    params = dict(
        model_channels=32,
        channel_mult=[1, 2],
        attention_resolutions=[1, 2],
        num_res_blocks=1,
        num_heads=2,
        num_head_channels=-1,
        use_linear_in_transformer=False,
        context_dim=128,
        camera_dim=16,
    )
    torch.manual_seed(0)
    official = OfficialMultiViewUNet(**params).eval()
    for p in official.parameters():  # the official init zeroes some layers; make every weight count
        p.data.normal_(0, 0.05)
    te_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    te = CLIPTextModel(te_config).eval()
    sd = {f"model.diffusion_model.{k}": v for k, v in official.state_dict().items()}
    # transformers 4 layout, as stored in official SD 1.x checkpoints
    for k, v in te.state_dict().items():
        key = k if k.startswith("text_model.") else f"text_model.{k}"
        sd[f"cond_stage_model.transformer.{key}"] = v
    g = torch.Generator().manual_seed(1)
    for k, shape in _key_list().items():
        if k.startswith("first_stage_model."):
            sd[k] = _random(tuple(d // 4 if d % 128 == 0 else d for d in shape), g)
    config = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {
                    "params": {
                        "embed_dim": 4,
                        "ddconfig": {
                            "ch": 32,
                            "ch_mult": [1, 2, 4, 4],
                            "num_res_blocks": 2,
                            "z_channels": 4,
                        },
                    }
                },
                "cond_stage_config": {
                    "target": "mvdream.ldm.modules.encoders.modules.FrozenCLIPEmbedder"
                },
            }
        }
    }
    components, _ = convert_state_dict(sd, config)
    x, ctx = torch.randn(8, 4, 8, 8), torch.randn(8, 5, 128)
    t, cam = torch.randint(0, 1000, (8,)), torch.randn(8, 16)
    with torch.no_grad():
        ref = official(x, t, ctx, camera=cam, num_frames=4)
        out = components["unet"](x, t, ctx, camera=cam, num_views=4).sample
        ids = torch.randint(0, 49408, (2, 77))
        te_ref = te(ids).last_hidden_state
        te_out = components["text_encoder"](ids).last_hidden_state
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    torch.testing.assert_close(te_out, te_ref, atol=1e-5, rtol=1e-5)
    assert components["tokenizer"].pad_token == "<|endoftext|>"
