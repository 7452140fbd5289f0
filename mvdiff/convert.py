"""Official MVDream / ImageDream checkpoints -> a diffusers-format model folder.

The official checkpoints (``sd-v2.1-base-4view.pt``, ``sd-v1.5-4view.pt``) hold an LDM state
dict: ``model.diffusion_model.*`` (the multi-view UNet, camera MLP under ``camera_embed``),
``first_stage_model.*`` (the VAE), ``cond_stage_model.*`` (OpenCLIP ViT-H text tower for 2.1,
HF CLIP for 1.5) and the schedule buffers. ImageDream (``sd-v2.1-base-4view-ipmv.pt``) is
saved from its ``LatentDiffusionInterface``, whose modules are named ``model`` (the UNet, plus
the image-prompt resampler ``image_embed.*`` and ``to_k_ip`` / ``to_v_ip``), ``vae_model`` and
``clip_model`` (``FrozenOpenCLIPEmbedder`` with ``ip_mode`` set, so the OpenCLIP model keeps
its vision tower ``clip_model.model.visual.*``); both prefix sets are accepted.
:func:`convert_mvdream_checkpoint` maps every key to its diffusers counterpart — a key it
does not know, or a model weight the checkpoint lacks, is an error, never a silent skip — and
writes::

    OUTPUT_DIR/model_index.json        (MVDreamPipeline, written by its save_pretrained)
    OUTPUT_DIR/pipeline_mvdream.py     the pipeline code (mvdiff.pipelines.folders)
    OUTPUT_DIR/unet/                   MultiViewUNet2DConditionModel (+ its code, unet_mv.py)
    OUTPUT_DIR/vae/                    AutoencoderKL
    OUTPUT_DIR/text_encoder/           CLIPTextModel
    OUTPUT_DIR/tokenizer/              CLIPTokenizer (the CLIP BPE files shipped with mvdiff)
    OUTPUT_DIR/scheduler/              DDIMScheduler configured like the official sampler
    OUTPUT_DIR/image_encoder/          CLIPVisionModel (ImageDream: the OpenCLIP ViT-H tower)
    OUTPUT_DIR/feature_extractor/      CLIPImageProcessor (OpenCLIP's 224 px preprocessing)

or only ``unet/`` with ``unet_only=True``. The folder is built under a temporary name and
renamed when complete.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from mvdiff.errors import UserError
from mvdiff.models.unet_mv import (
    IMAGE_EMBED_DIM,
    PRESETS,
    MultiViewUNet2DConditionModel,
    multiview_unet_config,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
HFCLIP_PREFIX = "cond_stage_model.transformer."
# ImageDream's LatentDiffusionInterface names the VAE and the OpenCLIP embedder differently
IMAGEDREAM_VAE_PREFIX = "vae_model."
IMAGEDREAM_OPENCLIP_PREFIX = "clip_model.model."
VISUAL = "visual."
#: OpenCLIP ViT-H/14's attention head width (``head_width`` in its model config; the fused
#: ``in_proj`` weights do not tell the head count).
VISION_HEAD_WIDTH = 80
#: OpenCLIP's image normalisation (``OPENAI_DATASET_MEAN`` / ``_STD``), used by ViT-H/14.
OPENCLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENCLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCHEDULE_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
TOKENIZER_DIR = Path(__file__).parent / "resources" / "clip_tokenizer"

# ----------------------------------------------------------------------------- configs


@dataclass
class OriginalConfig:
    """What the converter needs from an official-style YAML (``model.params``)."""

    unet: dict
    vae: dict = field(
        default_factory=lambda: dict(ch=128, ch_mult=[1, 2, 4, 4], num_res_blocks=2, z_channels=4)
    )
    vae_embed_dim: int = 4
    text_encoder: str = "openclip"  # "openclip" (SD 2.x, penultimate layer) or "hfclip" (SD 1.x)
    linear_start: float = 0.00085
    linear_end: float = 0.012
    timesteps: int = 1000
    scale_factor: float = 0.18215


#: Converter presets: the MVDream UNets plus ImageDream's (``sd_v2_base_ipmv.yaml``).
CONVERT_PRESETS: dict[str, dict] = {
    **PRESETS,
    "sd-v2.1-base-4view-ipmv": dict(
        PRESETS["sd-v2.1-base-4view"], with_ip=True, ip_dim=16, ip_mode="local_resample"
    ),
}


def _preset(name: str) -> OriginalConfig:
    if name not in CONVERT_PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {sorted(CONVERT_PRESETS)}")
    return OriginalConfig(
        unet=dict(CONVERT_PRESETS[name]), text_encoder="openclip" if "v2" in name else "hfclip"
    )


def parse_original_config(config: str | Path | dict) -> OriginalConfig:
    """An official-style YAML (path or dict) or a preset name -> :class:`OriginalConfig`."""
    if isinstance(config, str) and config in CONVERT_PRESETS:
        return _preset(config)
    if not isinstance(config, dict):
        path = Path(config)
        if not path.is_file():
            raise UserError(
                f"--original-config {path}: no such file (or use a preset: "
                f"{sorted(CONVERT_PRESETS)})"
            )
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"--original-config {path}: not valid YAML ({e})") from None
    try:
        params = config["model"]["params"]
        unet = dict(params["unet_config"]["params"])
    except (KeyError, TypeError):
        raise UserError(
            "original config: expected model.params.unet_config.params (official MVDream layout)"
        ) from None
    out = OriginalConfig(unet=unet)
    # MVDream names them first_stage_config / cond_stage_config, ImageDream vae_config /
    # clip_config
    vae_cfg = params.get("first_stage_config") or params.get("vae_config") or {}
    first = vae_cfg.get("params", {}) or {}
    if "ddconfig" in first:
        dd = first["ddconfig"]
        out.vae = {k: dd[k] for k in ("ch", "ch_mult", "num_res_blocks", "z_channels") if k in dd}
        out.vae_embed_dim = int(first.get("embed_dim", 4))
    text_cfg = params.get("cond_stage_config") or params.get("clip_config") or {}
    target = str(text_cfg.get("target", "OpenCLIP"))
    out.text_encoder = "openclip" if "OpenCLIP" in target else "hfclip"
    for k in ("linear_start", "linear_end", "timesteps", "scale_factor"):
        if k in params:
            setattr(out, k, type(getattr(out, k))(params[k]))
    return out


_UNET_PARAMS = (
    "model_channels",
    "channel_mult",
    "attention_resolutions",
    "num_res_blocks",
    "num_head_channels",
    "num_heads",
    "use_linear_in_transformer",
    "context_dim",
    "camera_dim",
    "transformer_depth",
    "in_channels",
    "out_channels",
)


def unet_config_from_original(unet: dict, image_embed_dim: int = IMAGE_EMBED_DIM) -> dict:
    """diffusers UNet config from official ``unet_config.params`` (other keys are ignored).

    ImageDream's ``with_ip`` / ``ip_dim`` (the image-token count) / ``ip_mode`` become
    ``num_image_tokens``; only ``ip_mode: local_resample`` (the released ``ipmv`` models,
    IP-Adapter-Plus resampler) is supported. ``image_embed_dim`` is the resampler's input
    width (the official code hard-codes 1280, OpenCLIP ViT-H).
    """
    kw = {k: v for k, v in unet.items() if k in _UNET_PARAMS and v not in (-1, None)}
    if "num_head_channels" in kw:
        kw.setdefault("num_heads", None)
    else:
        kw["num_head_channels"] = None
    try:
        config = multiview_unet_config(**kw)
    except TypeError as e:
        raise UserError(f"original config: bad unet_config.params ({e})") from None
    if unet.get("with_ip") and int(unet.get("ip_dim", 0) or 0) > 0:
        mode = unet.get("ip_mode", "local_resample")
        if mode != "local_resample":
            raise UserError(
                f"original config: ip_mode {mode!r} is not supported (only local_resample, "
                "the released ImageDream ipmv models)"
            )
        if not unet.get("context_dim"):
            raise UserError("original config: with_ip needs context_dim")
        config["num_image_tokens"] = int(unet["ip_dim"])
        config["image_embed_dim"] = int(image_embed_dim)
    return config


def has_image_prompt(unet: dict) -> bool:
    return bool(unet.get("with_ip")) and int(unet.get("ip_dim", 0) or 0) > 0


_RESAMPLER_BLOCK = {
    "0.norm1": "ln0",
    "0.norm2": "ln1",
    "0.to_q": "attn.to_q",
    "0.to_out": "attn.to_out.0",
    "1.0": "ff.0",
    "1.1": "ff.1.net.0.proj",
    "1.3": "ff.1.net.2",
}


def convert_resampler_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ``image_embed.*`` (ImageDream's ``Resampler``, prefix stripped) -> the keys of
    diffusers' ``IPAdapterPlusImageProjection``. ``to_kv`` is ``[to_k; to_v]`` stacked by
    rows (the official forward chunks its output in two), so it is split."""
    out, unknown = {}, []
    for k, v in sd.items():
        parts = k.split(".")
        if k in ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight") or k in (
            "proj_out.bias",
            "norm_out.weight",
            "norm_out.bias",
        ):
            out[k] = v
        elif parts[0] == "layers" and len(parts) >= 4:
            i, rest = parts[1], ".".join(parts[2:])
            if rest == "0.to_kv.weight":
                out[f"layers.{i}.attn.to_k.weight"], out[f"layers.{i}.attn.to_v.weight"] = v.chunk(
                    2, dim=0
                )
                continue
            mod, kind = rest.rsplit(".", 1)
            if mod not in _RESAMPLER_BLOCK:
                unknown.append(k)
                continue
            out[f"layers.{i}.{_RESAMPLER_BLOCK[mod]}.{kind}"] = v
        else:
            unknown.append(k)
    if unknown:
        raise UserError(
            f"UNet image prompt: unknown key(s) {['image_embed.' + k for k in unknown[:5]]}"
        )
    return out


