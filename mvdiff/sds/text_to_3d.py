"""The text-to-3D run: a radiance field optimised with multi-view SDS (docs/design.md §6), optionally
with posed reference views (``ref_views``), on the shared loop of :mod:`mvdiff.sds.loop`.

Writes into the output folder:

* ``checkpoint.pt`` — field, background, optimiser, occupancy, generator, step and config
  (every ``save_every`` steps and at the end; ``resume=True`` continues from it);
* ``views.png`` (the final 4 views side by side) and ``view_00.png`` … ``view_03.png``;
* ``turntable.gif``;
* ``mesh.glb`` (UV atlas and baked albedo texture inside), ``mesh.obj`` + ``mesh.mtl`` +
  ``mesh_albedo.png``, ``mesh.ply`` (vertex colours) — the surface at the iso-level whose
  silhouettes reproduce the field's opacity, +Y up (see :mod:`mvdiff.sds.asset`);
* ``gaussians.ply`` with ``representation: gaussians`` (the 3DGS layout, :mod:`mvdiff.sds.ply`;
  the mesh then comes from the Gaussians' density on a grid, vertex colours);
* ``config.json`` and ``summary.json`` (with ``mesh``, ``metrics``: PSNR, silhouette IoU,
  Chamfer with ``ref_mesh``, and ``seconds`` per stage);
* with ``config.refine.enabled`` (``--refine``) the coarse-to-fine mesh stage follows on
  ``mesh.glb`` (:mod:`mvdiff.sds.mesh_fit`): ``refined.glb``, ``refined.obj`` + ``.mtl`` +
  ``refined_albedo.png``, ``refined.ply``, ``refined_views.png``, ``refine_checkpoint.pt``
  and ``summary.json``'s ``refine`` (metrics of the extracted and of the refined mesh);
  ``config.refine.from_mesh`` (``--refine-from``) runs that stage alone on a given mesh.

Every file is written under a temporary name and renamed.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from mvdiff.accel import enable_tf32
from mvdiff.cameras import framing_distance, orbit_c2w, sample_sds_group
from mvdiff.errors import UserError
from mvdiff.io import save_image, write_json
from mvdiff.sds.config import TextTo3DConfig
from mvdiff.sds.guidance import MultiViewSDS
from mvdiff.sds.loop import (
    FitState,
    fit_with_checkpoints,
    load_checkpoint,
    make_fit_state,
    render_size,
    restore,
)
from mvdiff.sds.ref_views import load_ref_views
from mvdiff.sds.render import SHADING_MODES, sample_light

logger = logging.getLogger(__name__)

__all__ = ["SDSTerm", "TextTo3DConfig", "choose_shading", "export_outputs", "text_to_3d"]


def choose_shading(config: TextTo3DConfig, step: int, generator: torch.Generator) -> str:
    """The shading of this step's SDS renders (``config.shading``; "random" draws one)."""
    if step < config.shading_after or config.shading == "albedo":
        return "albedo"
    if config.shading != "random":
        return config.shading
    probs = torch.tensor(config.shading_probs, dtype=torch.float64)
    return SHADING_MODES[int(torch.multinomial(probs, 1, generator=generator))]


