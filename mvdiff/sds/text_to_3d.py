"""The text-to-3D loop: a radiance field optimised with multi-view SDS (DESIGN §6).

Writes into the output folder: ``checkpoint.pt`` (field, optimiser, occupancy, step, config;
resumable), ``views.png`` (the final 4 views side by side), ``turntable.gif``, ``mesh.obj`` / ``mesh.ply``
(marching tetrahedra with vertex colours) and ``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mvdiff.cameras import sample_sds_group
from mvdiff.sds.field import FieldConfig, RadianceField
from mvdiff.sds.guidance import MultiViewSDS, SDSConfig
from mvdiff.sds.mesh import extract_mesh, write_obj, write_ply
from mvdiff.sds.recon import posed_view_loss
from mvdiff.sds.ref_views import load_ref_views
from mvdiff.sds.render import OccupancyGrid, random_background, render

__all__ = ["TextTo3DConfig", "text_to_3d"]


@dataclass
class TextTo3DConfig:
    prompt: str = ""
    negative_prompt: str = ""
    prompt_suffix: str = ", 3d asset"
    steps: int = 10000
    render_size: int = 64
    #: render size after ``hires_after`` steps (DESIGN §6: 64² first, 256² later)
    render_size_late: int = 256
    hires_after: int = 5000
    samples: int = 64
    lr: float = 0.01
    seed: int = 0
    occupancy_every: int = 16
    mesh_resolution: int = 128
    turntable_frames: int = 36
    #: posed reference views (a multi-view shard; first sample or ``ref_uid``)
    ref_views: str | None = None
    ref_uid: str | None = None
    ref_weight: float = 1.0
    ref_mask_weight: float = 0.5
    sds_weight: float = 1.0
    save_every: int = 1000
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    sds: SDSConfig = dataclasses.field(default_factory=SDSConfig)

    @classmethod
    def fast(cls, **kw) -> TextTo3DConfig:
        """A CPU-friendly preset: small grids, 32² renders, few samples."""
        base = dict(
            steps=600, render_size=32, render_size_late=64, hires_after=400, samples=32,
            mesh_resolution=64, turntable_frames=12, field=FieldConfig(resolutions=[16, 32, 64]),
            sds=SDSConfig(anneal_steps=600),
        )  # fmt: skip
        base.update(kw)
        return cls(**base)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TextTo3DConfig:
        d = dict(d)
        d["field"] = FieldConfig(**d.get("field", {}))
        d["sds"] = SDSConfig(**d.get("sds", {}))
        return cls(**d)


def _save_png(path: Path, rgb: torch.Tensor) -> None:
    from PIL import Image

    img = rgb.clamp(0, 1).permute(2, 0, 3, 1)  # (V, 3, H, W) -> (H, V, W, 3)
    img = img.reshape(rgb.shape[2], -1, 3)  # (H, V, W, 3) -> (H, V*W, 3)
    Image.fromarray((img.cpu().numpy() * 255 + 0.5).astype(np.uint8)).save(path)


@torch.no_grad()
def _save_turntable(path: Path, fld, frames: int, size: int, samples: int) -> None:
    from PIL import Image

    from mvdiff.cameras import orbit_c2w

    az = np.arange(frames) * (360.0 / frames)
    c2w = torch.from_numpy(orbit_c2w(np.full(frames, 15.0), az, 2.2)).float()
    rgb = torch.cat([render(fld, c, 40.0, size, samples)["rgb"] for c in c2w.split(4)])
    arr = rgb.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (F, 3, H, W) -> (F, H, W, 3)
    arr = (arr * 255 + 0.5).astype(np.uint8)
    imgs = [Image.fromarray(a) for a in arr]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=100, loop=0)


def text_to_3d(pipe, config: TextTo3DConfig, output, resume: bool = False, log=print) -> dict:
    """Optimise a field for ``config.prompt`` with ``pipe`` (an :class:`MVDreamPipeline`'s
    unet, vae, text encoder and scheduler). Returns a summary dict."""
    from tqdm import tqdm

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    ckpt_path = output / "checkpoint.pt"
    device = pipe.unet.device
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    fld = RadianceField(config.field).to(device)
    heads = [p for n, p in fld.named_parameters() if not n.startswith("encoding.")]
    opt = torch.optim.Adam(
        [
            {"params": fld.encoding.parameters(), "lr": config.lr},
            {"params": heads, "lr": config.lr * 0.1},
        ]
    )
    occ = OccupancyGrid(fld.bound, 32, threshold=0.5)
    start = 0
    if resume and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        fld.load_state_dict(state["field"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        occ.values = state["occupancy"]
        start = int(state["step"])
        log(f"resumed from {ckpt_path} at step {start}")
    (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    prompt = config.prompt + config.prompt_suffix
    cond = pipe.encode_prompt([prompt]).float()  # (1, L, D)
    uncond = pipe.encode_prompt([config.negative_prompt]).float()  # (1, L, D)
    use_camera = bool(getattr(pipe, "has_camera_mlp", True))
    ref = None
    if config.ref_views:
        ref = load_ref_views(config.ref_views, config.ref_uid)
        log(f"reference views: {ref['uid']} ({ref['rgba'].shape[0]} views)")
    sds = MultiViewSDS(pipe.unet, pipe.vae, pipe.scheduler.alphas_cumprod, config.sds)

    def save(step):
        state = {
            "field": fld.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "generator": gen.get_state(), "occupancy": occ.values, "config": config.to_dict(),
        }  # fmt: skip
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ckpt_path)

    t0 = time.time()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="text-to-3d")
    loss_value, t = float("nan"), 0
    for step in bar:
        if step % config.occupancy_every == 0:
            occ.update(fld, gen)
        size = config.render_size if step < config.hires_after else config.render_size_late
        loss = torch.zeros((), device=device)
        if config.sds_weight > 0:
            g = sample_sds_group(gen, num_views=config.sds.num_views)
            bg = random_background(config.sds.num_views, gen)
            out = render(
                fld, g["c2w"], g["fov_deg"], size, config.samples, background=bg,
                stratified=True, generator=gen, occupancy=occ,
            )  # fmt: skip
            camera = g["camera"].to(device) if use_camera else None
            res = sds(out["rgb"], cond, uncond, camera, step=step, generator=gen)
            loss = loss + config.sds_weight * res["loss"]
            t = res["t"]
        if ref is not None and config.ref_weight > 0:
            n = ref["rgba"].shape[0]
            idx = torch.randperm(n, generator=gen)[: min(4, n)]
            target = F.interpolate(ref["rgba"][idx], size=(size, size), mode="area").to(device)
            bg = random_background(1, gen)[0]
            out = render(
                fld, ref["c2w"][idx], ref["fov_deg"][idx], size, config.samples, background=bg,
                stratified=True, generator=gen, occupancy=occ,
            )  # fmt: skip
            loss = loss + config.ref_weight * posed_view_loss(
                out, target, bg, mask_weight=config.ref_mask_weight
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        done = step + 1 - start
        bar.set_postfix(loss=f"{loss_value:.4g}", t=t, its=f"{done / (time.time() - t0):.2f}")
        if config.save_every and (step + 1) % config.save_every == 0:
            save(step + 1)
    save(config.steps)

    from mvdiff.cameras import orbit_c2w

    c2w = torch.from_numpy(orbit_c2w(np.full(4, 15.0), np.arange(4) * 90.0, 2.2)).float()
    with torch.no_grad():
        final = render(fld, c2w, 40.0, config.render_size_late, config.samples)
    _save_png(output / "views.png", final["rgb"])
    _save_turntable(
        output / "turntable.gif",
        fld,
        config.turntable_frames,
        config.render_size_late,
        config.samples,
    )
    verts, faces, colors = extract_mesh(fld, config.mesh_resolution)
    write_obj(output / "mesh.obj", verts, faces, colors)
    write_ply(output / "mesh.ply", verts, faces, colors)
    summary = {
        "steps": config.steps, "resumed_from": start, "loss": loss_value, "t": t,
        "vertices": len(verts), "faces": len(faces), "seconds": round(time.time() - t0, 2),
    }  # fmt: skip
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
