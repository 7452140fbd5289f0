"""Render 3D assets into multi-view webdataset shards with Blender (bpy), docs/design.md §3/§4/§6/§7.

Layout of this package:

* ``config.py``  -- :class:`RenderConfig`, the typed config of one render run.
* ``rigs.py``    -- camera rigs (MVDream random rig, fixed lists, turntable orbit).
* ``scene.py``   -- the bpy side: reset, import, normalise, light, place cameras, render.
                    Imported only inside worker processes (bpy is not fork/thread safe).
* ``worker.py``  -- the worker process: renders many objects, one JSON line per job.
* ``pool.py``    -- worker handles (timeout = kill the process group), local and Ray backends.
* ``shards.py``  -- sample validation, atomic shard writing, the manifest, resume, checks.
* ``sources.py`` -- local files/folders, Objaverse (uids / LVIS) through a mirror, captions.
* ``runner.py``  -- :func:`render_objects`: the loop that ties it together (progress bar).

This ``__init__`` stays import-light: worker processes import ``mvdiff.render.worker`` and
must not pull in torch.
"""

from __future__ import annotations

__all__ = ["RenderConfig", "render_objects", "check_shard"]


def __getattr__(name):
    if name == "RenderConfig":
        from mvdiff.render.config import RenderConfig

        return RenderConfig
    if name == "render_objects":
        from mvdiff.render.runner import render_objects

        return render_objects
    if name == "check_shard":
        from mvdiff.render.shards import check_shard

        return check_shard
    raise AttributeError(name)
