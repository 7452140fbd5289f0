#!/usr/bin/env python
"""Data loading throughput: multi-view objects/s per loader worker (4 views of 256² from a
32-view ring: tar read, PNG decode of the selected views, compositing, camera vectors), plus
2D images/s. Objects are synthetic with noise texture, so PNGs decode like real renders. Prints one JSON line. Target: >= 100 objects/s per worker (per core).

    python benchmarks/bench_data.py [--objects 96] [--repeats 3] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def measure(cfg, kind: str, workers: int, repeats: int) -> tuple[float, float]:
    """Median (items per wall second, items per CPU second of this process) over repeats.

    The CPU-second rate is meaningful for ``workers=0`` (all work in this process) and is
    robust to other load on a shared machine.
    """
    from mvdiff.data import build_loader

    rates, cpu_rates = [], []
    for _ in range(repeats):
        loader = build_loader(cfg, kind, seed=0, epochs=1, num_workers=workers, drop_last=False)
        t0, c0 = time.perf_counter(), time.process_time()
        n = sum(len(b["key"]) for b in loader)
        rates.append(n / (time.perf_counter() - t0))
        cpu_rates.append(n / max(time.process_time() - c0, 1e-9))
    return statistics.median(rates), statistics.median(cpu_rates)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=96, help="objects written (32 views each)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="loader worker counts to measure (0 = in the main process)")  # fmt: skip
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args(argv)

    from mvdiff.data import DataConfig
    from mvdiff.data.synthetic import write_synthetic_2d_shards, write_synthetic_mv_shards

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = 4
        write_synthetic_mv_shards(tmp / "mv", num_shards=shards,
                                  objects_per_shard=args.objects // shards, num_views=32,
                                  resolution=args.resolution, textured=True)  # fmt: skip
        write_synthetic_2d_shards(tmp / "2d", num_shards=shards, images_per_shard=64,
                                  size=(320, 288))  # fmt: skip
        size_mb = sum(p.stat().st_size for p in (tmp / "mv").glob("*.tar")) / 2**20
        cfg = DataConfig(mv_shards=str(tmp / "mv" / "*.tar"), shards_2d=str(tmp / "2d" / "*.tar"),
                         num_views=4, resolution=args.resolution, batch_size=4,
                         batch_size_2d=16, shuffle_buffer=100, min_size_2d=256)  # fmt: skip
        result = {"bench": "data", "views": 4, "rendered_views": 32,
                  "resolution": args.resolution, "objects": args.objects,
                  "mv_shard_mb": round(size_mb, 1)}  # fmt: skip
        for w in args.workers:
            med, cpu = measure(cfg, "mv", w, args.repeats)
            per_worker = med / max(1, w)
            result[f"mv_objects_per_s_workers{w}"] = round(med, 1)
            result[f"mv_objects_per_s_per_worker_workers{w}"] = round(per_worker, 1)
            if w == 0:
                result["mv_objects_per_cpu_s_workers0"] = round(cpu, 1)
            med2, _ = measure(cfg, "2d", w, args.repeats)
            result[f"2d_images_per_s_workers{w}"] = round(med2, 1)
        # per core = objects per CPU-second of a single in-process reader (workers=0): the
        # wall-clock rates above also measure whatever else the machine is running
        per_core = result.get("mv_objects_per_cpu_s_workers0")
        result["objects_per_s_per_core"] = per_core
        result["target_objects_per_s_per_core"] = 100
        result["meets_target"] = per_core is not None and per_core >= 100
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