# ----------------------------------------------------------------------------- key maps


def _lookup(key: str, prefixes: dict[str, tuple[str, dict[str, str]]]) -> str | None:
    """Rename ``key`` by the longest module prefix it starts with (and a sub-rename table)."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in prefixes:
            target, sub = prefixes[prefix]
            rest = ".".join(parts[cut:])
            for old, new in sub.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old) :]
                    break
            return f"{target}.{rest}"
    return None


_RESBLOCK = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def unet_key_prefixes(unet: dict) -> dict[str, tuple[str, dict[str, str]]]:
    """Module prefixes of the official UNet -> (diffusers prefix, sub-renames)."""
    levels = len(unet["channel_mult"])
    nrb = int(unet["num_res_blocks"])
    attn = [2**level in set(unet["attention_resolutions"]) for level in range(levels)]
    m: dict[str, tuple[str, dict[str, str]]] = {
        "time_embed.0": ("time_embedding.linear_1", {}),
        "time_embed.2": ("time_embedding.linear_2", {}),
        "camera_embed.0": ("class_embedding.linear_1", {}),
        "camera_embed.2": ("class_embedding.linear_2", {}),
        "input_blocks.0.0": ("conv_in", {}),
        "middle_block.0": ("mid_block.resnets.0", _RESBLOCK),
        "middle_block.1": ("mid_block.attentions.0", {}),
        "middle_block.2": ("mid_block.resnets.1", _RESBLOCK),
        "out.0": ("conv_norm_out", {}),
        "out.2": ("conv_out", {}),
    }
    idx = 1
    for level in range(levels):
        for j in range(nrb):
            m[f"input_blocks.{idx}.0"] = (f"down_blocks.{level}.resnets.{j}", _RESBLOCK)
            if attn[level]:
                m[f"input_blocks.{idx}.1"] = (f"down_blocks.{level}.attentions.{j}", {})
            idx += 1
        if level != levels - 1:
            m[f"input_blocks.{idx}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", {})
            idx += 1
    idx = 0
    for up, level in enumerate(reversed(range(levels))):
        for j in range(nrb + 1):
            m[f"output_blocks.{idx}.0"] = (f"up_blocks.{up}.resnets.{j}", _RESBLOCK)
            k = 1
            if attn[level]:
                m[f"output_blocks.{idx}.1"] = (f"up_blocks.{up}.attentions.{j}", {})
                k = 2
            if level != 0 and j == nrb:
                m[f"output_blocks.{idx}.{k}.conv"] = (f"up_blocks.{up}.upsamplers.0.conv", {})
            idx += 1
    return m


_VAE_RES = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_key_prefixes(levels: int, nrb: int) -> dict[str, tuple[str, dict[str, str]]]:
    m: dict[str, tuple[str, dict[str, str]]] = {}
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        m[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        m[f"{part}.norm_out"] = (f"{part}.conv_norm_out", {})
        m[f"{part}.mid.block_1"] = (f"{part}.mid_block.resnets.0", _VAE_RES)
        m[f"{part}.mid.attn_1"] = (f"{part}.mid_block.attentions.0", _VAE_ATTN)
        m[f"{part}.mid.block_2"] = (f"{part}.mid_block.resnets.1", _VAE_RES)
    for i in range(levels):
        for j in range(nrb):
            m[f"encoder.down.{i}.block.{j}"] = (f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RES)
        m[f"encoder.down.{i}.downsample.conv"] = (
            f"encoder.down_blocks.{i}.downsamplers.0.conv",
            {},
        )
        up = levels - 1 - i  # the decoder's up.{i} runs in reverse order
        for j in range(nrb + 1):
            m[f"decoder.up.{i}.block.{j}"] = (f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RES)
        m[f"decoder.up.{i}.upsample.conv"] = (f"decoder.up_blocks.{up}.upsamplers.0.conv", {})
    m["quant_conv"] = ("quant_conv", {})
    m["post_quant_conv"] = ("post_quant_conv", {})
    return m


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _rename_all(sd: dict, prefixes: dict, what: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for k, v in sd.items():
        new = _lookup(k, prefixes)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise UserError(
            f"{what}: {len(unknown)} key(s) the converter does not know, e.g. {unknown[:5]} "
            "(wrong --original-config?)"
        )
    return out


def _empty(cls, *args, **kwargs):
    """Build a model with its parameters on the meta device (no init cost, no memory)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls(*args, **kwargs)


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Assign a renamed state dict, insisting on the same key set and shapes.

    Tensors keep the checkpoint's dtype; cast the model afterwards.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{what}: checkpoint and architecture disagree: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
            "wrong --original-config?"
        )
    bad = [
        (k, tuple(sd[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if sd[k].shape != v.shape
    ]
    if bad:
        raise UserError(f"{what}: shape mismatch for {len(bad)} tensor(s), e.g. {bad[:3]}")
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True, assign=True)


def convert_unet_state_dict(
    unet_sd: dict[str, torch.Tensor], unet: dict
) -> dict[str, torch.Tensor]:
    """Official UNet state dict (no ``model.diffusion_model.`` prefix) -> diffusers names.

    The image-prompt resampler ``image_embed.*`` becomes ``image_proj.*``; ``to_k_ip`` /
    ``to_v_ip`` keep their names inside the renamed transformer blocks."""
    proj = {k[len("image_embed.") :]: v for k, v in unet_sd.items() if k.startswith("image_embed.")}
    rest = {k: v for k, v in unet_sd.items() if not k.startswith("image_embed.")}
    out = _rename_all(rest, unet_key_prefixes(unet), "UNet")
    out.update({f"image_proj.{k}": v for k, v in convert_resampler_state_dict(proj).items()})
    return out


def _cast(model, dtype: torch.dtype):
    return model if next(model.parameters()).dtype == dtype else model.to(dtype)


def build_unet(unet_sd: dict[str, torch.Tensor], unet: dict) -> MultiViewUNet2DConditionModel:
    proj_in = unet_sd.get("image_embed.proj_in.weight")
    embed_dim = proj_in.shape[1] if proj_in is not None else IMAGE_EMBED_DIM
    config = unet_config_from_original(unet, image_embed_dim=embed_dim)
    model = _empty(MultiViewUNet2DConditionModel.from_config, config)
    _load_into(model, convert_unet_state_dict(unet_sd, unet), "UNet")
    return model


def build_vae(vae_sd: dict[str, torch.Tensor], cfg: OriginalConfig):
    from diffusers import AutoencoderKL

    mult = list(cfg.vae["ch_mult"])
    nrb = int(cfg.vae["num_res_blocks"])
    vae = _empty(
        AutoencoderKL,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(mult),
        up_block_types=["UpDecoderBlock2D"] * len(mult),
        block_out_channels=[cfg.vae["ch"] * m for m in mult],
        layers_per_block=nrb,
        latent_channels=cfg.vae_embed_dim,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=cfg.scale_factor,
    )
    sd = _rename_all(vae_sd, vae_key_prefixes(len(mult), nrb), "VAE")
    for k in list(sd):
        if ".attentions." in k and k.endswith("weight") and sd[k].ndim == 4:
            sd[k] = sd[k][:, :, 0, 0]  # 1x1 conv (C, C, 1, 1) -> linear (C, C)
    _load_into(vae, sd, "VAE")
    return vae


def build_openclip_text_encoder(te_sd: dict[str, torch.Tensor]):
    """OpenCLIP text tower -> ``CLIPTextModel`` giving MVDream's 'penultimate' features.

    The official embedder runs all but the last residual block, then ``ln_final``; a
    ``CLIPTextModel`` with one layer fewer (its ``last_hidden_state`` is normalised by
    ``final_layer_norm``) computes exactly that, so the last block, ``text_projection`` and
    ``logit_scale`` are read and deliberately dropped.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    try:
        width = te_sd["token_embedding.weight"].shape[1]
        vocab = te_sd["token_embedding.weight"].shape[0]
        positions = te_sd["positional_embedding"].shape[0]
        inner = te_sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise UserError(
            f"text encoder: checkpoint lacks cond_stage_model.model.{e.args[0]}"
        ) from None
    layers = 1 + max(int(k.split(".")[2]) for k in te_sd if k.startswith("transformer.resblocks."))
    config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=layers - 1,
        num_attention_heads=max(width // 64, 1),
        max_position_embeddings=positions,
        hidden_act="gelu",
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    model = _empty(CLIPTextModel, config)
    sd, unknown = {}, []
    for k, v in te_sd.items():
        parts = k.split(".")
        if k == "positional_embedding":
            sd["embeddings.position_embedding.weight"] = v
        elif k == "token_embedding.weight":
            sd["embeddings.token_embedding.weight"] = v
        elif k.startswith("ln_final."):
            sd["final_layer_norm." + parts[1]] = v
        elif k in ("text_projection", "logit_scale"):
            continue  # not used for conditioning
        elif k.startswith("transformer.resblocks."):
            if int(parts[2]) == layers - 1:
                continue  # the last block: MVDream conditions on the penultimate layer
            if not _map_openclip_block(k, v, sd):
                unknown.append(k)
        elif k == "attn_mask":
            continue  # a constant causal mask in some exports
        else:
            unknown.append(k)
    if unknown:
        raise UserError(f"text encoder: unknown key(s) {unknown[:5]}")
    _load_text_encoder(model, sd)
    return model


_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _map_openclip_block(key: str, v: torch.Tensor, sd: dict[str, torch.Tensor]) -> bool:
    """One ``transformer.resblocks.{i}.*`` tensor of an OpenCLIP tower -> the transformers
    CLIP encoder layer's names in ``sd`` (the fused ``in_proj`` split into q/k/v). False for
    a name it does not know."""
    parts = key.split(".")
    i, rest = int(parts[2]), ".".join(parts[3:])
    pre = f"encoder.layers.{i}."
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = rest.rsplit("_", 1)[1]  # weight | bias
        for name, chunk in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
            sd[f"{pre}self_attn.{name}.{kind}"] = chunk
        return True
    mod, kind = rest.rsplit(".", 1)
    if mod not in _OPENCLIP_BLOCK:
        return False
    sd[f"{pre}{_OPENCLIP_BLOCK[mod]}.{kind}"] = v
    return True


def build_openclip_vision_encoder(vis_sd: dict[str, torch.Tensor]):
    """OpenCLIP vision tower (``visual.*`` without the prefix) -> ``CLIPVisionModel``.

    ImageDream's ``FrozenOpenCLIPEmbedder.encode_image_with_transformer`` runs ``conv1`` (no
    bias), prepends ``class_embedding``, adds ``positional_embedding``, applies ``ln_pre`` and
    takes the output of the penultimate residual block, without ``ln_post``: that is
    ``CLIPVisionModel(...).hidden_states[-2]`` (``hidden_states[0]`` is the embeddings after
    ``pre_layrnorm``). The whole tower is kept (``ln_post`` as ``post_layernorm``) so the
    folder is a standard ViT-H/14 image encoder; only ``proj`` (the image-text projection, used
    by the unreleased "global" mode) is dropped.
    """
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        conv = vis_sd["conv1.weight"]  # (width, 3, patch, patch)
        positions = vis_sd["positional_embedding"].shape[0]
        inner = vis_sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise UserError(f"image encoder: checkpoint lacks visual.{e.args[0]}") from None
    width, patch = conv.shape[0], conv.shape[2]
    grid = round((positions - 1) ** 0.5)
    if grid * grid != positions - 1 or width % VISION_HEAD_WIDTH:
        raise UserError(
            f"image encoder: {positions} positions / width {width} is not an OpenCLIP ViT "
            f"with {VISION_HEAD_WIDTH}-wide heads"
        )
    layers = 1 + max(int(k.split(".")[2]) for k in vis_sd if k.startswith("transformer.resblocks."))
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=width // VISION_HEAD_WIDTH,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        projection_dim=vis_sd["proj"].shape[1] if "proj" in vis_sd else width,
    )
    model = _empty(CLIPVisionModel, config)
    sd, unknown = {}, []
    simple = {
        "conv1.weight": "embeddings.patch_embedding.weight",
        "class_embedding": "embeddings.class_embedding",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_pre.weight": "pre_layrnorm.weight",
        "ln_pre.bias": "pre_layrnorm.bias",
        "ln_post.weight": "post_layernorm.weight",
        "ln_post.bias": "post_layernorm.bias",
    }
    for k, v in vis_sd.items():
        if k in simple:
            sd[simple[k]] = v
        elif k == "proj":
            continue  # image-text projection: not used by the image prompt
        elif not (k.startswith("transformer.resblocks.") and _map_openclip_block(k, v, sd)):
            unknown.append(k)
    if unknown:
        raise UserError(f"image encoder: unknown key(s) {['visual.' + k for k in unknown[:5]]}")
    expected = model.state_dict()
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in expected) else ""
    sd = {prefix + k: v for k, v in sd.items()}
    for k in expected:
        if k.endswith("position_ids"):
            sd[k] = expected[k]
    _load_into(model, sd, "image encoder")
    return model


def build_image_processor(image_size: int = 224):
    """OpenCLIP's preprocessing of ViT-H/14 as a ``CLIPImageProcessor``: RGB, bicubic resize
    of the short side to 224, centre crop 224, scale to [0, 1], OpenCLIP mean/std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENCLIP_MEAN),
        image_std=list(OPENCLIP_STD),
        do_convert_rgb=True,
    )


