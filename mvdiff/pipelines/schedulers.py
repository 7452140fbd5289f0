"""Named samplers for MVDreamPipeline, built from a model folder's scheduler config.

``ddim`` is the official MVDream sampler (DDIM, eta=0 by default, "leading" spacing with
``steps_offset=1`` and the last step to ``alphas_cumprod[0]``, no clipping); ``dpm`` is
DPM-Solver++ (2M), the fast option at ~20 steps; ``euler`` and ``unipc`` are there because
any diffusers scheduler works.
"""

from __future__ import annotations

from mvdiff.errors import UserError

SCHEDULERS = ("ddim", "dpm", "euler", "unipc")


def make_scheduler(name: str, config):
    """A fresh scheduler of kind ``name`` with the noise schedule of ``config``."""
    import diffusers

    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(
            config,
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            timestep_spacing="leading",
        )
    if name == "dpm":
        return diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2
        )
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config(config)
    raise UserError(f"scheduler must be one of {list(SCHEDULERS)}, got {name!r}")
