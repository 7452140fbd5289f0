"""The prompt convention shared by training captions and sampling (MVDream's recipe).

A module of its own (standard library only) because it is both at the lowest floor
(:mod:`mvdiff.shards` reads it) and shipped inside model folders with the pipeline code
(:mod:`mvdiff.pipelines.folders`).
"""

#: Appended to a multi-view caption when training, and to the prompt when sampling: the one
#: spelling of it.
CAPTION_SUFFIX = ", 3d asset"