def _load_text_encoder(model, sd: dict[str, torch.Tensor]) -> None:
    """Load CLIP text weights named without the ``text_model.`` level (transformers 4 has it,
    transformers 5 does not); ``position_ids`` is a constant buffer, taken from the model."""
    expected = model.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in expected) else ""
    sd = {prefix + k: v for k, v in sd.items() if not k.endswith("position_ids")}
    for k in expected:
        if k.endswith("position_ids"):
            sd[k] = expected[k]
    _load_into(model, sd, "text encoder")


def build_hfclip_text_encoder(te_sd: dict[str, torch.Tensor]):
    """SD 1.x ``FrozenCLIPEmbedder`` (an HF ``CLIPTextModel`` already) -> ``CLIPTextModel``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    te_sd = {k.removeprefix("text_model."): v for k, v in te_sd.items()}  # transformers 4 level
    try:
        emb = te_sd["embeddings.token_embedding.weight"]
        fc1 = te_sd["encoder.layers.0.mlp.fc1.weight"]
        positions = te_sd["embeddings.position_embedding.weight"].shape[0]
    except KeyError as e:
        raise UserError(
            f"text encoder: checkpoint lacks cond_stage_model.transformer.text_model.{e.args[0]}"
        ) from None
    layers = 1 + max(int(k.split(".")[2]) for k in te_sd if k.startswith("encoder.layers."))
    config = CLIPTextConfig(
        vocab_size=emb.shape[0],
        hidden_size=emb.shape[1],
        intermediate_size=fc1.shape[0],
        num_hidden_layers=layers,
        num_attention_heads=max(emb.shape[1] // 64, 1),
        max_position_embeddings=positions,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = _empty(CLIPTextModel, config)
    _load_text_encoder(model, te_sd)
    return model


def build_tokenizer(text_encoder_kind: str):
    """The CLIP BPE tokenizer shipped with mvdiff (SD 2.x pads with '!', SD 1.x with EOS)."""
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"),
        str(TOKENIZER_DIR / "merges.txt"),
        pad_token="!" if text_encoder_kind == "openclip" else "<|endoftext|>",
        model_max_length=77,
    )
    if len(tok) != 49408:
        raise RuntimeError(f"CLIP tokenizer came back with {len(tok)} tokens, expected 49408")
    return tok


def build_scheduler(cfg: OriginalConfig):
    """DDIM like the official sampler: leading spacing, steps_offset=1, alpha_T not forced to 1."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=cfg.timesteps,
        beta_start=cfg.linear_start,
        beta_end=cfg.linear_end,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def check_schedule(state_dict: dict[str, torch.Tensor], scheduler) -> float:
    """Max difference (absolute, relative above 1) between the checkpoint's schedule buffers
    and the ones implied by the scheduler's betas."""
    # float64 from the betas, as LDM computes its buffers (then stores them in float32)
    n = scheduler.config.num_train_timesteps
    start, end = scheduler.config.beta_start, scheduler.config.beta_end
    betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    var = betas * (1 - ac_prev) / (1 - ac)
    ours = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": var,
        "posterior_log_variance_clipped": var.clamp(min=1e-20).log(),  # as LDM does
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac),
    }
    err = 0.0
    for k in SCHEDULE_KEYS:
        if k in state_dict:
            # relative to the magnitude: some buffers reach ~50 and are stored in float32
            diff = (state_dict[k].double() - ours[k]).abs() / ours[k].abs().clamp(min=1.0)
            err = max(err, float(diff.max()))
    return err


