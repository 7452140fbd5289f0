"""The one optimisation loop of text-to-3D and posed-view reconstruction.

:class:`FitState` holds what a run optimises or draws from (field, background, optimiser,
occupancy grid, random generator) and round-trips through a checkpoint. :func:`train_step`
is one step: an optional prior term (SDS on a random 4-view group, :class:`mvdiff.sds.
text_to_3d.SDSTerm`) plus an optional posed-view term (RGB + mask on a random batch of rays
of the reference views, :func:`ref_view_loss`). :func:`run_steps` repeats it with a progress
bar (step, loss, t, it/s). ``mvdiff text-to-3d`` (with or without ``--ref-views``) and
:func:`mvdiff.sds.recon.reconstruct_from_views` both run this loop.
"""

from __future__ import annotations

import io
import time

import torch
import torch.nn.functional as F

from mvdiff.config import validate_config
from mvdiff.errors import UserError, interrupts_deferred
from mvdiff.io import atomic_write
from mvdiff.sds.background import Background
from mvdiff.sds.config import TextTo3DConfig
from mvdiff.sds.field import RadianceField
from mvdiff.sds.mesh import extract_mesh
from mvdiff.sds.ref_views import prepare_rays
from mvdiff.sds.render import OccupancyGrid, render, render_rays

__all__ = [
    "FitState",
    "load_checkpoint",
    "make_fit_state",
    "ref_view_loss",
    "render_size",
    "restore",
    "fit_with_checkpoints",
    "run_steps",
    "save_checkpoint",
    "train_step",
]


def make_fit_state(config: TextTo3DConfig, device="cpu"):
    """The fit state of ``config.representation``: :class:`FitState` (radiance field) or
    :class:`mvdiff.sds.gaussian_fit.GaussianFitState` (3D Gaussians); both have the interface
    used here (render, prepare_ref, ref_loss, before_step, after_step, mesh, write_outputs,
    state_dict, load_state_dict, optimizer, background, generator, device)."""
    if config.representation == "gaussians":
        from mvdiff.sds.gaussian_fit import GaussianFitState

        return GaussianFitState(config, device)
    return FitState(config, device)


#: steps between two reads of the loss for the progress bar
POSTFIX_EVERY = 10


