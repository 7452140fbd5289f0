"""Lets plain diffusers load an mvdiff model folder::

    DiffusionPipeline.from_pretrained(folder, custom_pipeline=mvdiff.pipelines.ENTRY_FILE,
                                      trust_remote_code=True)

diffusers resolves a string ``_class_name`` only inside the ``diffusers`` package and runs
code for any other class only with ``trust_remote_code=True`` (even local files). This file
just imports the installed mvdiff; ``MVDreamPipeline.from_pretrained(folder)`` needs none of it.
"""

from mvdiff.pipelines.pipeline_mvdream import MVDreamPipeline  # noqa: F401
