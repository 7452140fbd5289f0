"""A render worker process: ``python -m mvdiff.render.worker OPTIONS_JSON``.

It imports bpy once, sets the scene up, then serves jobs: one JSON line per object on stdin,
one JSON line per answer on the protocol pipe (the original stdout; Blender's own chatter is
redirected to stderr). The parent (:class:`mvdiff.render.pool.WorkerHandle`) runs it in its
own process group and kills the whole group when an object exceeds its timeout.

Job:    {"uid", "path", "out_dir", "c2w": [V][4][4], "fov_deg": [V]}
Answer: {"uid", "ok": true, "c2w", "fov_deg", "scale", "offset", "seconds", "cpu",
         "view_cpu": [V], "view_wall": [V]}   (cpu: CPU seconds of the whole job;
         view_cpu / view_wall: CPU / wall seconds of each render call)
     or {"uid", "ok": false, "reason", "retry": bool, "seconds"}

Test hook: if the environment variable ``MVDIFF_RENDER_TEST_HANG`` is a substring of a job's
path, the worker starts a child process (``sleep 86399``, like an importer's helper) and
sleeps forever on it: a simulated hanging import whose whole process group must be killed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time


def _watch_parent(parent: int) -> None:
    # A worker whose parent died (even by kill -9) must not live on rendering for nobody.
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def main() -> None:
    opts = json.loads(sys.argv[1])
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # C-level prints of Blender now go to stderr
    sys.stdout = sys.stderr
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    def send(msg: dict) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    # Blender sizes its task scheduler (TBB) to the CPUs it may run on when it starts. With
    # all cores visible, a worker rendering with `threads` Cycles threads still keeps an idle
    # TBB worker spinning on every other core: ~2x the CPU time for the same wall time on a
    # 2-core machine. So bpy starts while this process may use only `threads` CPUs, and the
    # full set is given back afterwards (the OS still places the render threads anywhere).
    # (Linux only: macOS has no CPU affinity API; there bpy starts as it is.)
    pin = hasattr(os, "sched_getaffinity")
    allowed = os.sched_getaffinity(0) if pin else set()
    threads = max(1, int(opts.get("threads", 1)))
    if pin and threads < len(allowed):
        os.sched_setaffinity(0, sorted(allowed)[:threads])
    from mvdiff.render.scene import AssetError, Scene

    scene = Scene(opts)
    if pin:
        os.sched_setaffinity(0, allowed)
    send({"ready": True, "pid": os.getpid()})
    hang = os.environ.get("MVDIFF_RENDER_TEST_HANG", "")
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        t0, c0 = time.perf_counter(), time.process_time()
        answer = {"uid": job["uid"]}
        try:
            if hang and hang in job["path"]:
                subprocess.Popen(["sleep", "86399"])
                while True:
                    time.sleep(60)
            scene.clear()
            scene.load(job["path"])
            scale, offset = scene.normalize()
            c2w, fov, view_cpu, view_wall = scene.render_views(
                job["c2w"], job["fov_deg"], job["out_dir"]
            )
            answer.update(ok=True, c2w=c2w, fov_deg=fov, scale=scale, offset=offset,
                          view_cpu=view_cpu, view_wall=view_wall)  # fmt: skip
        except AssetError as e:
            answer.update(ok=False, reason=str(e), retry=False)
        except Exception as e:  # anything else may be transient: let the parent retry
            answer.update(ok=False, reason=f"{type(e).__name__}: {e}"[:500], retry=True)
        answer["seconds"] = time.perf_counter() - t0
        answer["cpu"] = time.process_time() - c0
        send(answer)


if __name__ == "__main__":
    main()