class FitState:
    """Field, background, fused Adam (grids at ``lr``, MLP heads at ``lr / 10``), occupancy grid
    and generator of one run, seeded from ``config.seed``."""

    #: config sections that must match to resume a checkpoint
    config_keys = ("field", "background")
    #: checkpoint entries that are dicts of tensors (checked by :func:`restore`)
    checkpoint_parts = ("field", "background")

    def __init__(self, config: TextTo3DConfig, device="cpu"):
        validate_config(config)
        self.config = config
        # initial weights from config.seed, without touching the caller's global RNG
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(config.seed)  # CPU only: CUDA untouched
            self.field = RadianceField(config.field).to(device)
            self.background = Background(config.background).to(device)
        heads = [p for n, p in self.field.named_parameters() if not n.startswith("encoding.")]
        groups = [
            {"params": list(self.field.encoding.parameters()), "lr": config.lr},
            {"params": heads, "lr": config.lr * 0.1},
        ]
        if len(list(self.background.parameters())):
            groups.append({"params": list(self.background.parameters()), "lr": config.lr})
        # Fused Adam: one kernel over each dense grid (3-4x faster steps on a CPU than the
        # per-tensor loop, the same update); not where the device has no fused kernel.
        fused = config.fused_adam and torch.device(device).type in ("cpu", "cuda")
        self.optimizer = torch.optim.Adam(groups, fused=fused)
        self.occupancy = OccupancyGrid(self.field.bound, 32, threshold=0.5)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.device = torch.device(device)
        #: the stratified jitter of every render (the largest draw: rays x samples) comes
        #: from a generator on the render device, so it is never drawn on the host and copied
        self.render_generator = torch.Generator(self.device).manual_seed(config.seed)

    def state_dict(self) -> dict:
        return {
            "field": self.field.state_dict(),
            "background": self.background.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "render_generator": self.render_generator.get_state(),
            "occupancy": self.occupancy.values,
        }

    def load_state_dict(self, state: dict) -> None:
        self.field.load_state_dict(state["field"])
        self.background.load_state_dict(state.get("background", {}))
        self.optimizer.load_state_dict(state["optimizer"])
        # generator states are CPU byte tensors, whatever map_location moved them to
        self.generator.set_state(state["generator"].cpu())
        if "render_generator" in state:  # checkpoints before it: continue with a fresh one
            self.render_generator.set_state(state["render_generator"].cpu())
        self.occupancy.values = state["occupancy"]
        if self.occupancy.values is not None:
            self.occupancy.occupied = self.occupancy.values > self.occupancy.threshold

    def check_state(self, state: dict) -> str | None:
        """What is wrong with the parts of a checkpoint only a field has, or None."""
        occ, r = state.get("occupancy"), self.occupancy.res
        if occ is not None and not (
            isinstance(occ, torch.Tensor) and occ.shape == (r, r, r) and occ.isfinite().all()
        ):
            return f"occupancy must be None or finite ({r}, {r}, {r})"
        return None

    # The representation interface (shared with GaussianFitState).
    def render(self, c2w, fov_deg, size, *, background=None, generator=None, training=False,
               shading="albedo", light=None, ambient=0.3) -> dict:  # fmt: skip
        """Views ``[V, 3, H, W]`` etc. (:func:`mvdiff.sds.render.render`); ``training``:
        stratified samples, drawn by :attr:`render_generator` on the render device (not by
        ``generator``), occupancy skipping and (``config.render_packed``) packed compositing."""
        return render(
            self.field, c2w, fov_deg, size, self.config.samples, background=background,
            stratified=training, generator=self.render_generator if training else generator,
            occupancy=self.occupancy if training else None, shading=shading, light=light,
            ambient=ambient, packed=training and self.config.render_packed,
        )  # fmt: skip

    def prepare_ref(self, views: dict, resolution: int, indices=None) -> dict:
        return prepare_rays(views, resolution, indices)

    def ref_loss(self, rays: dict, config: TextTo3DConfig) -> torch.Tensor:
        return ref_view_loss(self, rays, config)

    def before_step(self, step: int) -> None:
        if step % self.config.occupancy_every == 0:
            self.occupancy.update(self.field, self.generator)

    def after_step(self, step: int) -> None:
        pass

    def mesh(self, resolution: int):
        return extract_mesh(self.field, resolution)

    def export_asset(self, config: TextTo3DConfig, output, ref=None, ref_resolution=None) -> dict:
        """Mesh files (level chosen from the field, UV-textured) and their metrics:
        :func:`mvdiff.sds.asset.export_asset`."""
        from mvdiff.sds.asset import export_asset

        return export_asset(self.field, config, output, ref, ref_resolution)

    def write_outputs(self, folder) -> dict:
        return {}


#: what every text-to-3d checkpoint holds; the representation's own parts are listed by its
#: fit state (``checkpoint_parts``) and checked by :func:`restore`
CHECKPOINT_KEYS = ("background", "optimizer", "generator", "step", "config")


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:limit]


