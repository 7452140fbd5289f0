"""Score distillation and reconstruction (issue 7): radiance field, renderer, SDS guidance."""

from mvdiff.sds.field import FieldConfig, RadianceField
from mvdiff.sds.guidance import MultiViewSDS, SDSConfig, timestep_bounds
from mvdiff.sds.recon import posed_view_loss, reconstruct_from_views
from mvdiff.sds.render import OccupancyGrid, camera_rays, random_background, render

__all__ = [
    "FieldConfig",
    "MultiViewSDS",
    "OccupancyGrid",
    "RadianceField",
    "SDSConfig",
    "camera_rays",
    "posed_view_loss",
    "random_background",
    "reconstruct_from_views",
    "render",
    "timestep_bounds",
]