# ----------------------------------------------------------------------------- loading


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: ``.safetensors`` or a ``.pt``/``.ckpt`` of plain tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is bad input
            raise UserError(f"checkpoint {path}: not a readable safetensors file ({e})") from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"checkpoint {path}: cannot be loaded safely as tensors only ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]})"
            ) from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]  # Lightning-style wrapper
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path}: expected a flat dict of tensors")
    return sd


def infer_original_config(sd: dict[str, torch.Tensor]) -> OriginalConfig:
    """Pick the built-in preset that matches the checkpoint's cross-attention width."""
    key = next((k for k in sd if k.endswith("transformer_blocks.0.attn2.to_k.weight")), None)
    width = sd[key].shape[1] if key is not None else None
    preset = {1024: "sd-v2.1-base-4view", 768: "sd-v1.5-4view"}.get(width)
    if preset == "sd-v2.1-base-4view" and any(
        ".image_embed." in k or k.startswith("image_embed.") for k in sd
    ):
        preset = "sd-v2.1-base-4view-ipmv"
    if preset is None:
        raise UserError(
            f"cannot tell the architecture (context width {width}); pass --original-config YAML"
        )
    cfg = _preset(preset)
    probe = UNET_PREFIX + "input_blocks.1.1.proj_in.weight"
    if probe not in sd and "input_blocks.1.1.proj_in.weight" not in sd:
        raise UserError("checkpoint has no multi-view UNet keys; pass --original-config YAML")
    return cfg


