"""Diffusers-native model folders: the code shipped in them, loading without mvdiff, old
folders, and the community MVDream / ImageDream layout (mvdiff.pipelines.folders)."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from mvdiff.errors import UserError
from mvdiff.models import MultiViewUNet2DConditionModel
from mvdiff.pipelines import MVDreamPipeline
from mvdiff.pipelines import folders as F
from mvdiff.testing import tiny_components, tiny_image_components
from tests.conftest import FIXTURES

KW = dict(height=64, width=64, num_inference_steps=2, output_type="np")


def _photo():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[10:30, 12:28] = [200, 60, 40, 255]
    return rgba


def _sample(pipe, image=None):
    pipe.set_progress_bar_config(disable=True)
    extra = {} if image is None else {"image": image, "image_background": 1.0}
    gen = torch.Generator().manual_seed(0)
    return pipe("a corgi", generator=gen, **KW, **extra).images


# Run in a fresh interpreter where importing mvdiff is impossible (mvdiff is installed
# editable in this environment, so "not imported" is enforced, not assumed).
NO_MVDIFF = textwrap.dedent(
    """
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "mvdiff":
                raise ImportError("mvdiff must not be imported here")
    sys.meta_path.insert(0, Block())
    import numpy as np, torch
    from diffusers import DiffusionPipeline
    torch.set_num_threads(1)
    out = {}
    for name, image in (("mv", None), ("image", np.load(sys.argv[2]))):
        pipe = DiffusionPipeline.from_pretrained(sys.argv[1] + "/" + name, trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        extra = {} if image is None else {"image": image, "image_background": 1.0}
        out[name] = pipe("a corgi", generator=torch.Generator().manual_seed(0), height=64,
                         width=64, num_inference_steps=2, output_type="np", **extra).images
        out[name + "_classes"] = np.array([type(pipe).__module__, type(pipe.unet).__module__])
    np.savez(sys.argv[3], **out)
    assert not [m for m in sys.modules if m.split(".")[0] == "mvdiff"]
    """
)


@pytest.mark.slow  # ~30 s: a fresh interpreter loads and samples two folders
def test_folder_loads_in_plain_diffusers_without_mvdiff(tmp_path):
    """save_pretrained writes the pipeline and UNet code into the folder; a process that never
    imports mvdiff loads it with DiffusionPipeline.from_pretrained(trust_remote_code=True) and
    samples exactly what mvdiff samples (text-only and image-prompt models)."""
    torch.set_num_threads(1)
    mv = MVDreamPipeline(**tiny_components(0))
    image = MVDreamPipeline(**tiny_image_components(0))
    mv.save_pretrained(tmp_path / "models" / "mv")
    image.save_pretrained(tmp_path / "models" / "image")
    np.save(tmp_path / "photo.npy", _photo())
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    res = subprocess.run(
        [sys.executable, "-c", NO_MVDIFF, str(tmp_path / "models"), str(tmp_path / "photo.npy"),
         str(tmp_path / "out.npz")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = np.load(tmp_path / "out.npz")
    assert all(m.startswith("diffusers_modules.") for m in got["mv_classes"])  # the shipped code
    assert np.array_equal(got["mv"], _sample(mv))
    assert np.array_equal(got["image"], _sample(image, _photo()))


def test_mvdiff_reads_its_folders_with_its_own_classes(tmp_path):
    pipe = MVDreamPipeline(**tiny_components(0))
    pipe.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_mvdream", "MVDreamPipeline"]
    assert index["unet"] == ["unet_mv", "MultiViewUNet2DConditionModel"]
    loaded = MVDreamPipeline.from_pretrained(tmp_path / "model")  # no trust_remote_code
    assert type(loaded) is MVDreamPipeline and type(loaded.unet) is MultiViewUNet2DConditionModel
    assert np.array_equal(_sample(loaded), _sample(pipe))


def test_push_to_hub_uploads_the_code(monkeypatch):
    """pipe.push_to_hub(repo) saves through save_pretrained, so the uploaded folder carries the
    shipped code (the hub calls are replaced: tests never touch a hub)."""
    from types import SimpleNamespace

    from diffusers.utils import hub_utils

    card = SimpleNamespace(save=lambda path: Path(path).write_text("card"))
    monkeypatch.setattr(
        hub_utils, "create_repo", lambda repo_id, **_: SimpleNamespace(repo_id=repo_id)
    )
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *_, **__: card)
    monkeypatch.setattr(hub_utils, "populate_model_card", lambda c, *_, **__: c)
    uploaded = {}

    def upload(self, folder, repo_id, **_):
        uploaded[repo_id] = {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*")}
        uploaded["index"] = json.loads((Path(folder) / "model_index.json").read_text())

    monkeypatch.setattr(MVDreamPipeline, "_upload_folder", upload)
    MVDreamPipeline(**tiny_components(0)).push_to_hub("me/tiny-mvdream")
    assert {"pipeline_mvdream.py", "unet/unet_mv.py", "README.md"} <= uploaded["me/tiny-mvdream"]
    assert uploaded["index"]["_class_name"] == ["pipeline_mvdream", "MVDreamPipeline"]


def test_shipped_code_is_mvdiffs_own_source(tmp_path):
    """The shipped files are the listed mvdiff modules verbatim (less their imports of each
    other and mvdiff-only blocks): every line comes from a source, in order, and nothing is
    defined twice."""
    MVDreamPipeline(**tiny_components(0)).save_pretrained(tmp_path / "model")
    for target, sources in F.SHIPPED.items():
        shipped = (tmp_path / "model" / target).read_text()
        assert shipped == F.shipped_source(target)
        body = shipped.split("\n# ---- ")
        assert len(body) == len(sources) + 1
        for part, source in zip(body[1:], sources):
            name, text = part.split("\n", 1)
            assert name == f"mvdiff/{source}"
            original = (F.PACKAGE / source).read_text().splitlines()
            it = iter(original)
            assert all(line in it for line in text.splitlines())  # a subsequence
            kept = len(text.splitlines())
            assert kept >= len(original) - 40  # only imports and mvdiff-only blocks left out
        assert F.BEGIN not in shipped and F.END not in shipped and "import mvdiff" not in shipped
        names = [
            t.id if isinstance(t, ast.Name) else node.name
            for node in ast.parse(shipped).body
            for t in (node.targets if isinstance(node, ast.Assign) else [node])
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign))
            and isinstance(t, (ast.Name, ast.FunctionDef, ast.ClassDef))
        ]
        assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


def test_folders_written_before_the_code_was_shipped_still_load(tmp_path):
    """Old folders: "_class_name": "MVDreamPipeline", unet library "mvdiff.models.unet_mv"."""
    from diffusers import DiffusionPipeline

    from mvdiff.pipelines import ENTRY_FILE

    pipe = MVDreamPipeline(**tiny_components(0))
    pipe.save_pretrained(tmp_path / "old")
    index_path = tmp_path / "old" / "model_index.json"
    index = json.loads(index_path.read_text())
    index.update(_class_name="MVDreamPipeline", unet=list(F.OWN_UNET))
    index_path.write_text(json.dumps(index))
    (tmp_path / "old" / "pipeline_mvdream.py").unlink()
    (tmp_path / "old" / "unet" / "unet_mv.py").unlink()
    loaded = MVDreamPipeline.from_pretrained(tmp_path / "old")
    assert type(loaded.unet) is MultiViewUNet2DConditionModel
    assert np.array_equal(_sample(loaded), _sample(pipe))
    via_entry = DiffusionPipeline.from_pretrained(
        tmp_path / "old", custom_pipeline=ENTRY_FILE, trust_remote_code=True
    )
    assert type(via_entry) is MVDreamPipeline
    # re-saving upgrades it to the shipped-code layout
    loaded.save_pretrained(tmp_path / "new")
    assert (tmp_path / "new" / "unet" / "unet_mv.py").is_file()


# ---------------------------------------------------------------- community layout


def _community_folder(path, unet_sd, params, parts, dtype=torch.float16) -> Path:
    """A folder in the layout of ashawkey/mvdream-sd2.1-diffusers / imagedream-ipmv-diffusers:
    model_index.json naming mv_unet.MultiViewUNetModel, unet/config.json with the official
    parameters (less the keys their converter drops), weights under the official key names
    (fp16 as published, or ``dtype``), standard diffusers/transformers folders for the rest."""
    for name, comp in parts.items():
        if name != "unet":
            comp.save_pretrained(path / name)
    config = {k: v for k, v in params.items() if k not in
              ("legacy", "use_linear_in_transformer", "use_spatial_transformer", "ip_mode",
               "with_ip")}  # fmt: skip
    config.update(_class_name="MultiViewUNetModel", _diffusers_version="0.25.0")
    (path / "unet").mkdir(parents=True)
    (path / "unet" / "config.json").write_text(json.dumps(config))
    (path / "unet" / "mv_unet.py").write_text("raise RuntimeError('community code must not run')\n")
    sd = {k: v.to(dtype).contiguous() for k, v in unet_sd.items()}
    save_file(sd, str(path / "unet" / "diffusion_pytorch_model.safetensors"))
    image = "image_encoder" in parts
    index = {
        "_class_name": "MVDreamPipeline",
        "_diffusers_version": "0.25.0",
        "feature_extractor": ["transformers", "CLIPImageProcessor"] if image else [None, None],
        "image_encoder": ["transformers", "CLIPVisionModel"] if image else [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["mv_unet", "MultiViewUNetModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path


def test_community_mvdream_folder_matches_the_official_model(
    tmp_path, reference, reference_unet_sd
):
    """MVDreamPipeline.from_pretrained(community folder): the UNet converted on load gives the
    official model's outputs (reference vectors of the official code), and the pipeline runs."""
    tensors, meta = reference
    params = meta["unet_config_official_names"]
    folder = _community_folder(tmp_path / "c", reference_unet_sd, params, tiny_components(0))
    pipe = MVDreamPipeline.from_pretrained(folder)
    assert type(pipe.unet) is MultiViewUNet2DConditionModel and pipe.unet.dtype == torch.float32
    for case in ("case_mv", "case_2d", "case_mv_nocam"):
        with torch.no_grad():
            out = pipe.unet(
                tensors[f"{case}.x"], tensors[f"{case}.timesteps"], tensors[f"{case}.context"],
                camera=tensors.get(f"{case}.camera"), num_views=meta["num_views"][case],
            ).sample  # fmt: skip
        # the folder holds fp16 weights (as published): compare at fp16 weight precision
        assert (out - tensors[f"{case}.out"]).abs().max() <= 5e-3, case
    images = _sample(pipe)
    assert images.shape == (4, 64, 64, 3) and np.isfinite(images).all()
    half = MVDreamPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    # its weights converted exactly (fp16 -> fp32 is exact)
    again = MultiViewUNet2DConditionModel.from_config(pipe.unet.config)
    from mvdiff.convert import convert_unet_state_dict

    again.load_state_dict(convert_unet_state_dict(reference_unet_sd, dict(params)))
    for k, v in again.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[k], v.half().float()), k