def load_checkpoint(path, device="cpu") -> dict:
    """A checkpoint written by :class:`FitState` users (``checkpoint.pt``), as tensors and
    plain data only: torch's weights-only loader refuses anything else before it is built,
    so no code in the file runs. Anything unreadable or of another structure is a
    :class:`UserError` naming the file (one line)."""
    import pickle

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"--resume {path}: refused: holds objects other than tensors and plain data "
            "(nothing of it was run or used)"
        ) from None
    except Exception as e:  # truncated zip, not a torch file, unreadable, ...
        raise UserError(f"--resume {path}: not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(state, dict):
        raise UserError(f"--resume {path}: not a text-to-3d checkpoint (a {type(state).__name__})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise UserError(f"--resume {path}: not a text-to-3d checkpoint (lacks {missing})")
    step = state["step"]
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        raise UserError(f"--resume {path}: step must be an integer >= 0, got {step!r}")
    if not isinstance(state["config"], dict):
        raise UserError(f"--resume {path}: config is not a mapping")
    return state


def restore(fit: FitState, state: dict, path) -> int:
    """Load a :func:`load_checkpoint` state into ``fit``; return its step. A state that does
    not fit (shapes, optimiser groups, generator) or holds non-finite weights is a one-line
    :class:`UserError` naming ``path``."""
    missing = [part for part in fit.checkpoint_parts if part not in state]
    if missing:
        raise UserError(f"--resume {path}: not a text-to-3d checkpoint (lacks {missing})")
    for part in fit.checkpoint_parts:
        tensors = state[part]
        if not isinstance(tensors, dict) or not all(
            isinstance(t, torch.Tensor) for t in tensors.values()
        ):
            raise UserError(f"--resume {path}: {part} is not a dict of tensors")
        bad = [k for k, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise UserError(f"--resume {path}: {part} weights are not finite ({bad[0]})")
    problem = fit.check_state(state)
    if problem:
        raise UserError(f"--resume {path}: {problem}")
    try:
        fit.load_state_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
        raise UserError(
            f"--resume {path}: does not fit this run ({type(e).__name__}: {_first_line(e)})"
        ) from None
    return state["step"]


def render_size(config: TextTo3DConfig, step: int) -> int:
    return config.render_size if step < config.hires_after else config.render_size_late


def ref_view_loss(fit: FitState, rays: dict, config: TextTo3DConfig) -> torch.Tensor:
    """RGB + ``ref_mask_weight`` * mask MSE on ``config.ref_rays`` random rays of ``rays``
    (:func:`mvdiff.sds.ref_views.prepare_rays`; all rays if ``ref_rays`` is 0).

    Views with alpha are composited over the step's background (a random colour per ray with
    probability ``background.random_prob``); RGB-only views keep their own background colour.
    """
    gen = fit.generator
    n = rays["o"].shape[0]
    if 0 < config.ref_rays < n:
        idx = torch.randint(n, (config.ref_rays,), generator=gen)
        o, d, target = rays["o"][idx], rays["d"][idx], rays["rgba"][idx]
    else:
        o, d, target = rays["o"], rays["d"], rays["rgba"]
    dev = fit.device
    o, d, target = o.to(dev), d.to(dev), target.to(dev)
    fixed = rays.get("background")
    if fixed is not None:
        bg = torch.as_tensor(fixed, dtype=torch.float32).to(dev).reshape(1, 3)  # (3,) -> (1, 3)
    else:
        bg = fit.background.sample(o.shape[0], gen, training=True, per_item=True)
        if isinstance(bg, torch.Tensor):
            bg = bg.to(dev)
    out = render_rays(
        fit.field, o, d, config.samples, background=bg, stratified=True,
        generator=fit.render_generator, occupancy=fit.occupancy, packed=config.render_packed,
    )  # fmt: skip
    a = target[:, 3:4]
    if fixed is not None:
        want = target[:, :3]  # the image as given, on its own background
    else:
        want = target[:, :3] * a + out["background"].detach() * (1.0 - a)
    loss = F.mse_loss(out["rgb"], want)
    if config.ref_mask != "none" and config.ref_mask_weight > 0:
        loss = loss + config.ref_mask_weight * F.mse_loss(out["opacity"], a)
    return loss


def train_step(fit: FitState, config: TextTo3DConfig, step: int, sds=None, rays=None) -> dict:
    """One optimisation step; returns ``loss`` (a detached 0-d tensor on the render device:
    reading it is a host sync, so the loop does that only now and then) and ``t`` (SDS
    timestep or None)."""
    fit.before_step(step)
    loss = torch.zeros((), device=fit.device)
    t = None
    if sds is not None and config.sds_weight > 0:
        sds_loss, t = sds(fit, config, step, render_size(config, step))
        loss = loss + config.sds_weight * sds_loss
    if rays is not None and config.ref_weight > 0:
        loss = loss + config.ref_weight * fit.ref_loss(rays, config)
    if not loss.requires_grad:
        raise ValueError("nothing to optimise: no SDS term and no reference views")
    regularizer = getattr(fit, "regularizer", None)  # e.g. the mesh stage's smoothness terms
    if regularizer is not None:
        loss = loss + regularizer()
    fit.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    fit.optimizer.step()
    fit.after_step(step)
    return {"loss": loss.detach(), "t": t}


def run_steps(
    fit: FitState,
    config: TextTo3DConfig,
    start: int,
    stop: int,
    *,
    sds=None,
    rays=None,
    progress: bool = True,
    on_step=None,
    desc: str = "text-to-3d",
) -> dict:
    """Steps ``start .. stop - 1`` with a tqdm bar (step, loss, t, it/s) when ``progress``;
    ``on_step(step + 1, metrics)`` after each (``metrics["loss"]`` a 0-d tensor). The bar's
    loss is read every ``POSTFIX_EVERY`` steps (each read waits for the GPU). Returns the
    last metrics, ``loss`` as a float."""
    from tqdm import tqdm

    t0 = time.time()
    metrics = {"loss": float("nan"), "t": None}
    bar = tqdm(
        range(start, stop), initial=start, total=stop, desc=desc, disable=not progress,
        mininterval=1.0,
    )  # fmt: skip
    for step in bar:
        metrics = train_step(fit, config, step, sds=sds, rays=rays)
        done = step + 1 - start
        if progress and (done % POSTFIX_EVERY == 0 or step == stop - 1):
            loss = float(metrics["loss"])
            post = {"loss": f"{loss:.4g}", "its": f"{done / (time.time() - t0):.2f}"}
            if metrics["t"] is not None:
                post["t"] = metrics["t"]
            bar.set_postfix(post, refresh=False)
        if on_step is not None:
            on_step(step + 1, metrics)
    return {**metrics, "loss": float(metrics["loss"])}


def save_checkpoint(fit, config, path, step: int) -> None:
    """``path`` (``checkpoint.pt``): the fit state, ``step`` and ``config``, written whole or
    not at all. Serialised in memory first, so a full disk is an OSError (torch's own file
    writer turns it into an unrelated RuntimeError); signals wait until it is written."""
    state = {**fit.state_dict(), "step": step, "config": config.to_dict()}

    def write(tmp):
        buf = io.BytesIO()
        torch.save(state, buf)
        tmp.write_bytes(buf.getbuffer())

    with interrupts_deferred():
        atomic_write(path, write)  # no .tmp left on failure


def fit_with_checkpoints(fit, config, path, start: int, saved_step: int | None, *, loop_config=None,
                         sds=None, rays=None, progress: bool = True, desc: str = "text-to-3d") -> dict:  # fmt: skip
    """:func:`run_steps` from ``start`` to ``config.steps`` (with ``loop_config`` if given),
    checkpointing to ``path`` every ``config.save_every`` steps and at the end. On Ctrl-C or
    SIGTERM the interrupt's note names the checkpoint kept (``saved_step`` if nothing newer)."""
    saved = [saved_step]

    def on_step(done, metrics):
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            with interrupts_deferred():  # the interrupt's note names what is on disk
                save_checkpoint(fit, config, path, done)
                saved[0] = done

    try:
        metrics = run_steps(
            fit, loop_config or config, start, config.steps, sds=sds, rays=rays,
            progress=progress, on_step=on_step, desc=desc,
        )  # fmt: skip
    except KeyboardInterrupt as e:  # the last checkpoint stays as it was
        e.args = (
            f"{path} (step {saved[0]}) is kept, --resume continues from it"
            if saved[0] is not None else "no checkpoint was saved yet",
        )  # fmt: skip
        raise
    save_checkpoint(fit, config, path, max(config.steps, start))
    return metrics
