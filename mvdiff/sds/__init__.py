"""Score distillation and reconstruction (issue 7): radiance field, renderer, SDS guidance,
the shared optimisation loop, posed-view reconstruction and mesh export; 3D Gaussians and
their rasteriser as a second representation (issue 19)."""

from mvdiff.sds.background import Background, BackgroundConfig
from mvdiff.sds.config import TextTo3DConfig
from mvdiff.sds.field import FieldConfig, RadianceField
from mvdiff.sds.gaussians import GaussianConfig, GaussianModel
from mvdiff.sds.guidance import MultiViewSDS, SDSConfig, timestep_bounds
from mvdiff.sds.recon import posed_view_loss, reconstruct_from_views
from mvdiff.sds.render import (
    OccupancyGrid,
    camera_rays,
    random_background,
    render,
    render_rays,
    sample_light,
)

__all__ = [
    "Background",
    "BackgroundConfig",
    "FieldConfig",
    "GaussianConfig",
    "GaussianModel",
    "MultiViewSDS",
    "OccupancyGrid",
    "RadianceField",
    "SDSConfig",
    "TextTo3DConfig",
    "camera_rays",
    "posed_view_loss",
    "random_background",
    "reconstruct_from_views",
    "render",
    "render_rays",
    "sample_light",
    "timestep_bounds",
]
