"""Sampling: :class:`MVDreamPipeline` (a diffusers ``DiffusionPipeline``) and its helpers.

The pipeline (and with it torch and diffusers) is imported on first use, so that the
``mvdiff sample`` command can check its flags and paths before paying for those imports.
"""

from mvdiff.pipelines.schedulers import SCHEDULERS, make_scheduler

_LAZY = {
    "DEFAULT_PROMPT_SUFFIX",
    "ENTRY_FILE",
    "MVDreamPipeline",
    "MVDreamPipelineOutput",
    "rescale_noise_cfg",
}

__all__ = ["SCHEDULERS", "make_scheduler", *sorted(_LAZY)]


def __getattr__(name):
    if name in _LAZY:
        from mvdiff.pipelines import pipeline_mvdream

        return getattr(pipeline_mvdream, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