def test_community_imagedream_folder_matches_the_official_model(tmp_path):
    """ImageDream's community folder (ip_dim > 0: the resampler and decoupled attention, plus
    image_encoder/ and feature_extractor/) against the official ImageDream reference vectors."""
    from safetensors.torch import load_file

    ref = FIXTURES / "reference"
    sd = torch.load(ref / "imagedream_tiny_visible.pt", weights_only=True)
    sd = {k.removeprefix("model.diffusion_model."): v for k, v in sd.items()}
    params = yaml.safe_load((ref / "imagedream_tiny_visible.yaml").read_text())
    params = params["model"]["params"]["unet_config"]["params"]
    parts = tiny_image_components(0)
    folder = _community_folder(tmp_path / "c", sd, params, parts, dtype=torch.float32)
    pipe = MVDreamPipeline.from_pretrained(folder)
    assert pipe.unet.config.num_image_tokens == 16 and pipe.has_image_prompt
    assert type(pipe.image_encoder) is type(parts["image_encoder"])
    cases = load_file(str(ref / "imagedream_tiny_visible.safetensors"))
    for case in ("pixel5", "pixel5_uncond", "local4"):
        with torch.no_grad():
            out = pipe.unet(
                cases[f"{case}.x"], cases[f"{case}.t"], encoder_hidden_states=cases[f"{case}.ctx"],
                camera=cases[f"{case}.cam"], num_views=int(cases[f"{case}.num_frames"]),
                image_embeds=cases[f"{case}.ip"],
                reference_latents=cases[f"{case}.ip_img"] if int(cases[f"{case}.pixel"]) else None,
            ).sample  # fmt: skip
        assert (out - cases[f"{case}.out"]).abs().max() <= 1e-4, case