@dataclass
class ConversionReport:
    output_dir: str
    unet_tensors: int = 0
    vae_tensors: int = 0
    text_encoder_tensors: int = 0
    image_encoder_tensors: int = 0
    dropped: list = field(default_factory=list)
    schedule_max_abs_error: float | None = None


def convert_state_dict(
    sd: dict[str, torch.Tensor],
    original_config: str | Path | dict | None = None,
    unet_only: bool = False,
    dtype: torch.dtype = torch.float32,
    source: str = "checkpoint",
) -> tuple[dict, ConversionReport]:
    """An official state dict -> (diffusers components by name, report). No I/O."""
    cfg = (
        parse_original_config(original_config)
        if original_config is not None
        else infer_original_config(sd)
    )
    report = ConversionReport(output_dir="")
    unet_sd = _strip(sd, UNET_PREFIX)
    if unet_only and not unet_sd:
        unet_sd = dict(sd)  # bare UNet keys
    if not unet_sd:
        raise UserError(f"{source}: no '{UNET_PREFIX}*' keys")
    if has_image_prompt(cfg.unet) != any(k.startswith("image_embed.") for k in unet_sd):
        raise UserError(
            f"{source}: the config says with_ip={bool(cfg.unet.get('with_ip'))} but the "
            "checkpoint "
            + ("lacks" if has_image_prompt(cfg.unet) else "has")
            + " image-prompt weights (image_embed.*); wrong --original-config?"
        )
    # MVDream's key prefixes, or ImageDream's LatentDiffusionInterface ones
    vae_prefix = next(
        (p for p in (VAE_PREFIX, IMAGEDREAM_VAE_PREFIX) if any(k.startswith(p) for k in sd)),
        VAE_PREFIX,
    )
    clip_prefix = next(
        (
            p
            for p in (OPENCLIP_PREFIX, IMAGEDREAM_OPENCLIP_PREFIX)
            if any(k.startswith(p) for k in sd)
        ),
        OPENCLIP_PREFIX,
    )
    if not unet_only:
        if any(k.startswith("model_ema.") for k in sd):
            raise UserError(
                f"{source}: EMA weights (model_ema.*) are not supported; export them first"
            )
        known = (UNET_PREFIX, vae_prefix, clip_prefix, HFCLIP_PREFIX)
        unknown = [k for k in sd if not k.startswith(known) and k not in SCHEDULE_KEYS]
        if unknown:
            raise UserError(f"{source}: unknown key(s) {unknown[:5]}")
    components = {"unet": _cast(build_unet(unet_sd, cfg.unet), dtype)}
    report.unet_tensors = len(unet_sd)
    if unet_only:
        return components, report

    vae_sd = _strip(sd, vae_prefix)
    if not vae_sd:
        raise UserError(
            f"{source}: no VAE ('{VAE_PREFIX}*' or '{IMAGEDREAM_VAE_PREFIX}*'); use --unet-only"
        )
    components["vae"] = _cast(build_vae(vae_sd, cfg), dtype)
    report.vae_tensors = len(vae_sd)
    if cfg.text_encoder == "openclip":
        clip_sd = _strip(sd, clip_prefix)
        te_sd = {k: v for k, v in clip_sd.items() if not k.startswith(VISUAL)}
        vis_sd = _strip(clip_sd, VISUAL)
        if not te_sd:
            raise UserError(f"{source}: no text encoder ('{clip_prefix}*')")
        components["text_encoder"] = _cast(build_openclip_text_encoder(te_sd), dtype)
        last = max(int(k.split(".")[2]) for k in te_sd if k.startswith("transformer.resblocks."))
        report.dropped = [
            f"{clip_prefix}transformer.resblocks.{last}.* (MVDream uses the penultimate layer)",
            f"{clip_prefix}text_projection, logit_scale (not used for conditioning)",
        ]
        if has_image_prompt(cfg.unet):
            if not vis_sd:
                raise UserError(
                    f"{source}: an ImageDream checkpoint without the OpenCLIP vision tower "
                    f"('{clip_prefix}{VISUAL}*'); use --unet-only"
                )
            encoder = build_openclip_vision_encoder(vis_sd)
            if encoder.config.hidden_size != components["unet"].config.image_embed_dim:
                raise UserError(
                    f"{source}: the vision tower is {encoder.config.hidden_size} wide, the "
                    f"UNet's resampler takes {components['unet'].config.image_embed_dim}"
                )
            components["image_encoder"] = _cast(encoder, dtype)
            components["feature_extractor"] = build_image_processor(
                components["image_encoder"].config.image_size
            )
            report.image_encoder_tensors = len(vis_sd)
            if "proj" in vis_sd:
                report.dropped.append(
                    f"{clip_prefix}{VISUAL}proj (image-text projection, not used by the "
                    "image prompt)"
                )
        elif vis_sd:
            report.dropped.append(
                f"{clip_prefix}{VISUAL}* ({len(vis_sd)} tensors: a vision tower, but the UNet "
                "has no image prompt)"
            )
    else:
        te_sd = _strip(sd, HFCLIP_PREFIX)
        if not te_sd:
            raise UserError(f"{source}: no text encoder ('{HFCLIP_PREFIX}*')")
        components["text_encoder"] = _cast(build_hfclip_text_encoder(te_sd), dtype)
    report.text_encoder_tensors = len(te_sd)
    components["tokenizer"] = build_tokenizer(cfg.text_encoder)
    components["scheduler"] = build_scheduler(cfg)
    if any(k in sd for k in SCHEDULE_KEYS):
        report.schedule_max_abs_error = check_schedule(sd, components["scheduler"])
        if report.schedule_max_abs_error > 1e-5:
            raise UserError(
                f"{source}: schedule buffers differ from linear {cfg.linear_start}->"
                f"{cfg.linear_end} over {cfg.timesteps} steps "
                f"(max error {report.schedule_max_abs_error:.2e}); check --original-config"
            )
    return components, report


