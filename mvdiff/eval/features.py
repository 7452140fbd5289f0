"""Models behind the learned metrics, loaded from weights the user gives (never fetched
unless ``allow_download``):

* :class:`ClipScorer` — CLIP score ``100 * max(cos(image, text), 0)`` with a
  ``transformers.CLIPModel`` from a local folder (``save_pretrained`` layout).
* :func:`load_feature_extractor` — image features for FID/KID from a local file:
  a TorchScript module (``torch.jit.save``; e.g. ``inception-2015-12-05.pt``, the Inception
  feature network of StyleGAN / clean-fid, which is called with ``return_features=True`` for
  its 2048-d pool features) or a torchvision ``inception_v3`` state dict (safetensors, or
  ``torch.save`` of tensors loaded with ``weights_only=True``, loaded strictly; needs
  torchvision). Pickled modules are refused: loading one runs arbitrary code — convert it
  with ``torch.jit.script`` / ``torch.jit.save``. Nothing is downloaded unless asked.

Images everywhere are float ``[N, 3, H, W]`` in [0, 1]. FID/KID follow the usual conventions
(clean-fid, torchmetrics / torch-fidelity): images are quantised to 8 bits first, the feature
network sees values in [0, 255] (its own normalisation inside; ``input_mode`` says
otherwise for other networks), resized bilinearly to ``size`` (299) as the Inception network
does itself, and the features are the 2048-d pool features.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mvdiff.errors import UserError

__all__ = ["ClipScorer", "FeatureExtractor", "load_feature_extractor"]

#: OpenAI CLIP's image normalisation (used when the folder has no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_MODES = ("unit", "imagenet", "uint8", "symmetric")


def _per_channel(values) -> torch.Tensor:
    """Three per-channel numbers as a ``[1, 3, 1, 1]`` float32 tensor."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 3, 1, 1)  # (3,) -> (1, 3, 1, 1)


def _normalise(values: torch.Tensor, mode: str) -> torch.Tensor:
    """8-bit values in [0, 255] -> what the network expects: uint8 (as they are), unit
    [0, 1], imagenet (mean/std) or symmetric [-1, 1]."""
    if mode == "uint8":
        return values
    if mode == "unit":
        return values / 255.0
    if mode == "symmetric":
        return values / 127.5 - 1.0
    mean, std = _per_channel(IMAGENET_MEAN), _per_channel(IMAGENET_STD)
    return (values / 255.0 - mean.to(values.device)) / std.to(values.device)