def test_community_folder_errors_and_convert_message(tmp_path, reference_unet_sd, reference):
    from mvdiff.convert import convert_mvdream_checkpoint
    from mvdiff.pipelines.loading import load_pipeline

    params = dict(reference[1]["unet_config_official_names"])
    folder = _community_folder(tmp_path / "c", reference_unet_sd, params, tiny_components(0))
    # the sample command's loader takes it as it is
    pipe, info = load_pipeline(str(folder), log=lambda *_: None)
    assert info["kind"] == "folder" and type(pipe.unet) is MultiViewUNet2DConditionModel
    with pytest.raises(UserError, match="load it as it is"):
        convert_mvdream_checkpoint(folder, tmp_path / "out")
    # and training starts from it (model.pretrained=FOLDER)
    from mvdiff.training.components import load_components

    parts = load_components(str(folder))
    assert parts.source == "multiview" and type(parts.unet) is MultiViewUNet2DConditionModel
    torch.testing.assert_close(parts.unet.state_dict(), pipe.unet.state_dict())
    # a hub id is read from a snapshot (configs, safetensors, code; the download is replaced)
    import huggingface_hub

    asked = {}

    def snapshot(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        return str(folder)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "snapshot_download", snapshot)
        hub = MVDreamPipeline.from_pretrained("ashawkey/mvdream-sd2.1-diffusers", revision="main")
    assert asked["repo_id"] == "ashawkey/mvdream-sd2.1-diffusers" and asked["revision"] == "main"
    assert "*.safetensors" in asked["allow_patterns"] and "*.bin" not in asked["allow_patterns"]
    assert type(hub.unet) is MultiViewUNet2DConditionModel
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "unet" / "config.json").read_text())
    (bad / "unet" / "config.json").write_text(json.dumps({**config, "use_scale_shift_norm": True}))
    with pytest.raises(UserError, match="use_scale_shift_norm"):
        MVDreamPipeline.from_pretrained(bad)
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    (bad / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(UserError, match="no diffusion_pytorch_model"):
        MVDreamPipeline.from_pretrained(bad)


# ---------------------------------------------------------------- LoRA adapters


def _trained_lora(rank=2, alpha=4):
    from mvdiff.training.config import LoraSettings
    from mvdiff.training.dreambooth import add_lora

    unet = tiny_components(0)["unet"]
    config = add_lora(unet, LoraSettings(rank=rank, alpha=alpha))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:  # as if trained (B starts at zero)
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return unet, config


def _unet_out(unet):
    g = torch.Generator().manual_seed(2)
    x, ctx, cam = (torch.randn(s, generator=g) for s in ((4, 4, 8, 8), (4, 77, 32), (4, 16)))
    with torch.no_grad():
        return unet(x, torch.tensor([500]), ctx, camera=cam, num_views=4).sample


def test_lora_adapter_is_diffusers_format_and_old_peft_adapters_still_load(tmp_path):
    """save_lora_adapter writes diffusers' LoRA format (alpha != rank kept through the file's
    metadata); apply_lora_adapter fuses it; adapters in the former peft layout still load."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from mvdiff.pipelines.loading import apply_lora_adapter, load_pipeline, save_lora_adapter

    unet, config = _trained_lora()
    want = _unet_out(unet)
    new = save_lora_adapter(unet, config, tmp_path / "new", {"base_model": "tiny"})
    fused = tiny_components(0)["unet"]
    apply_lora_adapter(fused, new, log=lambda *_: None)
    assert not any("lora" in n for n, _ in fused.named_parameters())
    torch.testing.assert_close(_unet_out(fused), want, atol=1e-5, rtol=1e-4)
    pipe = MVDreamPipeline(**tiny_components(0))  # diffusers' API, unfused
    pipe.load_lora_weights(str(new))
    torch.testing.assert_close(_unet_out(pipe.unet), want, atol=1e-5, rtol=1e-4)

    old = tmp_path / "old"  # what mvdiff wrote before: peft's files + format mvdiff-lora/1
    old.mkdir()
    config.save_pretrained(str(old))
    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    save_file(state, str(old / "adapter_model.safetensors"))
    (old / "mvdiff_adapter.json").write_text(
        json.dumps({"format": "mvdiff-lora/1", "base_model": "tiny"})
    )
    from_old = tiny_components(0)["unet"]
    apply_lora_adapter(from_old, old, log=lambda *_: None)
    torch.testing.assert_close(_unet_out(from_old), want, atol=1e-5, rtol=1e-4)

    # a diffusers LoRA folder written by other tools (no mvdiff_adapter.json) works with --lora
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(new / "pytorch_lora_weights.safetensors", plain)
    pipe, info = load_pipeline("tiny", lora=str(plain), log=lambda *_: None)
    assert info["adapter"]["merged"]
    torch.testing.assert_close(_unet_out(pipe.unet), want, atol=1e-5, rtol=1e-4)