def convert_mvdream_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path,
    original_config: str | Path | dict | None = None,
    unet_only: bool = False,
    dtype: torch.dtype = torch.float32,
) -> ConversionReport:
    """Convert an official MVDream checkpoint into a diffusers-format folder (see module doc).

    ``original_config``: an official-style YAML (path or parsed dict), a preset name
    (``sd-v2.1-base-4view``, ``sd-v1.5-4view``) or None to infer the preset from the weights.
    ``unet_only``: the checkpoint holds just the UNet (with or without the
    ``model.diffusion_model.`` prefix) and only ``unet/`` is written.
    """
    output_dir = Path(output_dir)
    if (Path(checkpoint_path) / "model_index.json").is_file():
        raise UserError(
            f"{checkpoint_path} is a diffusers model folder (mvdiff's or the community MVDream/"
            "ImageDream layout), not a checkpoint: load it as it is (--model "
            f"{checkpoint_path}, MVDreamPipeline.from_pretrained); .save_pretrained(OUT) "
            "rewrites it as an mvdiff folder"
        )
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise UserError(f"output directory {output_dir} exists and is not empty")
    sd = load_state_dict(checkpoint_path)
    components, report = convert_state_dict(
        sd, original_config, unet_only, dtype, source=f"checkpoint {checkpoint_path}"
    )
    write_model_folder(components, output_dir)
    report.output_dir = str(output_dir)
    return report


def write_model_folder(components: dict, output_dir: str | Path) -> None:
    """Save components (and a model_index.json for MVDreamPipeline) atomically to ``output_dir``."""
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise UserError(f"output directory {output_dir} exists and is not empty")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.with_name(f".{output_dir.name}.tmp-convert")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if set(components) >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}:
            from mvdiff.pipelines.pipeline_mvdream import MVDreamPipeline

            # diffusers' writer: model_index.json and the shipped code (pipelines/folders.py)
            MVDreamPipeline(**components).save_pretrained(str(tmp), safe_serialization=True)
        else:
            for name, comp in components.items():
                kwargs = {"safe_serialization": True} if isinstance(comp, torch.nn.Module) else {}
                comp.save_pretrained(str(tmp / name), **kwargs)
        if output_dir.exists():
            output_dir.rmdir()
        tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
