"""Lets plain diffusers load a model folder written before mvdiff shipped its code in them::

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=mvdiff.pipelines.ENTRY_FILE,
                                      trust_remote_code=True)

Such folders name ``"_class_name": "MVDreamPipeline"`` and the UNet library
``mvdiff.models.unet_mv``, which diffusers resolves only once imported. Folders written now
need none of it (``mvdiff.pipelines.folders``); ``MVDreamPipeline.from_pretrained`` reads both.
"""

import mvdiff.models.unet_mv  # noqa: F401  (the UNet library old folders name)
from mvdiff.pipelines.pipeline_mvdream import MVDreamPipeline  # noqa: F401
