"""Run the benchmarks and write the table that README shows.

    python benchmarks/run_all.py                      # the quick set (~15 minutes on 2 cores)
    python benchmarks/run_all.py --full               # every script at its default size
    python benchmarks/run_all.py --only data train    # some of them
    python benchmarks/run_all.py --readme README.md   # also replace README's table

Each script runs in its own process and prints one JSON line; this collects them into
``OUT/results.jsonl`` (one line per script, with the command, wall time and load average
around it) and ``OUT/table.md``. With ``--readme`` the table between the markers
``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->`` is replaced (atomically).
A script that fails becomes a row saying so; the run still writes the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _unet(r: dict) -> str:
    s = r.get("summary", {})
    rows = {(x["impl"], x["mode"], bool(x.get("checkpointing"))): x for x in r["rows"]}
    parts = []
    for mode, label in (("forward", "forward"), ("train", "fwd+bwd")):
        ours = rows.get(("mvdiff", mode, False), {})
        if "seconds" in ours:
            text = f"{label} {ours['seconds']:.2f} s"
            if f"speedup_vs_official_fp32_{mode}" in s:
                text += f" ({s[f'speedup_vs_official_fp32_{mode}']}× official)"
            if "fraction_of_matmul_peak" in ours:
                text += f", {ours['fraction_of_matmul_peak']:.2f} of matmul peak"
            parts.append(text + f", {ours['peak_rss_gb']} GB")
    return f"{r['model']}: " + "; ".join(parts)


def _render(r: dict) -> str:
    return (
        f"{r['cpu_s_per_view']} CPU-s per {r['resolution']}² view "
        f"(target 0.8), {r['per_object_overhead_cpu_s']} CPU-s per-object overhead, "
        f"{r['objects_per_hour_per_core']} objects/hour/core at 32 views, "
        f"{r['speedup_vs_stock_cycles']}× stock Cycles settings"
    )


def _data(r: dict) -> str:
    return (
        f"{r['objects_per_s_per_core']} 4-view {r['resolution']}² objects per CPU-second "
        f"(target 100); 2D: {r.get('2d_images_per_s_workers0')} images/s"
    )


def _train(r: dict) -> str:
    parts = []
    for c in r["results"]:
        if "error" in c:
            parts.append(f"{c['case']}: {c['error']}")
        else:
            parts.append(
                f"{c['case']}: {c['samples_per_s']} samples/s, {c['step_s_median']} s/step, "
                f"{c['peak_rss_gib']} GiB"
            )
    return "; ".join(parts)


def _sample(r: dict) -> str:
    f = r["float32"]
    return (
        f"fp32 DDIM 50: {f['ddim50_s']} s, DPM-Solver++ 20: {f['dpm20_s']} s "
        f"({r['dpm20_speedup_vs_ddim50']}×); outside the UNet "
        f"{100 * f['ddim50_outside_unet_share']:.1f}% / {100 * f['dpm20_outside_unet_share']:.1f}%"
    )


def _sds(r: dict) -> str:
    parts = [
        f"{x['model']} UNet, {x['render_size']}² renders: {x['it_per_s']} steps/s "
        f"({100 * x['outside_unet_vae_share']:.0f}% outside UNet+VAE)"
        for x in r["sds"]
    ]
    if "reconstruction" in r:
        x = r["reconstruction"]
        parts.append(
            f"posed-view reconstruction, {x['views']} views at {x['resolution']}²: "
            f"{x['it_per_s']} steps/s, held-out PSNR {x['psnr_holdout']} dB after {x['steps']}"
        )
    return "; ".join(parts)


@dataclass(frozen=True)
class Bench:
    """One script: what it measures, its arguments in the quick and full sets, its summary."""

    script: str
    measures: str
    quick: tuple[str, ...] | None  # None: not part of the quick set
    full: tuple[str, ...]
    summarise: Callable[[dict], str]

    @property
    def name(self) -> str:
        return self.script.removeprefix("bench_").removesuffix(".py")


BENCHES = [
    Bench(
        "bench_unet.py",
        "multi-view UNet forward / training step vs the official computation, 4 views",
        ("--quick", "--repeats", "1"),
        (),
        _unet,
    ),
    Bench(
        "bench_render.py",
        "Blender Cycles (CPU, 32 samples + denoiser) per view",
        ("--quick",),
        (),
        _render,
    ),
    Bench(
        "bench_data.py",
        "multi-view + 2D shard loading",
        ("--objects", "16", "--repeats", "1", "--workers", "0"),
        (),
        _data,
    ),
    Bench(
        "bench_train.py",
        "training samples/s and peak memory",
        ("--cases", "tiny-fp32", "--steps", "3"),
        (),
        _train,
    ),
    Bench(
        "bench_sample.py",
        "4 views at 256², full-size UNet, DDIM 50 vs DPM-Solver++ 20",
        ("--measure-steps", "2"),
        (),
        _sample,
    ),
    Bench(
        "bench_sds.py",
        "multi-view SDS steps/s",
        ("--sizes", "64", "--steps", "3", "--recon-steps", "100"),
        (),
        _sds,
    ),
]


def run_one(bench: Bench, args: tuple[str, ...], timeout: float) -> dict:
    """Run one script in its own process; its last stdout line is its JSON result."""
    cmd = [sys.executable, str(HERE / bench.script), *args]
    load_before, t0 = os.getloadavg()[0], time.monotonic()
    record = {
        "bench": bench.name,
        "command": " ".join(["python", f"benchmarks/{bench.script}", *args]),
        "load_average_before": round(load_before, 2),
    }
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**record, "error": f"timed out after {timeout:.0f} s"}
    record["wall_s"] = round(time.monotonic() - t0, 1)
    record["load_average_after"] = round(os.getloadavg()[0], 2)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip().startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {**record, "error": f"exit {out.returncode}: {tail}"}
    try:
        record["result"] = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        return {**record, "error": f"last line is not JSON: {e}"}
    return record


def table(records: list[dict]) -> str:
    by_name = {b.name: b for b in BENCHES}
    lines = [
        "| script | what it measures | result | wall, load avg |",
        "|---|---|---|---|",
    ]
    for rec in records:
        bench = by_name[rec["bench"]]
        if "error" in rec:
            result = f"failed: {rec['error']}"
        else:
            try:
                result = bench.summarise(rec["result"])
            except (KeyError, TypeError, IndexError) as e:  # a script changed its JSON
                result = f"unexpected JSON ({type(e).__name__}: {e})"
        where = f"{rec.get('wall_s', '?')} s, {rec['load_average_before']}"
        lines.append(f"| `{bench.script}` | {bench.measures} | {result} | {where} |")
    return "\n".join(lines) + "\n"


def replace_between_markers(path: Path, body: str) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"--readme {path}: no {START} ... {END} markers to replace between")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{head}{START}\n{body}{END}{tail}")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHES]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every script at its default size")
    parser.add_argument("--only", nargs="+", choices=names, help="run only these")
    parser.add_argument("--output", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument("--readme", type=Path, help="replace the table in this README")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    args = parser.parse_args(argv)

    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    if not args.full and not args.only:
        chosen = [b for b in chosen if b.quick is not None]
    records = []
    for i, bench in enumerate(chosen, 1):
        bench_args = bench.full if args.full or bench.quick is None else bench.quick
        print(f"[{i}/{len(chosen)}] {bench.script} {' '.join(bench_args)}", flush=True)
        rec = run_one(bench, bench_args, args.timeout)
        print(f"    {rec.get('wall_s', '?')} s  {rec.get('error', 'ok')}", flush=True)
        records.append(rec)

    args.output.mkdir(parents=True, exist_ok=True)
    text = table(records)
    for name, content in (
        ("results.jsonl", "".join(json.dumps(r) + "\n" for r in records)),
        ("table.md", text),
    ):
        tmp = args.output / (name + ".tmp")
        tmp.write_text(content)
        tmp.replace(args.output / name)
    if args.readme:
        replace_between_markers(args.readme, text)
    print(text)
    print(f"wrote {args.output / 'results.jsonl'} and {args.output / 'table.md'}")
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