class SDSTerm:
    """The prior term of a step: render one group of ``sds.num_views`` cameras 90° apart
    (:func:`mvdiff.cameras.sample_sds_group`) over the step's background, with the step's
    shading, and return the multi-view SDS loss and timestep.

    ``on_group(group, background)`` (optional) is called before the guidance — the oracle
    tests use it to point their oracle at ground-truth renders of the same cameras.
    """

    def __init__(self, guidance: MultiViewSDS, cond, uncond, use_camera=True, on_group=None):
        self.guidance, self.cond, self.uncond = guidance, cond, uncond
        self.use_camera, self.on_group = use_camera, on_group

    @classmethod
    def from_pipeline(cls, pipe, config: TextTo3DConfig) -> SDSTerm:
        prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
        guidance = MultiViewSDS(pipe.unet, pipe.vae, pipe.scheduler.alphas_cumprod, config.sds,
                                prediction_type=prediction)  # fmt: skip
        cond = pipe.encode_prompt([config.prompt + config.prompt_suffix]).float()  # (1, L, D)
        uncond = pipe.encode_prompt([config.negative_prompt]).float()  # (1, L, D)
        return cls(guidance, cond, uncond, bool(getattr(pipe, "has_camera_mlp", True)))

    def __call__(self, fit: FitState, config: TextTo3DConfig, step: int, size: int):
        gen = fit.generator
        v = config.sds.num_views
        relative = config.sds_distance_mode == "relative"
        g = sample_sds_group(
            gen, num_views=v, elevation_range=config.sds_elevation_range,
            fov_range=config.sds_fov_range,
            distance_factor_range=config.sds_distance_range,
            relative_distance_range=config.sds_distance_range if relative else None,
        )  # fmt: skip
        bg = fit.background.sample(v, gen, training=True)
        shading = choose_shading(config, step, gen)
        light = sample_light(g["c2w"], gen) if shading != "albedo" else None
        out = fit.render(
            g["c2w"], g["fov_deg"], size, background=bg, generator=gen, training=True,
            shading=shading, light=light, ambient=config.ambient,
        )  # fmt: skip
        if self.on_group is not None:
            self.on_group(g, bg)
        camera = g["camera"].to(fit.device) if self.use_camera else None
        res = self.guidance(out["rgb"], self.cond, self.uncond, camera, step=step, generator=gen)
        return res["loss"], res["t"]


def _to_uint8(rgb: torch.Tensor) -> np.ndarray:
    arr = rgb.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (V, 3, H, W) -> (V, H, W, 3)
    return (arr * 255 + 0.5).astype(np.uint8)


@torch.no_grad()
def export_outputs(
    fit: FitState, config: TextTo3DConfig, output: Path, ref=None, ref_resolution=None
) -> dict:
    """Final views, turntable GIF and meshes of ``fit`` into ``output``; returns the mesh's
    counts, metrics and seconds per stage (:func:`mvdiff.sds.asset.export_asset`; ``ref``:
    the reference views, fitted at ``ref_resolution``)."""
    from PIL import Image

    t0 = time.time()
    size = config.render_size_late
    bg = torch.tensor(config.background.color, dtype=torch.float32)
    dist = framing_distance(40.0)
    c2w = torch.from_numpy(orbit_c2w(np.full(4, 15.0), np.arange(4) * 90.0, dist)).float()
    views = _to_uint8(fit.render(c2w, 40.0, size, background=bg)["rgb"])
    for i, arr in enumerate(views):
        save_image(output / f"view_{i:02d}.png", Image.fromarray(arr))
    save_image(output / "views.png", Image.fromarray(np.concatenate(list(views), 1)))

    n = max(int(config.turntable_frames), 1)
    az = np.arange(n) * (360.0 / n)
    c2w = torch.from_numpy(orbit_c2w(np.full(n, 15.0), az, dist)).float()
    frames = torch.cat([fit.render(c, 40.0, size, background=bg)["rgb"] for c in c2w.split(4)])
    imgs = [Image.fromarray(a) for a in _to_uint8(frames)]
    save_image(
        output / "turntable.gif",
        imgs[0],
        save_all=True,
        append_images=imgs[1:],
        duration=100,
        loop=0,
    )

    seconds = {"render_outputs": round(time.time() - t0, 2)}
    asset = fit.export_asset(config, output, ref, ref_resolution)  # mesh files + metrics
    asset["seconds"] = {**seconds, **asset["seconds"]}
    asset["mesh"].update(fit.write_outputs(output))  # gaussians.ply for Gaussians
    return asset