def _embeds(out) -> torch.Tensor:
    """Projected embeddings ``[N, D]`` from ``get_*_features``: a tensor in transformers 4,
    an output whose ``pooler_output`` holds them in transformers 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIP score of images against texts with a local ``CLIPModel`` folder.

    ``score(images, texts)`` returns ``[N]``: ``100 * max(cos(E_img, E_txt), 0)`` per pair
    (the scale of the usual "CLIP score"). The tokenizer comes from the folder, or — when the
    folder has none — the CLIP BPE tokenizer shipped with mvdiff (same vocabulary).
    """

    def __init__(
        self, folder: str, allow_download: bool = False, flag: str = "--clip", device="cpu"
    ):
        from transformers import CLIPModel

        path = Path(folder).expanduser()
        if not path.is_dir() and not allow_download:
            raise UserError(
                f"{flag} {folder}: not a local folder (a CLIPModel saved with save_pretrained); "
                "pass --allow-download to fetch a hub id"
            )
        try:
            self.model = CLIPModel.from_pretrained(
                str(path) if path.is_dir() else folder, local_files_only=not allow_download
            ).eval()
        except (OSError, ValueError) as e:
            raise UserError(f"{flag} {folder}: cannot load a CLIPModel ({e})") from None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.tokenizer = self._tokenizer(path, folder, allow_download)
        vision = self.model.config.vision_config
        self.size = int(vision.image_size)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        self.mean, self.std = _per_channel(mean), _per_channel(std)
        self.source = str(path) if path.is_dir() else folder

    @staticmethod
    def _tokenizer(path: Path, name: str, allow_download: bool):
        from transformers import CLIPTokenizer

        try:
            src = str(path) if path.is_dir() else name
            return CLIPTokenizer.from_pretrained(src, local_files_only=not allow_download)
        except (OSError, ValueError, TypeError):
            from mvdiff.convert import build_tokenizer

            return build_tokenizer("hfclip")

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float().to(self.device), size=(self.size, self.size), mode="bicubic",
                          align_corners=False).clamp(0, 1)  # fmt: skip
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return F.normalize(_embeds(self.model.get_image_features(pixel_values=x)), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        max_len = min(77, int(self.model.config.text_config.max_position_embeddings))
        tok = self.tokenizer(
            texts, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        feats = self.model.get_text_features(
            input_ids=tok.input_ids.to(self.device),
            attention_mask=tok.attention_mask.to(self.device),
        )
        return F.normalize(_embeds(feats), dim=-1)

    def score(self, images: torch.Tensor, texts: list[str] | str) -> torch.Tensor:
        """``[N]`` CLIP scores of ``images`` ``[N, 3, H, W]`` against ``texts`` (one or N)."""
        texts = [texts] * images.shape[0] if isinstance(texts, str) else list(texts)
        if len(texts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(texts)} texts")
        cos = (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1)
        return 100.0 * cos.clamp(min=0.0).cpu()


def quantise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the 8-bit values ``round(255 x)`` (as float) every FID implementation
    feeds its network: generated and reference images are compared as 8-bit images."""
    return (images.clamp(0, 1) * 255.0).round()


def _takes_return_features(module) -> bool:
    """A TorchScript forward with a ``return_features`` argument (the FID Inception)."""
    try:
        args = module.forward.schema.arguments
    except (AttributeError, RuntimeError):
        return False
    return any(a.name == "return_features" for a in args)


@dataclass
class FeatureExtractor:
    """A callable ``images [N, 3, H, W] in [0, 1] -> features [N, D]`` plus where it came from."""

    module: Callable
    kind: str  # torchscript | torchscript-fid-inception | torchvision-inception | module
    source: str
    size: int = 299
    input_mode: str = "uint8"
    batch_size: int = 32
    device: str = "cpu"
    #: keyword arguments of every call (``{"return_features": True}`` for the FID Inception)
    call_kwargs: dict = field(default_factory=dict)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        outs = []
        for chunk in images.split(self.batch_size):
            x = quantise(chunk.float().to(self.device))
            if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear",
                                  align_corners=False)  # fmt: skip
            y = self.module(_normalise(x, self.input_mode), **self.call_kwargs)
            if isinstance(y, (tuple, list)):
                y = y[0]
            elif isinstance(y, dict):
                y = next(iter(y.values()))
            elif hasattr(y, "logits") and not isinstance(y, torch.Tensor):
                y = y.logits
            if y.dim() > 2:  # spatial features: global average pool
                y = y.flatten(2).mean(-1)  # (N, D, *S) -> (N, D, S') -> (N, D)
            outs.append(y.reshape(y.shape[0], -1).float().cpu())  # (N, ...) -> (N, D)
        return torch.cat(outs)


def _torchvision_inception(state_dict: dict, source: str, flag: str):
    try:
        import torchvision
    except ImportError:
        raise UserError(
            f"{flag} {source}: a state dict needs torchvision to build inception_v3 "
            "(pip install torchvision), or give a TorchScript feature network instead"
        ) from None
    aux = any(k.startswith("AuxLogits.") for k in state_dict)
    net = torchvision.models.inception_v3(weights=None, aux_logits=aux, init_weights=False)
    try:
        net.load_state_dict(state_dict, strict=True)  # every weight, nothing left random
    except RuntimeError as e:
        text = " ".join(str(e).split())[:300]
        raise UserError(f"{flag} {source}: not an inception_v3 state dict ({text})") from None
    net.fc = torch.nn.Identity()  # 2048-d pool features
    return net.eval()


def load_feature_extractor(
    spec: str,
    *,
    allow_download: bool = False,
    size: int = 299,
    input_mode: str = "auto",
    flag: str = "--inception",
    device="cpu",
) -> FeatureExtractor:
    """A feature network for FID/KID from a local file (see the module docstring).

    ``spec`` ``"torchvision"`` means torchvision's ImageNet ``inception_v3`` weights, which
    are downloaded, so it needs ``allow_download``. ``input_mode`` is ``uint8`` ([0, 255],
    what the FID Inception networks take), ``unit`` ([0, 1]), ``imagenet`` or ``symmetric``
    ([-1, 1]); ``auto`` picks ``imagenet`` for torchvision networks and ``uint8`` otherwise.
    ``size``: the 8-bit images are resized (bilinear) to ``size``² first (0 = as they are).
    """
    if input_mode not in (*INPUT_MODES, "auto"):
        raise UserError(
            f"--feature-input must be one of {[*INPUT_MODES, 'auto']}, got {input_mode!r}"
        )

    def make(module, kind, source, call_kwargs=None):
        mode = (
            input_mode
            if input_mode != "auto"
            else ("imagenet" if "torchvision" in kind else "uint8")
        )
        if isinstance(module, torch.nn.Module):
            module = module.eval().to(device)
        return FeatureExtractor(module, kind, source, size, mode, device=str(device),
                                call_kwargs=call_kwargs or {})  # fmt: skip

    if spec == "torchvision":
        if not allow_download:
            raise UserError(f"{flag} torchvision downloads ImageNet weights; pass --allow-download "
                            "or give a local feature network file")  # fmt: skip
        try:
            import torchvision
        except ImportError:
            raise UserError(f"{flag} torchvision: torchvision is not installed") from None
        net = torchvision.models.inception_v3(weights="DEFAULT")
        net.fc = torch.nn.Identity()
        return make(net, "torchvision-inception", "torchvision inception_v3 (ImageNet)")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"{flag} {spec}: no such file (a TorchScript feature network or an "
                        "inception_v3 state dict)")  # fmt: skip
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError):
        scripted = None  # not TorchScript: a state dict
    if scripted is not None:
        if _takes_return_features(scripted):  # the FID Inception: pool features, not logits
            return make(scripted, "torchscript-fid-inception", str(path), {"return_features": True})
        return make(scripted, "torchscript", str(path))
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise UserError(
            f"{flag} {path}: not TorchScript and not a plain state dict ({type(e).__name__}); "
            "a pickled nn.Module is not loaded (it could run code): save it with "
            "torch.jit.save(torch.jit.script(model), PATH)"
        ) from None
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return make(
            _torchvision_inception(obj, str(path), flag), "torchvision-inception", str(path)
        )
    raise UserError(f"{flag} {path}: holds a {type(obj).__name__}, not a feature network")
