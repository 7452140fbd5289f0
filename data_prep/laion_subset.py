#!/usr/bin/env python
"""LAION-style subset -> 2D image-text shards (img2dataset layout) for joint training.

    python data_prep/laion_subset.py --config data_prep/configs/laion_subset.yaml \
        --set input='/data/laion2B-en-aesthetic/*.parquet' --set output_dir=/data/laion-256

Reads parquet files of URLs and captions in LAION's metadata layout (``URL``, ``TEXT``,
``WIDTH``, ``HEIGHT``, ``pwatermark``, ``punsafe``, ``NSFW``, ``AESTHETIC_SCORE`` — column
names are matched case-insensitively; filters on columns a file does not have are skipped
and reported), filters on size, aspect ratio and the watermark / NSFW / aesthetic columns,
writes the kept rows to ``OUTPUT_DIR/filtered.parquet`` and downloads them with
``img2dataset`` into ``OUTPUT_DIR/{00000..}.tar`` (``KEY.jpg`` + ``KEY.txt`` + ``KEY.json``),
the layout ``mvdiff.data`` reads. The resolved config and the filter report are saved next
to the shards.

Install: img2dataset pins ``webdataset<0.3`` and its newest dependencies want numpy 2, so
install it without letting pip change mvdiff's stack::

    pip install --no-deps img2dataset
    pip install "pandas<3" "pyarrow<20" "opencv-python-headless<4.12" "albumentations<2" \
        "fire<0.8" "exifread-nocycle<4" wandb fsspec
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LaionSubsetConfig:
    #: parquet file(s): path, glob or ``::``-joined list
    input: str = ""
    output_dir: str = "data/laion-subset"
    url_col: str = "URL"
    caption_col: str = "TEXT"
    width_col: str = "WIDTH"
    height_col: str = "HEIGHT"
    watermark_col: str = "pwatermark"
    unsafe_col: str = "punsafe"
    nsfw_col: str = "NSFW"
    aesthetic_col: str = "AESTHETIC_SCORE"
    #: minimum shorter side (metadata size) of an image; 0 = no filter
    min_size: int = 256
    #: maximum long/short side ratio; 0 = no filter
    max_aspect: float = 2.0
    #: keep rows with watermark probability below this; 1 = no filter
    max_watermark: float = 0.5
    #: keep rows with NSFW probability below this; 1 = no filter
    max_unsafe: float = 0.5
    #: allowed values of the NSFW tag column (LAION: UNLIKELY, UNSURE, NSFW)
    nsfw_allowed: list[str] = field(default_factory=lambda: ["UNLIKELY"])
    #: keep rows with an aesthetic score at least this; 0 = no filter
    min_aesthetic: float = 0.0
    #: keep at most this many rows after filtering (0 = all), a deterministic random sample
    max_samples: int = 0
    seed: int = 0
    # img2dataset settings
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    samples_per_shard: int = 10000
    processes: int = 2
    threads: int = 32
    timeout: int = 10
    retries: int = 1


def _column(df, name: str):
    """The column called ``name`` (case-insensitive) or None."""
    lower = {c.lower(): c for c in df.columns}
    return lower.get(name.lower()) if name else None


def filter_metadata(df, cfg: LaionSubsetConfig):
    """Apply the filters; returns (filtered frame, report list of {filter, column, removed})."""
    import numpy as np

    report = []

    def apply(name, col, keep):
        nonlocal df
        before = len(df)
        df = df[keep.fillna(False) if hasattr(keep, "fillna") else keep]
        report.append({"filter": name, "column": col, "removed": before - len(df)})

    url = _column(df, cfg.url_col)
    if url is None:
        from mvdiff.errors import UserError

        raise UserError(f"input has no URL column {cfg.url_col!r} (columns: {list(df.columns)})")
    apply("url present", url, df[url].notna() & df[url].astype(str).str.len().gt(0))
    w, h = _column(df, cfg.width_col), _column(df, cfg.height_col)
    if w and h:
        short = np.minimum(df[w], df[h])
        long_ = np.maximum(df[w], df[h])
        if cfg.min_size:
            apply(f"min side >= {cfg.min_size}", f"{w},{h}", short >= cfg.min_size)
            short, long_ = np.minimum(df[w], df[h]), np.maximum(df[w], df[h])
        if cfg.max_aspect:
            apply(f"aspect <= {cfg.max_aspect}", f"{w},{h}", long_ <= cfg.max_aspect * short)
    else:
        report.append({"filter": "size / aspect", "column": None, "removed": "skipped: no column"})
    for name, colname, test in [
        (f"watermark < {cfg.max_watermark}", cfg.watermark_col,
         lambda c: df[c] < cfg.max_watermark if cfg.max_watermark < 1 else None),
        (f"unsafe < {cfg.max_unsafe}", cfg.unsafe_col,
         lambda c: df[c] < cfg.max_unsafe if cfg.max_unsafe < 1 else None),
        (f"NSFW tag in {cfg.nsfw_allowed}", cfg.nsfw_col,
         lambda c: df[c].astype(str).str.upper().isin([v.upper() for v in cfg.nsfw_allowed])),
        (f"aesthetic >= {cfg.min_aesthetic}", cfg.aesthetic_col,
         lambda c: df[c] >= cfg.min_aesthetic if cfg.min_aesthetic > 0 else None),
    ]:  # fmt: skip
        col = _column(df, colname)
        if col is None:
            report.append({"filter": name, "column": colname, "removed": "skipped: no column"})
            continue
        keep = test(col)
        if keep is not None:
            apply(name, col, keep)
    if cfg.max_samples and len(df) > cfg.max_samples:
        before = len(df)
        df = df.sample(n=cfg.max_samples, random_state=cfg.seed).sort_index()
        report.append({"filter": f"max_samples {cfg.max_samples}", "column": None,
                       "removed": before - len(df)})  # fmt: skip
    return df, report


def run(cfg: LaionSubsetConfig) -> dict:
    import pandas as pd

    from mvdiff.config import dump_config, save_config
    from mvdiff.errors import UserError

    files = []
    for item in cfg.input.split("::"):
        matched = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        files += [f for f in matched if f]
    if not files:
        raise UserError(f"input={cfg.input!r}: no parquet files")
    for f in files:
        if not Path(f).is_file():
            raise UserError(f"input: {f} does not exist")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    print(dump_config(cfg), flush=True)

    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    total = len(df)
    df, report = filter_metadata(df, cfg)
    print(f"{total} rows in {len(files)} file(s); {len(df)} kept")
    for r in report:
        print(f"  {r['filter']:<40} {str(r['column']):<22} removed {r['removed']}")
    if not len(df):
        raise UserError("every row was filtered out; loosen the filters (see the report above)")
    url, caption = _column(df, cfg.url_col), _column(df, cfg.caption_col)
    keep_cols = [url] + ([caption] if caption else [])
    filtered = out / "filtered.parquet"
    df[keep_cols].rename(columns={url: "url", **({caption: "caption"} if caption else {})}) \
        .to_parquet(filtered, index=False)  # fmt: skip

    from img2dataset import download

    t0 = time.time()
    download(
        url_list=str(filtered),
        input_format="parquet",
        url_col="url",
        caption_col="caption" if caption else None,
        output_format="webdataset",
        output_folder=str(out),
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        min_image_size=cfg.min_size,
        max_aspect_ratio=cfg.max_aspect or float("inf"),
        encode_format=cfg.encode_format,
        number_sample_per_shard=cfg.samples_per_shard,
        processes_count=cfg.processes,
        thread_count=cfg.threads,
        timeout=cfg.timeout,
        retries=cfg.retries,
        enable_wandb=False,
        incremental_mode="incremental",
    )
    shards = sorted(str(p) for p in out.glob("*.tar"))
    summary = {"rows": total, "kept": len(df), "filters": report, "shards": shards,
               "seconds": round(time.time() - t0, 1)}  # fmt: skip
    ok = 0
    for stats in out.glob("*_stats.json"):
        ok += json.loads(stats.read_text()).get("successes", 0)
    summary["downloaded"] = ok
    (out / "laion_subset_report.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"downloaded {ok} of {len(df)} images into {len(shards)} shard(s) in {out}")
    return summary


def main(argv=None) -> int:
    from mvdiff.config import add_config_arguments, config_from_args
    from mvdiff.errors import UserError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(
        parser, "LaionSubsetConfig (data_prep/configs/laion_subset.yaml)", "min_size=512"
    )
    args = parser.parse_args(argv)
    try:
        run(config_from_args(LaionSubsetConfig, args))
    except UserError as e:
        print(f"laion_subset.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