def text_to_3d(
    pipe,
    config: TextTo3DConfig,
    output,
    resume: bool = False,
    log=logger.info,
    progress: bool = True,
    device=None,
) -> dict:
    """Optimise a field for ``config.prompt`` with ``pipe`` (an :class:`MVDreamPipeline`'s
    unet, vae, text encoder and scheduler) and/or ``config.ref_views``; write the outputs
    (module docstring). ``pipe`` may be None when ``sds_weight`` is 0 (``device`` then says
    where to run; default: the UNet's device, or the CPU). Returns a summary."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    ckpt_path = output / "checkpoint.pt"
    if device is None:
        device = pipe.unet.device if pipe is not None else torch.device("cpu")
    enable_tf32(device)
    from_mesh = config.refine.from_mesh
    fit = None if from_mesh else make_fit_state(config, device)
    start = 0
    if fit is not None and resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path, device)  # tensors and plain data only; else one line
        now = config.to_dict()
        for key in ("representation", *fit.config_keys):
            saved = state.get("config", {}).get(key)
            if saved is not None and saved != now[key]:
                raise UserError(
                    f"--resume {ckpt_path}: saved with {key} {saved}, now {now[key]}; "
                    "use the same settings or a new --output"
                )
        start = restore(fit, state, ckpt_path)
        log(f"resumed from {ckpt_path} at step {start}")
    write_json(output / "config.json", config.to_dict())

    sds = None
    if config.sds_weight > 0:
        if pipe is None:
            raise ValueError("sds_weight > 0 needs a pipeline (the prior)")
        sds = SDSTerm.from_pipeline(pipe, config)
    rays = ref = res = None
    if config.ref_views:
        ref = load_ref_views(config.ref_views, config.ref_uid, config.ref_fov_deg)
        res = config.ref_resolution or min(ref["rgba"].shape[-1], config.render_size_late)
        n_views = ref["rgba"].shape[0]
        if (
            any(not 0 <= i < n_views for i in config.ref_holdout)
            or len(set(config.ref_holdout)) >= n_views
        ):
            raise UserError(
                f"--ref-holdout {config.ref_holdout}: indices must be in 0..{n_views - 1} "
                "and leave a view to fit"
            )
        train = [i for i in range(n_views) if i not in config.ref_holdout]
        if fit is not None:
            rays = fit.prepare_ref(ref, res, train)
        if config.ref_mask == "auto" and not ref["has_alpha"]:
            log("reference views have no alpha: mask estimated from the background colour")
        log(f"reference views: {ref['uid']} ({ref['rgba'].shape[0]} views, fitted at {res}²)")

    if config.ref_mesh:  # an unreadable source mesh fails now, not after the fit
        from mvdiff.sds.mesh_eval import load_source_mesh

        load_source_mesh(config.ref_mesh)

    t0 = time.time()
    summary = {"stage_seconds": {}}
    if fit is not None:
        metrics = fit_with_checkpoints(
            fit, config, ckpt_path, start, start if resume and ckpt_path.exists() else None,
            sds=sds, rays=rays, progress=progress,
        )  # fmt: skip
        fit_seconds = round(time.time() - t0, 2)
        asset = export_outputs(fit, config, output, ref, res)
        summary = {
            "steps": config.steps, "resumed_from": start, "loss": metrics["loss"],
            "t": metrics["t"], "vertices": asset["mesh"]["vertices"],
            "faces": asset["mesh"]["faces"],
            "render_size": render_size(config, max(config.steps - 1, 0)),
            "seconds": round(time.time() - t0, 2), "mesh": asset["mesh"],
            "metrics": asset["metrics"], "stage_seconds": {"fit": fit_seconds, **asset["seconds"]},
        }  # fmt: skip
    if from_mesh or config.refine.enabled:
        from mvdiff.sds.mesh_fit import refine

        stage = refine(
            config, output, mesh_path=from_mesh or output / "mesh.glb", ref=ref, res=res,
            sds=sds, resume=resume, progress=progress, device=device, log=log,
        )  # fmt: skip
        summary["refine"] = stage
        summary["stage_seconds"].update(stage["seconds"])
        summary["seconds"] = round(time.time() - t0, 2)
        if from_mesh:
            summary.update(steps=0, vertices=stage["mesh"]["vertices"],
                           faces=stage["mesh"]["faces"])  # fmt: skip
    write_json(output / "summary.json", summary)
    return summary
