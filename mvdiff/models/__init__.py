"""The multi-view UNet (diffusers UNet2DConditionModel + joined-view attention + camera MLP)."""

from diffusers import ModelMixin  # noqa: F401  (looked up by name by diffusers' loader)

from mvdiff.models.attention import MultiViewAttnProcessor
from mvdiff.models.unet_mv import (
    CAMERA_DIM,
    PRESETS,
    MultiViewUNet2DConditionModel,
    add_camera_mlp,
    multiview_unet_config,
    remove_camera_mlp,
)

__all__ = [
    "CAMERA_DIM",
    "PRESETS",
    "MultiViewAttnProcessor",
    "MultiViewUNet2DConditionModel",
    "add_camera_mlp",
    "multiview_unet_config",
    "remove_camera_mlp",
]
